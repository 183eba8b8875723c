r"""SWAG moments of SGD iterates: pure functions, state in, state out.

Over iterates :math:`\theta_1, \dots, \theta_T` (one per epoch at a constant or cyclic learning rate),
SWA-Gaussian [1] keeps

.. math::

    \bar\theta = \frac1T\sum_t \theta_t, \qquad
    \overline{\theta^2} = \frac1T\sum_t \theta_t^2, \qquad
    \Sigma_{\text{diag}} = \overline{\theta^2} - \bar\theta^2, \qquad
    \hat D = [\theta_t - \bar\theta_t]_{t = T-K+1}^{T},

where :math:`\bar\theta_t` is the running mean after iterate :math:`t` and :math:`\hat D` holds the
last :math:`K` deviations (memory :math:`O(KP)` for :math:`P` parameters). The approximate posterior
is :math:`N(\bar\theta, \Sigma)` with :math:`\Sigma = \tfrac12(\Sigma_{\text{diag}} + \hat D\hat D^\top/(K-1))`;
samples :math:`\bar\theta + \sqrt{s}\,(\Sigma_{\text{diag}}^{1/2} z_1 + \hat D z_2/\sqrt{K-1})` with the
default scale :math:`s = 1/2` have exactly that covariance. With fewer than :math:`K` iterates,
:math:`K` is the number collected.

References:

[1] W. Maddox, T. Garipov, P. Izmailov, D. Vetrov, A. Wilson. A simple baseline for Bayesian
    uncertainty in deep learning. NeurIPS 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch

from .._validation import check_finite

__all__ = ["SWAGMoments", "init_moments", "update_moments", "diagonal_variance", "swag_distribution", "MIN_VARIANCE"]

#: floor on the diagonal variance (parameters that never moved), as in the reference implementation
MIN_VARIANCE = 1e-30


@dataclass(frozen=True)
class SWAGMoments:
    """Running SWAG statistics of a flat parameter vector.

    :ivar num_snapshots: iterates collected so far.
    :ivar mean: :math:`\\bar\\theta`, shape ``(P,)``.
    :ivar sq_mean: :math:`\\overline{\\theta^2}`, shape ``(P,)``.
    :ivar deviations: the last ``max_rank`` deviations, oldest first, shape ``(k, P)``.
    """

    num_snapshots: int
    mean: torch.Tensor
    sq_mean: torch.Tensor
    deviations: torch.Tensor
    max_rank: int

    @property
    def rank(self) -> int:
        return self.deviations.shape[0]


def init_moments(num_params: int, max_rank: int = 20, dtype: torch.dtype = torch.float64) -> SWAGMoments:
    if num_params < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    zeros = torch.zeros(num_params, dtype=dtype)
    return SWAGMoments(0, zeros, zeros.clone(), torch.zeros(0, num_params, dtype=dtype), max_rank)


def update_moments(moments: SWAGMoments, theta: torch.Tensor) -> SWAGMoments:
    """Add one iterate; returns the new statistics (the input is not modified)."""
    theta = theta.detach().reshape(-1).to(moments.mean.dtype)
    if theta.shape != moments.mean.shape:
        raise ValueError(f"theta has {theta.numel()} entries; these moments track {moments.mean.numel()}")
    check_finite("theta", theta)
    n = moments.num_snapshots + 1
    mean = moments.mean + (theta - moments.mean) / n
    sq_mean = moments.sq_mean + (theta**2 - moments.sq_mean) / n
    deviations = torch.cat([moments.deviations, (theta - mean)[None]])[-moments.max_rank :]
    return SWAGMoments(n, mean, sq_mean, deviations, moments.max_rank)


def diagonal_variance(moments: SWAGMoments) -> torch.Tensor:
    r""":math:`\Sigma_{\text{diag}} = \overline{\theta^2} - \bar\theta^2`, floored at :data:`MIN_VARIANCE`."""
    return (moments.sq_mean - moments.mean**2).clamp_min(MIN_VARIANCE)


def swag_distribution(moments: SWAGMoments, scale: float = 0.5, diag_only: bool = False) -> dist.TorchDistribution:
    r"""The SWAG Gaussian: ``LowRankMultivariateNormal`` (or diagonal ``Normal`` with
    ``diag_only``) with covariance :math:`s(\Sigma_{\text{diag}} + \hat D\hat D^\top/(k-1))`.

    :raises ValueError: with fewer than 2 iterates (no spread to estimate), or a non-positive scale.
    """
    if moments.num_snapshots < 2:
        raise ValueError(f"SWAG needs at least 2 collected iterates to sample; have {moments.num_snapshots}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    variance = scale * diagonal_variance(moments)
    if diag_only or moments.rank < 2:
        return dist.Normal(moments.mean, variance.sqrt()).to_event(1)
    factor = math.sqrt(scale / (moments.rank - 1)) * moments.deviations.T
    return dist.LowRankMultivariateNormal(moments.mean, factor, variance)
