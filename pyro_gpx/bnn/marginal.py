r"""The marginal likelihood of a Gaussian-linear readout, as a Pyro distribution over the targets.

With readout inputs :math:`\tilde\Phi \in \mathbb{R}^{n \times D}` scaled by the prior standard
deviations, readout weights :math:`\tilde\theta \sim N(0, I)` and noise variance :math:`\lambda`, each
target column is :math:`y_{:,j} \sim N(0,\ C)` with :math:`C = \tilde\Phi\tilde\Phi^\top + \lambda I`,
independently over the :math:`d_{\text{out}}` columns. With fewer data than features
(:math:`n \le D`, wide networks) the density uses the Cholesky factor of :math:`C` (:math:`O(n^2 D)`);
otherwise the Woodbury identity with :math:`G = \tilde\Phi^\top\tilde\Phi + \lambda I = L_G L_G^\top`
(:math:`O(n D^2)`):

.. math::

    y^\top C^{-1} y = \big(\|y\|^2 - \|L_G^{-1}\tilde\Phi^\top y\|^2\big)/\lambda, \qquad
    \log\det C = (n - D)\log\lambda + 2\textstyle\sum_i \log (L_G)_{ii}.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .._linalg import gram
from .._validation import check_finite, check_positive_int, is_finite_at_least
from ..gp.cholesky import safe_cholesky

__all__ = ["GaussianLinearMarginal"]


def readout_event_shape(features: torch.Tensor, out_dim: int | None) -> torch.Size:
    """The targets' shape, ``(n,)`` or ``(n, out_dim)``, for readout inputs ``features`` ``(n, D)``."""
    if not (isinstance(features, torch.Tensor) and features.is_floating_point()):
        raise TypeError(f"features must be a floating-point tensor, got {getattr(features, 'dtype', type(features))}")
    if features.dim() != 2:
        raise NotImplementedError(f"features must be an (n, D) matrix (no batch), got shape {tuple(features.shape)}")
    if out_dim is not None:
        out_dim = check_positive_int("out_dim", out_dim)
    n = features.shape[0]
    if n < 1:
        raise ValueError("features must have at least one row (data point)")
    return torch.Size((n,) if out_dim is None else (n, out_dim))


def target_columns(value: torch.Tensor, event_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Targets of shape ``event_shape`` as an ``(n, d)`` matrix of ``dtype``."""
    if value.shape != event_shape:
        raise ValueError(f"value must have shape {tuple(event_shape)}, got {tuple(value.shape)}")
    check_finite("value (the targets)", value)
    return value.reshape(value.shape[0], -1).to(dtype)


class GaussianLinearMarginal(dist.TorchDistribution):
    r"""Targets of a Bayesian linear readout with the weights integrated out (see the module docstring).

    :param features: :math:`\tilde\Phi`, ``(n, D)``, already scaled by the readout's prior standard deviations.
    :param noise: the noise variance :math:`\lambda > 0` (a scalar).
    :param out_dim: ``None`` for targets of shape ``(n,)``, else the number of target columns, ``(n, out_dim)``.

    Example::

        >>> Phi = torch.randn(6, 3, dtype=torch.float64)
        >>> d = GaussianLinearMarginal(Phi, torch.tensor(0.5, dtype=torch.float64))
        >>> exact = dist.MultivariateNormal(torch.zeros(6, dtype=torch.float64), Phi @ Phi.T + 0.5 * torch.eye(6))
        >>> y = torch.randn(6, dtype=torch.float64)
        >>> bool(torch.isclose(d.log_prob(y), exact.log_prob(y)))
        True
    """

    #: draws integrate the latents over their prior: not posterior predictive draws (see to_inference_data)
    integrates_out_latents = True
    #: refuse non-finite features (bad input); a sampler's potential energy uses :class:`_TrajectoryMarginal`
    _check_features = True

    arg_constraints = {"noise": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, features: torch.Tensor, noise: torch.Tensor | float, out_dim: int | None = None,
                 validate_args=None):  # fmt: skip
        event_shape = readout_event_shape(features, out_dim)
        out_dim = None if out_dim is None else event_shape[-1]
        if self._check_features:
            check_finite("features", features)
        if not isinstance(noise, torch.Tensor) and not is_finite_at_least(noise, 0.0, strict=True):
            raise ValueError(f"noise must be a finite positive number, got {noise!r}")
        noise = torch.as_tensor(noise, dtype=features.dtype)
        if noise.dim() != 0:
            raise NotImplementedError(f"noise must be a scalar, got shape {tuple(noise.shape)}")
        if bool(noise <= 0):  # an infinite one (an overflowing trajectory) has zero density instead
            raise ValueError(f"noise must be positive, got {float(noise)}")
        self.features, self.noise, self.out_dim = features, noise, out_dim
        super().__init__(torch.Size(), event_shape, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        Y = target_columns(value, self.event_shape, self.features.dtype)
        Phi, noise = self.features, self.noise
        n, D = Phi.shape
        d = Y.shape[-1]
        # the sum is non-finite if any entry is: hidden weights that overflow the features (an unstable
        # leapfrog trajectory in warm-up) get zero density, which HMC/NUTS reject like any NaN energy
        if not (torch.isfinite(Phi.sum()) and torch.isfinite(noise)):
            return torch.tensor(-math.inf, dtype=Phi.dtype)
        if n <= D:
            C = gram(Phi.T) + noise * torch.eye(n, dtype=Phi.dtype)
            L = safe_cholesky(C, "the readout marginal covariance Phi Phi^T + noise I")
            quad = torch.linalg.solve_triangular(L, Y, upper=False).square().sum()
            logdet = 2 * d * L.diagonal().log().sum()
        else:
            G = gram(Phi) + noise * torch.eye(D, dtype=Phi.dtype)
            L = safe_cholesky(G, "the readout Gram matrix Phi^T Phi + noise I")
            b = torch.linalg.solve_triangular(L, Phi.T @ Y, upper=False)
            quad = (Y.square().sum() - b.square().sum()) / noise
            logdet = d * ((n - D) * noise.log() + 2 * L.diagonal().log().sum())
        return -0.5 * (quad + logdet + n * d * math.log(2 * math.pi))

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        Phi = self.features
        d = 1 if self.out_dim is None else self.out_dim
        shape = torch.Size(sample_shape)
        theta = torch.randn(shape + (Phi.shape[-1], d), dtype=Phi.dtype)
        eps = torch.randn(shape + (Phi.shape[0], d), dtype=Phi.dtype)
        y = Phi @ theta + self.noise.sqrt() * eps
        return y.reshape(shape + self.event_shape)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("GaussianLinearMarginal has no batch shape (vectorised draws are not supported)")
        return self


class _TrajectoryMarginal(GaussianLinearMarginal):
    """For a sampler's model: features that overflow (an unstable leapfrog trajectory) give zero density
    in :meth:`log_prob`, which HMC/NUTS reject, instead of raising."""

    _check_features = False
