r"""Re-selecting the noise variance by the CaGP ELBO once the actions are fixed (e.g. after refinement).

CaGP-Opt trains the kernel hyperparameters, the noise :math:`\sigma^2` and the actions :math:`S`
together by the ELBO :math:`\mathcal{L}(\theta, \sigma^2, S)` [1]. Data that the actions cannot
represent count as noise, so the trained :math:`\sigma^2` is larger than the exact GP's. Prediction-time
refinement appends CG actions (:meth:`~pyro_gpx.gp.ComputationAwareGP.posterior` with ``refine=``),
which explain more of the data, but the noise stays that of the smaller projection. This module
maximises the same ELBO over the noise alone with the extended actions fixed:

.. math::

    \hat\sigma^2 = \arg\max_{\sigma^2} \mathcal{L}(\theta, \sigma^2, [S, S_{\text{refine}}]).

Only :math:`G = S^\top K S + \sigma^2 S^\top S` depends on :math:`\sigma^2`, so every trial costs an
:math:`i \times i` Cholesky factorisation and :math:`O(ni)` work, with no new kernel product
(a triangular factor of :math:`KS` is formed once). With complete actions the ELBO is the exact log marginal
likelihood, and :math:`\hat\sigma^2` is its maximiser in the noise at the given kernel.

References:

[1] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .._validation import is_finite_at_least
from ._checks import check_inputs, check_tolerance
from ._search import grid_golden_bracket
from .projection import ActionProjection, _factorise, _sym

__all__ = ["refit_noise"]


def _elbo_at(projection: ActionProjection, diag_K: torch.Tensor, KS_factor: torch.Tensor, noise: float) -> float:
    """The CaGP ELBO of ``projection``'s actions at noise variance ``noise`` (``-inf`` where :math:`G`
    is not numerically positive-definite: no jitter, which would bias the score)."""
    noise_t = torch.tensor(noise, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(_sym(projection.StKS + noise_t * projection.StS))
    if info.any():
        return -math.inf
    weights = torch.cholesky_solve(projection.Str[:, None], L)[:, 0]
    trial = dataclasses.replace(projection, noise=noise_t, chol_G=L, weights=weights)
    value = float(trial.elbo(diag_K, KS_factor=KS_factor))
    return value if math.isfinite(value) else -math.inf


@torch.no_grad()
def refit_noise(
    projection: ActionProjection,
    diag_K: torch.Tensor,
    bounds: tuple[float, float] = (1e-3, 10.0),
    min_noise: float = 0.0,
    rtol: float = 1e-3,
) -> ActionProjection:
    r"""The projection onto the same actions at the noise variance that maximises the CaGP ELBO.

    The search runs over :math:`\log\sigma^2` between ``bounds`` times the projection's noise: a
    coarse grid of 15 points, then golden-section search around the best of them, to a relative
    width ``rtol``. Trials where :math:`G` is not numerically positive-definite score :math:`-\infty`.

    :param projection: e.g. :meth:`~pyro_gpx.gp.ComputationAwareGP.refined_projection`'s (float64).
    :param diag_K: :math:`\operatorname{diag} K(X, X)`, ``(n,)``.
    :param bounds: the multipliers of the current noise searched over, ``0 < low < high``.
    :param min_noise: a floor for the result (e.g. the model's jitter).
    :returns: the refactorised :class:`~pyro_gpx.gp.projection.ActionProjection` (``.noise`` is
        :math:`\hat\sigma^2`); the projection itself if no trial improves on its noise.

    Example (complete actions: the maximiser of the exact marginal likelihood in the noise)::

        >>> import torch
        >>> from pyro_gpx.gp import IndexActions, KernelFn, project
        >>> from pyro_gpx.gp.noise_refit import refit_noise
        >>> import gpytorch
        >>> gen = torch.Generator().manual_seed(0)
        >>> X = torch.linspace(0, 1, 40, dtype=torch.float64)[:, None]
        >>> y = torch.sin(6 * X[:, 0]) + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)
        >>> kernel = KernelFn(gpytorch.kernels.RBFKernel().double())
        >>> start = project(IndexActions(torch.arange(40), 40), kernel, X, y, torch.tensor(0.5))
        >>> refitted = refit_noise(start, kernel.diag(X))
        >>> round(float(refitted.noise), 3)  # the exact likelihood's maximiser, 0.1386 (full actions)
        0.139
    """
    low, high = bounds
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    if not (is_finite_at_least(rtol, 0.0, strict=True) and rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    check_tolerance("min_noise", min_noise)
    check_inputs("diag_K", diag_K)
    if diag_K.shape != (projection.num_data,):
        raise ValueError(f"diag_K has shape {tuple(diag_K.shape)}; expected ({projection.num_data},)")
    noise0 = float(projection.noise)
    diag_K = diag_K.double()
    # float64 copies made once, not in every trial's ELBO (a float32 KS would be converted each time)
    trials = dataclasses.replace(projection, KS=projection.KS.double(), residual=projection.residual.double())
    KS_factor = torch.linalg.qr(trials.KS, mode="r")[1]  # R^T R = (KS)^T KS, without forming it
    cache: dict[float, float] = {}

    def score(t: float) -> float:  # t = log multiplier
        if t not in cache:
            cache[t] = _elbo_at(trials, diag_K, KS_factor, max(noise0 * math.exp(t), min_noise))
        return cache[t]

    a, b = math.log(low), math.log(high)
    grid_golden_bracket(score, [a + (b - a) * k / 14 for k in range(15)], rtol)
    t_best = max(cache, key=cache.__getitem__)
    if cache[t_best] <= _elbo_at(trials, diag_K, KS_factor, noise0):
        return projection
    noise = torch.tensor(max(noise0 * math.exp(t_best), min_noise), dtype=torch.float64)
    return _factorise(projection.actions, projection.residual, noise, projection.KS, projection.StKS,
                      projection.StS, projection.Str)  # fmt: skip
