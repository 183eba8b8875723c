r"""Re-selecting the outputscale and the noise by the exact log marginal likelihood, matrix-free.

CaGP-Opt fits the hyperparameters by the CaGP ELBO [1]. The ELBO is the exact log marginal
likelihood less :math:`\mathrm{KL}(q \,\|\, p(f \mid y))`, and that gap grows with the part of the
prior the actions cannot represent, which scales with the outputscale. So the ELBO prefers a small
outputscale, and it counts what the actions miss as noise. Once prediction-time refinement has made
the posterior (nearly) exact, these are the wrong hyperparameters for it. This module keeps the
kernel's shape (its lengthscales) and re-selects the outputscale multiplier :math:`a` and the noise
:math:`\sigma^2` by the exact log marginal likelihood of :math:`a K + \sigma^2 I`.

With :math:`\tau = \sigma^2 / a` and :math:`A_\tau = K + \tau I`, the likelihood is maximised in
:math:`a` in closed form, :math:`\hat a(\tau) = r^\top A_\tau^{-1} r / n`, which leaves one
dimension (:math:`r = y - \mu(X)`):

.. math::

    \ell(\tau) = -\tfrac12\bigl[n + n \log \hat a(\tau) + \log|A_\tau| + n \log 2\pi\bigr], \qquad
    \frac{2}{n}\frac{d\ell}{d\log\tau} = h(\tau) =
    \frac{\tau\, \|A_\tau^{-1} r\|^2}{r^\top A_\tau^{-1} r} - \frac{\tau \operatorname{tr}(A_\tau^{-1})}{n}.

Both terms of :math:`h` lie in :math:`(0, 1]`. The search finds the root of :math:`h` in
:math:`\log\tau` (bracketing, then the Illinois variant of regula falsi). Each evaluation solves
:math:`A_\tau [x, X_Z] = [r, Z]` by block preconditioned CG, with :math:`P_\tau = LL^\top + \tau I`
from a low-rank factor :math:`K \approx LL^\top` (e.g. RPCholesky) whose eigendecomposition gives
:math:`P_\tau^{-1}` for every :math:`\tau` at :math:`O(nk)` cost. The trace uses :math:`P_\tau` as
a control variate for Hutchinson's estimator [2], with the same Gaussian probes :math:`Z` at every
:math:`\tau` (so :math:`h` is a smooth function of :math:`\tau` and the root is well defined):

.. math::

    \operatorname{tr}(A_\tau^{-1}) = \operatorname{tr}(P_\tau^{-1})
        - \mathbb{E}_z\bigl[z^\top (P_\tau^{-1} - A_\tau^{-1}) z\bigr],

where :math:`\operatorname{tr}(P_\tau^{-1})` is exact and :math:`P_\tau^{-1} - A_\tau^{-1}` is
small when :math:`LL^\top` captures :math:`K`, so few probes suffice. The cost is one product with
:math:`K` per CG iteration (all columns in one pass over the kernel entries).

References:

[1] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
[2] J. Gardner, G. Pleiss, D. Bindel, K. Weinberger, A. Wilson. GPyTorch: blackbox matrix-matrix
    Gaussian process inference with GPU acceleration. NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validation import check_positive_int
from ._checks import check_inputs, check_noise, check_nonzero_residual, check_tolerance
from ._search import grid_golden_bracket
from .kernel_fn import KernelFn

__all__ = ["MLLRefit", "refit_outputscale_noise", "subset_refit_outputscale_noise"]


@dataclass
class MLLRefit:
    """The result of :func:`refit_outputscale_noise`.

    :ivar multiplier: :math:`\\hat a`, the factor on the kernel (its outputscale).
    :ivar noise: :math:`\\hat\\sigma^2 = \\hat a \\hat\\tau`.
    :ivar evaluations: values of :math:`\\tau` tried.
    :ivar products: products with :math:`K` (each over all columns at once).
    :ivar converged: whether the root was bracketed and narrowed to the tolerance (otherwise the
        result is the best point tried, e.g. at a bound of the search).
    :ivar kernel: the re-selected kernel where the lengthscales were re-selected too
        (:func:`~pyro_gpx.gp.kernel_refit.subset_refit_kernel_noise`; ``multiplier`` applies on
        top of it); ``None``: the trained kernel times ``multiplier``.
    """

    multiplier: float
    noise: float
    evaluations: int
    products: int
    converged: bool
    kernel: KernelFn | None = None


class _ShiftedPreconditioner:
    r""":math:`P_\tau^{-1} = (LL^\top + \tau I)^{-1}` for any :math:`\tau` from one eigendecomposition."""

    def __init__(self, L: torch.Tensor):
        s, W = torch.linalg.eigh(L.T @ L)
        keep = s > s.max().clamp_min(1e-300) * L.shape[1] * torch.finfo(torch.float64).eps
        self.s = s[keep]
        self.U = (L @ W[:, keep]) / self.s.sqrt()  # orthonormal columns, L L^T = U diag(s) U^T

    def solve(self, V: torch.Tensor, tau: float) -> torch.Tensor:
        coef = (self.s / (tau * (self.s + tau)))[:, None] * (self.U.T @ V)
        return V / tau - self.U @ coef

    def trace_inverse(self, n: int, tau: float) -> float:
        return (n - self.s.numel()) / tau + float((1.0 / (self.s + tau)).sum())


def _check_search(noise: float, bounds: tuple[float, float]) -> tuple[float, float]:
    check_noise("noise", noise)
    low, high = bounds
    if not 0 < low < 1 < high:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    return low, high


def _block_pcg(matvec, B, precond, tol: float, max_iter: int, X0: torch.Tensor | None):
    """Independent preconditioned CG for each column of ``B`` (``(n, m)``), one product per step."""
    X = torch.zeros_like(B) if X0 is None else X0.clone()
    R = B - matvec(X) if X0 is not None else B.clone()
    products = 1 if X0 is not None else 0
    b_norm = B.norm(dim=0).clamp_min(1e-300)
    Zr = precond(R)
    D = Zr.clone()
    rz = (R * Zr).sum(0)
    for _ in range(max_iter):
        if bool((R.norm(dim=0) / b_norm <= tol).all()):
            break
        AD = matvec(D)
        products += 1
        curvature = (D * AD).sum(0)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-300), torch.zeros_like(rz))
        X += alpha * D
        R -= alpha * AD
        Zr = precond(R)
        rz_new = (R * Zr).sum(0)
        D = Zr + (rz_new / rz.clamp_min(1e-300)) * D
        rz = rz_new
    return X, products


@torch.no_grad()
def refit_outputscale_noise(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    residual: torch.Tensor,
    L: torch.Tensor,
    noise: float,
    num_probes: int = 8,
    tol: float = 1e-3,
    max_iter: int = 60,
    max_evaluations: int = 10,
    log_tol: float = 0.02,
    bounds: tuple[float, float] = (1e-4, 1e2),
    min_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> MLLRefit:
    r"""The outputscale multiplier and noise variance that maximise the exact log marginal likelihood.

    :param matvec: :math:`V \mapsto K V` for ``(n, m)`` float64 blocks (the kernel without noise).
    :param residual: :math:`y - \mu(X)`, ``(n,)``.
    :param L: a low-rank factor :math:`K \approx LL^\top` (``(n, k)``), e.g.
        :func:`~pyro_gpx.gp.preconditioners.partial_cholesky`'s; it preconditions CG and is the
        control variate of the trace.
    :param noise: the current noise variance (with multiplier 1): the search starts at
        :math:`\tau = \sigma^2`.
    :param num_probes: Gaussian probe vectors of the trace estimator.
    :param tol: relative residual of each CG solve; :param max_iter: CG iterations per solve.
    :param max_evaluations: values of :math:`\tau` tried (each a block CG solve); when they run out
        the result is the best one tried and ``converged`` is ``False``.
    :param log_tol: stop when the bracket on :math:`\log\tau` is this narrow.
    :param bounds: the multipliers of the starting :math:`\tau` searched over.
    :param min_noise: a floor for the noise (e.g. the model's jitter).
    :returns: :class:`MLLRefit`.

    Example (a small problem, checked against the dense maximiser in the tests)::

        >>> import torch
        >>> from pyro_gpx.gp.mll_refit import refit_outputscale_noise
        >>> gen = torch.Generator().manual_seed(0)
        >>> X = torch.rand(300, 1, generator=gen, dtype=torch.float64)
        >>> K = 4.0 * torch.exp(-0.5 * (X - X.T) ** 2 / 0.1**2)
        >>> y = torch.linalg.cholesky(K + 0.01 * torch.eye(300, dtype=torch.float64)) @ torch.randn(
        ...     300, generator=gen, dtype=torch.float64)
        >>> evals, evecs = torch.linalg.eigh(K / 4)
        >>> L = evecs[:, -40:] * evals[-40:].sqrt()
        >>> fit = refit_outputscale_noise(lambda V: (K / 4) @ V, y, L, noise=0.1)
        >>> fit.converged, 2.0 < fit.multiplier < 8.0, 0.005 < fit.noise < 0.02
        (True, True, True)
    """
    check_positive_int("num_probes", num_probes)
    check_positive_int("max_iter", max_iter)  # (0 gave ZeroDivisionError)
    check_inputs("residual", residual)
    check_nonzero_residual(residual)  # (a ZeroDivisionError)
    check_tolerance("tol", tol, strict=True)
    check_tolerance("log_tol", log_tol, strict=True)
    check_tolerance("min_noise", min_noise)
    check_positive_int("max_evaluations", max_evaluations)
    low, high = _check_search(noise, bounds)
    r = residual.double().reshape(-1)
    n = r.shape[0]
    if L.shape[0] != n:
        raise ValueError(f"L has {L.shape[0]} rows; the residual has {n}")
    precond = _ShiftedPreconditioner(L.double())
    Z = torch.randn(n, num_probes, generator=generator, dtype=torch.float64)
    B = torch.cat([r[:, None], Z], 1)
    products = 0
    solutions: dict[float, torch.Tensor] = {}

    def h(u: float) -> tuple[float, float]:
        nonlocal products
        tau = math.exp(u)
        nearest = min(solutions, key=lambda v: abs(v - u)) if solutions else None
        X0 = solutions[nearest] if nearest is not None else None
        Xs, used = _block_pcg(lambda V: matvec(V) + tau * V, B, lambda V: precond.solve(V, tau), tol, max_iter, X0)
        products += used
        solutions[u] = Xs
        x = Xs[:, 0]
        quad = float(r @ x)
        correction = float((Z * precond.solve(Z, tau)).sum() - (Z * Xs[:, 1:]).sum()) / num_probes
        trace = precond.trace_inverse(n, tau) - correction
        return tau * float(x @ x) / quad - tau * trace / n, quad / n

    u0 = math.log(noise)
    u_low, u_high = u0 + math.log(low), u0 + math.log(high)
    step = math.log(4.0)
    values: dict[float, tuple[float, float]] = {u0: h(u0)}
    # bracket the root: h > 0 means the likelihood still rises with tau
    u = u0
    direction = 1.0 if values[u0][0] > 0 else -1.0
    bracket = None
    while len(values) < max_evaluations:
        u_next = min(max(u + direction * step, u_low), u_high)
        if u_next == u:
            break
        values[u_next] = h(u_next)
        if (values[u_next][0] > 0) != (values[u][0] > 0):
            bracket = (u, u_next) if u < u_next else (u_next, u)
            break
        u = u_next
    converged = False
    if bracket is not None:
        a, b = bracket
        fa, fb = values[a][0], values[b][0]
        side = 0
        while len(values) < max_evaluations and b - a > log_tol:
            c = b - fb * (b - a) / (fb - fa) if fb != fa else 0.5 * (a + b)
            c = min(max(c, a + 0.1 * (b - a)), b - 0.1 * (b - a))  # keep the bracket shrinking
            values[c] = h(c)
            fc = values[c][0]
            if (fc > 0) == (fa > 0):
                a, fa = c, fc
                if side == -1:
                    fb *= 0.5  # Illinois: halve the stale end's value
                side = -1
            else:
                b, fb = c, fc
                if side == 1:
                    fa *= 0.5
                side = 1
        converged = b - a <= log_tol
        fa, fb = values[a][0], values[b][0]
        t = fa / (fa - fb)  # the root by linear interpolation in log tau, the multiplier in log a
        u_best = a + t * (b - a)
        multiplier = math.exp((1 - t) * math.log(values[a][1]) + t * math.log(values[b][1]))
    else:  # no sign change: the likelihood rose all the way, so the best point tried is the last one reached
        # (a bound of the search, or where the evaluations ran out), not the one of smallest slope
        u_best = max(values, key=lambda v: direction * v)
        multiplier = values[u_best][1]
    tau = math.exp(u_best)
    noise_hat = max(multiplier * tau, min_noise)
    return MLLRefit(multiplier, noise_hat, len(values), products, converged)


def _profile_maximiser(evals: torch.Tensor, rho: torch.Tensor, log_tau: torch.Tensor) -> tuple[float, float, bool]:
    """(tau, multiplier, interior) maximising the profile likelihood of ``rho`` = Q^T r over a grid of log
    tau, refined by golden-section search between the grid neighbours of the best point; ``interior``:
    whether the maximiser lies inside the grid, not at an end of it."""
    m = rho.shape[0]

    def profile(u: float) -> tuple[float, float]:
        shifted = evals + math.exp(u)
        a = float((rho**2 / shifted).sum()) / m
        return -0.5 * (m * math.log(a) + float(shifted.log().sum())), a

    lo, hi = grid_golden_bracket(lambda u: profile(u)[0], log_tau.tolist(), 1e-3)
    u = 0.5 * (lo + hi)
    interior = min(u - float(log_tau[0]), float(log_tau[-1]) - u) > 2e-3  # golden search ends within 1e-3
    return math.exp(u), profile(u)[1], interior


def distinct_rows(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    r"""``index`` without the rows whose inputs repeat an earlier row of ``X[index]``. Identical rows
    (protein has about 1 400 among 41 000, nearly all with identical targets too) make a subset's
    likelihood grow without bound as the noise goes to zero: each pair adds :math:`-\tfrac12\log
    \sigma^2`, enough to pull a search to the noise floor."""
    _, inverse = torch.unique(X[index], dim=0, return_inverse=True)
    positions = torch.arange(len(index))
    first = torch.full((int(inverse.max()) + 1,), len(index), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return index[first.sort().values]


def random_subsets(
    X: torch.Tensor,
    residual: torch.Tensor,
    num_points: int,
    num_subsets: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Indices of ``num_subsets`` random subsets of ``num_points`` rows of ``X`` (one subset of all
    rows where ``num_points`` is not smaller than their number), repeated inputs dropped
    (:func:`distinct_rows`); checks the arguments, ``residual`` (``(n,)``) for its shape."""
    check_positive_int("num_points", num_points)
    check_positive_int("num_subsets", num_subsets)
    check_inputs("X", X)  # (a NaN residual gave multiplier and noise NaN with converged=True)
    check_inputs("residual", residual)
    n = X.shape[0]
    if residual.shape != (n,):
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected ({n},)")
    check_nonzero_residual(residual)  # (a 'math domain error', or the kernel refit's converged=True at the floor)
    if num_points >= n:
        return [distinct_rows(X, torch.arange(n))]
    return [distinct_rows(X, torch.randperm(n, generator=generator)[:num_points]) for _ in range(num_subsets)]


@torch.no_grad()
def subset_refit_outputscale_noise(
    kernel: KernelFn,
    X: torch.Tensor,
    residual: torch.Tensor,
    noise: float,
    num_points: int = 2000,
    num_subsets: int = 2,
    bounds: tuple[float, float] = (1e-4, 1e2),
    min_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> MLLRefit:
    r"""As :func:`refit_outputscale_noise`, with the exact likelihood of random subsets of the data.

    Each subset of ``num_points`` points gets a dense float64 eigendecomposition
    :math:`K_m = Q \Lambda Q^\top`, after which :math:`\ell_m(\tau)` costs :math:`O(m)` for any
    :math:`\tau`; it is maximised over a log grid of :math:`\tau` (``bounds`` times ``noise``),
    refined by golden-section search. The estimates of :math:`\log\tau` and :math:`\log \hat a`
    are averaged over ``num_subsets`` subsets. At fixed lengthscales the maximiser is a consistent
    estimate of the full-data one. It needs no product with the full kernel matrix:
    :math:`O(m^3)` per subset (about a second at :math:`m = 2000` on two cores), against a few
    hundred full-data products for the matrix-free estimate on a hard problem. Where the data
    hold all the points (``num_points >= n``), this is the exact maximiser for the distinct inputs:
    repeated inputs are dropped (each keeps its first target), so with replicated inputs, which
    carry information about the noise, it is not the full-data maximiser (on 30 inputs each
    repeated three times it was 0.56 nats short of it).

    :param kernel: the kernel at its trained hyperparameters.
    :param X: training inputs ``(n, d)``; ``residual``: :math:`y - \mu(X)`, ``(n,)``.
    :param noise: the current noise variance; the search runs over ``bounds`` times it.
    :param num_points: points per subset; :param num_subsets: subsets averaged over.
    :param bounds: the search interval for the noise variance, as multiples of ``noise``.
    :param min_noise: a floor for the noise (e.g. the model's jitter): the result is at least this.
    :param generator: draws the subsets.
    """
    low, high = _check_search(noise, bounds)
    subsets = random_subsets(X, residual, num_points, num_subsets, generator)
    log_tau = torch.linspace(math.log(noise * low), math.log(noise * high), 61, dtype=torch.float64)
    log_taus, log_as, interior = [], [], True
    for index in subsets:
        Xm = X[index].double()
        evals, evecs = torch.linalg.eigh(kernel(Xm, Xm).double())
        tau, a, inside = _profile_maximiser(evals.clamp_min(0), evecs.T @ residual[index].double(), log_tau)
        log_taus.append(math.log(tau))
        log_as.append(math.log(a))
        interior = interior and inside
    tau, multiplier = math.exp(sum(log_taus) / len(subsets)), math.exp(sum(log_as) / len(subsets))
    return MLLRefit(multiplier, max(multiplier * tau, min_noise), len(subsets), 0, interior)
