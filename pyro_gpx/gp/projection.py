r"""The GP projected onto the actions: every quantity CaGP/IterGP needs, from one kernel product.

With residual :math:`r = y - \mu(X)`, noise :math:`\sigma^2`, :math:`\hat K = K + \sigma^2 I` and
actions :math:`S`, computation-aware inference conditions on :math:`S^\top y` [1, 2]:

.. math::

    G = S^\top \hat K S, \qquad w = G^{-1} S^\top r, \qquad C = S G^{-1} S^\top, \qquad v = C r = S w.

Only :math:`KS` (one matrix-free pass over :math:`K`), :math:`\operatorname{diag} K` and
:math:`i \times i` matrices are needed. The :math:`i \times i` algebra (Gram matrix, Cholesky,
solves, traces, log-determinants) runs in float64 even when the kernel products ran in float32.

References:

[1] J. Wenger, G. Pleiss, M. Pförtner, P. Hennig, J. Cunningham. Posterior and computational
    uncertainty in Gaussian processes. NeurIPS 2022.
[2] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_inputs, check_noise, check_tolerance
from .actions import Actions, DenseActions, IndexActions, StackedActions
from .cholesky import safe_cholesky
from .kernel_fn import KernelFn

__all__ = [
    "ActionProjection",
    "independent_columns",
    "pivoted_independent_columns",
    "project",
    "project_extended",
    "resolved_columns",
]


def _sym(A: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A + A.transpose(-1, -2))


@dataclass
class ActionProjection:
    """The data seen through the actions (see the module docstring).

    :ivar KS: ``(n, i)`` :math:`K S` in the kernel's dtype.
    :ivar StKS: :math:`S^\\top K S`; :ivar StS: :math:`S^\\top S`; :ivar Str: :math:`S^\\top r`.
    :ivar chol_G: lower Cholesky factor of :math:`G`.
    :ivar weights: :math:`w = G^{-1} S^\\top r` (the representer weights are :math:`S w`).
    """

    actions: Actions
    residual: torch.Tensor
    noise: torch.Tensor
    KS: torch.Tensor
    StKS: torch.Tensor
    StS: torch.Tensor
    Str: torch.Tensor
    chol_G: torch.Tensor
    weights: torch.Tensor

    @property
    def num_data(self) -> int:
        return self.residual.shape[0]

    @property
    def num_actions(self) -> int:
        return self.actions.num_actions

    def solve_G(self, B: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(B, self.chol_G)

    def logdet_G(self) -> torch.Tensor:
        return 2 * self.chol_G.diagonal().log().sum()

    def logdet_StS(self) -> torch.Tensor:
        return torch.linalg.slogdet(self.StS)[1]

    def elbo(self, diag_K: torch.Tensor, KS_factor: torch.Tensor | None = None) -> torch.Tensor:
        r"""The CaGP evidence lower bound [2] (float64):

        .. math::

            \mathcal{L} = -\tfrac12\Big[n\log 2\pi\sigma^2 + \frac{\|r - KSw\|^2 + \operatorname{tr}K
            - \operatorname{tr}(G^{-1}S^\top K K S)}{\sigma^2}\Big]
            - \tfrac12\Big[w^\top S^\top K S w - \operatorname{tr}(G^{-1}S^\top K S) + \log|G|
            - i\log\sigma^2 - \log|S^\top S|\Big].

        The first bracket is :math:`\mathbb{E}_q[\log N(y \mid f, \sigma^2 I)]` under
        :math:`q(f) = N(\mu + KSw,\ K - KSG^{-1}S^\top K)`, the second :math:`\mathrm{KL}(q \,\|\, p)`.
        It never exceeds :math:`\log N(y; \mu, \hat K)` and equals it when :math:`S` spans
        :math:`\mathbb{R}^n`.

        The traces are formed stably at small noise, where :math:`G` is ill-conditioned:
        :math:`\operatorname{tr}(G^{-1}S^\top KKS) = \|L^{-1}(KS)^\top\|_F^2` with :math:`G = LL^\top` (a
        solve against :math:`S^\top K K S`, which squares the conditioning, put the bound 21 nats above
        :math:`\log p(y)` at noise 1e-7) and :math:`\operatorname{tr}(G^{-1}S^\top K S) = i -
        \sigma^2\operatorname{tr}(G^{-1}S^\top S)`. ``KS_factor``: any :math:`F` with :math:`F^\top F =
        (KS)^\top KS`, e.g. the triangular factor of a QR decomposition of :math:`KS`, which does not
        depend on the noise (:func:`~pyro_gpx.gp.noise_refit.refit_noise` forms it once).
        """
        n, i = self.num_data, self.num_actions
        noise = self.noise
        KS = self.KS.double()
        r = self.residual.double()
        fit = r - KS @ self.weights
        F = KS if KS_factor is None else KS_factor.double()
        # ||F L^{-T}||_F^2 through L's explicit inverse: one GEMM, as accurate here as a triangular solve of
        # F^T (1e-8 noise: 4e-4 nats apart) and as fast as forming F^T F
        L_inv = torch.linalg.solve_triangular(self.chol_G, torch.eye(i, dtype=F.dtype, device=F.device), upper=False)
        trace_reduction = (F @ L_inv.T).square().sum()
        trace_StKS = i - noise * torch.trace(self.solve_G(self.StS))
        expected = -0.5 * (
            n * torch.log(2 * math.pi * noise) + (fit @ fit + diag_K.double().sum() - trace_reduction) / noise
        )
        kl = 0.5 * (
            self.weights @ (self.StKS @ self.weights)
            - trace_StKS
            + self.logdet_G()
            - i * torch.log(noise)
            - self.logdet_StS()
        )
        return expected - kl

    def projected_log_likelihood(self) -> torch.Tensor:
        r"""Log-density of the projected data in an orthonormal basis of :math:`\operatorname{span}(S)`
        (the IterGP training objective):

        .. math::

            -\tfrac12\big[(S^\top r)^\top G^{-1} S^\top r + \log|G| - \log|S^\top S| + i\log 2\pi\big].

        Invariant to the choice of basis of the actions; equals the exact log marginal likelihood
        for complete actions.
        """
        i = self.num_actions
        return -0.5 * (self.Str @ self.weights + self.logdet_G() - self.logdet_StS() + i * math.log(2 * math.pi))


def _factorise(actions, residual, noise, KS, StKS, StS, Str) -> ActionProjection:
    G = StKS + noise * StS
    chol_G = safe_cholesky(G, "the projected Gram matrix S^T (K + noise I) S")
    weights = torch.cholesky_solve(Str[:, None], chol_G)[:, 0]
    return ActionProjection(actions, residual, noise, KS, StKS, StS, Str, chol_G, weights)


#: Safety factor of :func:`resolved_columns` over the measured float32 error of :math:`G`
#: (at most about 2 eps |K| |s_i| |s_j| on 1-5 d RBF problems with n = 800-5000).
RESOLUTION_FACTOR = 10.0


def resolved_columns(KS: torch.Tensor, G: torch.Tensor, StS: torch.Tensor) -> torch.Tensor | None:
    r"""Columns of dense actions whose part of :math:`G` rises above the rounding error of :math:`KS`.

    :math:`KS` computed in a dtype with unit roundoff :math:`\epsilon` carries an error of about
    :math:`\epsilon \|K\| \|s_j\|` per column, so :math:`G = S^\top \hat K S` is only known to
    :math:`\epsilon \|K\| \|s_i\| \|s_j\|`. Column :math:`j` is kept if its pivot (see
    :func:`independent_columns`) exceeds ``RESOLUTION_FACTOR`` :math:`\epsilon \hat\lambda \|s_j\|^2`,
    with :math:`\hat\lambda = \max_j \|K s_j\| / \|s_j\|` (a lower estimate of :math:`\|K\|_2`).
    In float32, near-dependent pseudo-input columns or CG directions past float32's resolution
    would otherwise make :math:`G` numerically singular (a jittered, wrong ELBO, negative
    computational variance). Dropping them conditions on a smaller span, so the projection stays
    a valid computation-aware one.

    :returns: ``None`` if every column is resolved (the common case, checked with one Cholesky
        factorisation), else the indices of the columns to keep.
    """
    G, norms2 = G.detach(), StS.detach().diagonal()
    if not (torch.isfinite(G).all() and torch.isfinite(KS).all()):
        return None  # left to safe_cholesky, which names the problem
    nonzero = norms2 > 0
    if not nonzero.any():
        return torch.zeros(0, dtype=torch.long)
    lam = (KS.detach().double().norm(dim=0)[nonzero] / norms2[nonzero].sqrt()).max()
    atol = RESOLUTION_FACTOR * torch.finfo(KS.dtype).eps * lam * norms2
    if bool(nonzero.all()) and _keeps_every_column(G, 0, 0.0, atol):
        return None
    return independent_columns(G, rtol=0.0, atol=atol)


#: Dense actions whose :math:`S^\top S` has a larger condition number are replaced by an
#: orthonormal basis of their span before the kernel product (pseudo-inputs at nearby points).
#: CG directions and sketches stay far below it (unit-norm CG directions: about 1e4).
ORTHONORMALISE_ABOVE = 1e6


def _products(
    actions: Actions, kernel: KernelFn, X: torch.Tensor, residual: torch.Tensor, StS: torch.Tensor | None = None
):
    r""":math:`KS` (the one matrix-free kernel pass), :math:`S^\top K S`, :math:`S^\top S`, :math:`S^\top r`."""
    KS = actions.kernel_product(kernel, X, X)
    StS = actions.gram().double() if StS is None else StS
    return KS, _sym(actions.t_matmul(KS.double())), StS, actions.t_matmul(residual.double())


def _orthonormalised(actions: DenseActions) -> DenseActions:
    r"""Actions :math:`S T` with the span of :math:`S` and orthonormal columns: :math:`T = V\Sigma^{-1}`
    from the thin SVD :math:`S = U \Sigma V^\top` (float64, without singular values below the rounding of
    :math:`S`'s own dtype),
    largest first. The SVD of :math:`S` itself resolves singular values down to :math:`\epsilon\sigma_{\max}`;
    an eigendecomposition of :math:`S^\top S` squares the condition number and lost every direction below
    :math:`\sqrt\epsilon\,\sigma_{\max}` (with 30 pseudo-inputs 14 of them: a mean 0.2 off the exact GP's).
    :math:`T` is held fixed, so gradients still reach :math:`S` (e.g. learned pseudo-inputs)."""
    S = actions.S.detach().double()
    _, sv, Vh = torch.linalg.svd(S, full_matrices=False)
    # singular values below S's own rounding (float32 CG directions past float32's resolution) are noise
    keep = sv > sv.max() * torch.finfo(actions.S.dtype).eps
    T = Vh[keep].T / sv[keep]
    return DenseActions((actions.S.double() @ T).to(actions.S.dtype))


def _ill_conditioned(StS: torch.Tensor) -> bool:
    StS = StS.detach()
    if not torch.isfinite(StS).all():
        return False  # left to safe_cholesky, which names the problem
    evals = torch.linalg.eigvalsh(StS)
    return not bool(evals[0] * ORTHONORMALISE_ABOVE > evals[-1])


def project(
    actions: Actions,
    kernel: KernelFn,
    X: torch.Tensor,
    residual: torch.Tensor,
    noise: torch.Tensor,
) -> ActionProjection:
    r"""Compute the :class:`ActionProjection` (one matrix-free product :math:`K S`).

    The projection depends on the span of the actions only, so dense actions (CG directions,
    sketches, pseudo-inputs) are free to change basis where that is more accurate:

    * near-dependent columns (:math:`\operatorname{cond}(S^\top S) >` ``ORTHONORMALISE_ABOVE``, e.g.
      pseudo-inputs close together) are replaced by an orthonormal basis of their span first:
      even in float64 the Gram matrix :math:`G` of such columns is too ill-conditioned for an
      accurate ELBO;
    * if the kernel product's precision does not resolve :math:`G` (:func:`resolved_columns`, e.g.
      float32), the actions are orthonormalised (one more kernel product) and columns still
      unresolved are dropped.

    CG directions and sketches with float64 products pass both checks unchanged.
    """
    check_inputs("X", X)
    check_inputs("residual", residual)
    check_noise("noise", noise)
    noise = torch.as_tensor(noise).double()
    if not (isinstance(actions, DenseActions) and actions.num_actions > 0):
        return _factorise(actions, residual, noise, *_products(actions, kernel, X, residual))
    StS = actions.gram()
    orthonormal = _ill_conditioned(StS)
    if orthonormal:
        actions = _orthonormalised(actions)
        StS = None
    KS, StKS, StS, Str = _products(actions, kernel, X, residual, StS)
    keep = resolved_columns(KS, StKS + noise * StS, StS)
    if keep is not None and not orthonormal:
        actions = _orthonormalised(actions)
        KS, StKS, StS, Str = _products(actions, kernel, X, residual)
        keep = resolved_columns(KS, StKS + noise * StS, StS)
    if keep is not None:
        actions = DenseActions(actions.S[:, keep])
        KS, StKS, StS, Str = KS[:, keep], StKS[keep][:, keep], StS[keep][:, keep], Str[keep]
    return _factorise(actions, residual, noise, KS, StKS, StS, Str)


def project_extended(
    base: Actions,
    extra: Actions,
    kernel: KernelFn,
    X: torch.Tensor,
    residual: torch.Tensor,
    noise: torch.Tensor,
    rtol: float = 1e-6,
) -> ActionProjection:
    r"""The projection onto :math:`[S_{\text{base}}, S_{\text{extra}}]`. If the stacked actions are
    dependent, a best-conditioned subset of them spanning the same space is kept
    (:func:`pivoted_independent_columns`, chosen before :math:`G` is factorised, from the same kernel
    pass); partly kept parts other than unit vectors are stored densely. Dense base actions go through
    :func:`project` with the extra ones as one dense matrix (orthonormalised where needed)."""
    check_inputs("X", X)
    check_inputs("residual", residual)
    check_noise("noise", noise)
    extras = extra.parts if isinstance(extra, StackedActions) else [extra]
    if isinstance(base, DenseActions):
        # dense base actions (pseudo-inputs, sketches, CG) can be nearly dependent on the new ones in ways a
        # pivot test misses (cond(G) ~ 1e18 with pseudo-inputs: a mean 20 off); project() orthonormalises
        # the stacked columns and drops the unresolved ones instead
        stacked = torch.cat([base.S, *(part.dense().to(base.S.dtype) for part in extras)], 1)
        return project(DenseActions(stacked), kernel, X, residual, noise)
    noise = torch.as_tensor(noise).double()
    actions = StackedActions([base, *extras])
    KS, StKS, StS, Str = _products(actions, kernel, X, residual)
    G = StKS + noise * StS
    if not _keeps_every_column(G, base.num_actions, rtol):
        # a dependent span: choose its best-conditioned columns, whichever part they come from. Keeping every
        # base action first and testing the extra ones in order dropped converged CG directions that carry
        # the solution (noise 1e-6: a mean 29 off the exact GP, which the CG directions alone reproduce)
        keep = pivoted_independent_columns(G, rtol=rtol)
        actions = StackedActions(_kept_columns([base, *extras], keep))
        KS, StKS, StS, Str = KS[:, keep], StKS[keep][:, keep], StS[keep][:, keep], Str[keep]
    return _factorise(actions, residual, noise, KS, StKS, StS, Str)


def pivoted_independent_columns(G: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    r"""A best-conditioned set of independent columns of a Gram matrix :math:`G` (sorted indices): greedy
    pivoted Cholesky of the correlation matrix :math:`D^{-1/2} G D^{-1/2}`, each step taking the column
    with the largest unexplained part, until none exceeds ``rtol`` (the relative pivot test of
    :func:`independent_columns`, but independent of the column order).

    Example::

        >>> G = torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [3.0, 3.0, 6.0]], dtype=torch.float64)
        >>> pivoted_independent_columns(G).tolist()  # any two of the three span all
        [0, 1]
    """
    m = G.shape[0]
    d = G.diagonal().clamp_min(torch.finfo(G.dtype).tiny)
    C = G / (d[:, None] * d[None, :]).sqrt()
    remaining = C.diagonal().clone()
    L = G.new_zeros(m, 0)
    chosen: list[int] = []
    for _ in range(m):
        j = int(torch.argmax(remaining))
        if not remaining[j] > rtol:
            break
        column = (C[:, j] - L @ L[j]) / remaining[j].sqrt()
        L = torch.cat([L, column[:, None]], 1)
        remaining = remaining - column**2
        remaining[chosen + [j]] = -math.inf
        chosen.append(j)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _kept_columns(parts: list[Actions], keep: torch.Tensor) -> list[Actions]:
    """``parts`` with only the columns ``keep`` (indices into their stacked columns); unit vectors stay
    unit vectors, other parts become dense."""
    out, offset = [], 0
    for part in parts:
        chosen = keep[(keep >= offset) & (keep < offset + part.num_actions)] - offset
        if len(chosen) == part.num_actions:
            out.append(part)
        elif len(chosen) and isinstance(part, IndexActions):
            out.append(IndexActions(part.indices[chosen], part.num_data, part.dtype))
        elif len(chosen):
            out.append(DenseActions(part.dense()[:, chosen]))
        offset += part.num_actions
    return out


def _keeps_every_column(G: torch.Tensor, start: int, rtol: float, atol: float | torch.Tensor = 0.0) -> bool:
    """Whether :func:`independent_columns` keeps every column: then its pivots, taken in order, are the squared
    diagonal of :math:`G`'s Cholesky factor (one factorisation instead of the column-by-column loop)."""
    full, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return False
    pivots = full.diagonal()[start:] ** 2
    atol = torch.as_tensor(atol, dtype=G.dtype).expand(G.shape[0])[start:]
    return bool(((pivots > rtol * G.diagonal()[start:]) & (pivots > atol)).all())


def independent_columns(
    G: torch.Tensor, start: int = 0, rtol: float = 1e-6, atol: float | torch.Tensor = 0.0
) -> torch.Tensor:
    r"""Columns of a Gram matrix :math:`G = S^\top \hat K S` whose actions add to the span of the others.

    The first ``start`` columns are kept; each later column :math:`j` is kept, in order, if its
    pivot (the part of :math:`s_j` that the kept actions do not explain, in the :math:`\hat K`
    inner product),

    .. math::

        p_j = G_{jj} - G_{Jj}^\top G_{JJ}^{-1} G_{Jj},

    exceeds ``rtol`` :math:`G_{jj}` and ``atol`` (a number, or one per column). The posterior
    depends on :math:`\operatorname{span}(S)` only, so dropping the others changes nothing but the
    conditioning: CG directions whose conjugacy float32 kernel products destroyed would otherwise
    make :math:`G` singular.

    Example::

        >>> G = torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [3.0, 3.0, 6.0]], dtype=torch.float64)
        >>> independent_columns(G).tolist()  # column 3 is the sum of the first two
        [0, 1]
    """
    check_tolerance("rtol", rtol)
    if not torch.is_tensor(atol):
        check_tolerance("atol", atol)
    m = G.shape[0]
    if not 0 <= start <= m:
        raise ValueError(f"start must be in [0, {m}], got {start}")
    atol = torch.as_tensor(atol, dtype=G.dtype).expand(m)
    if _keeps_every_column(G, start, rtol, atol):
        return torch.arange(m)
    keep = list(range(start))
    L = safe_cholesky(G[:start, :start], "the Gram matrix of the kept actions") if start else G.new_zeros(0, 0)
    for j in range(start, m):
        c = torch.linalg.solve_triangular(L, G[keep, j : j + 1], upper=False)[:, 0] if keep else G.new_zeros(0)
        pivot = G[j, j] - c @ c
        if not (pivot > rtol * G[j, j] and pivot > atol[j]):
            continue
        row = torch.cat([c, pivot.sqrt()[None]])
        L = torch.cat([torch.cat([L, L.new_zeros(len(keep), 1)], 1), row[None]], 0)
        keep.append(j)
    return torch.tensor(keep, dtype=torch.long)
