r"""Computation-aware posterior moments at new inputs.

With the :class:`~pyro_gpx.gp.projection.ActionProjection` of the training data [1],

.. math::

    \mu_i(x) = \mu(x) + k(x, X) S w, \qquad
    k_i(x, x') = k(x, x') - k(x, X) S G^{-1} S^\top k(X, x').

The combined covariance splits into the mathematical part (exact GP with all data) and the
computational part (what limited computation left unresolved):

.. math::

    k_i = \underbrace{k - k_X \hat K^{-1} k_X}_{\text{mathematical}}
        + \underbrace{k_X(\hat K^{-1} - C)k_X}_{\text{computational}\ \geq 0},

so the combined variance is never smaller than the exact GP's [1]. Prediction costs one row of
kernel products per test point, :math:`O(n_* n)`.

References:

[1] J. Wenger, G. Pleiss, M. Pförtner, P. Hennig, J. Cunningham. Posterior and computational
    uncertainty in Gaussian processes. NeurIPS 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_inputs, check_noise
from .cholesky import safe_cholesky
from .kernel_fn import KernelFn
from .projection import ActionProjection

__all__ = ["PosteriorMoments", "posterior_moments", "exact_posterior_variance", "MAX_DENSE"]

#: Largest training set for which the mathematical (exact) variance is computed by dense Cholesky.
MAX_DENSE = 8000


@dataclass
class PosteriorMoments:
    """Posterior of :math:`f` at new inputs (noise not included).

    :ivar mean: ``(m,)``.
    :ivar covariance: ``(m,)`` variances, or ``(m, m)`` with ``full_cov``: the combined uncertainty.
    :ivar mathematical: the exact GP's part (same shape), if requested.
    :ivar computational: ``covariance - mathematical``, if requested.
    :ivar noise: the observation noise variance the posterior conditioned on (with the jitter).
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    mathematical: torch.Tensor | None = None
    computational: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def posterior_moments(
    projection: ActionProjection,
    kernel: KernelFn,
    X: torch.Tensor,
    X_new: torch.Tensor,
    prior_mean_new: torch.Tensor,
    full_cov: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined posterior mean and covariance (or variance) at ``X_new``, in float64."""
    check_inputs("X_new", X_new)
    check_inputs("prior_mean_new", prior_mean_new)
    KxS = projection.actions.kernel_product(kernel, X_new, X).double()
    mean = prior_mean_new.double() + KxS @ projection.weights
    root = torch.linalg.solve_triangular(projection.chol_G, KxS.T, upper=False)  # (i, m)
    if full_cov:
        cov = kernel(X_new, X_new).double() - root.T @ root
        return mean, 0.5 * (cov + cov.T)
    var = kernel.diag(X_new).double() - (root**2).sum(0)
    return mean, var.clamp_min(0)


def exact_posterior_variance(
    kernel: KernelFn, X: torch.Tensor, X_new: torch.Tensor, noise: torch.Tensor, full_cov: bool = False
) -> torch.Tensor:
    r"""The exact GP's (mathematical) posterior covariance by dense Cholesky of :math:`\hat K`.

    :raises ValueError: above :data:`MAX_DENSE` training points (the point of computation-aware
        inference is not to form :math:`\hat K`).
    """
    check_inputs("X", X)
    check_inputs("X_new", X_new)
    check_noise("noise", noise)
    n = X.shape[0]
    if n > MAX_DENSE:
        raise ValueError(
            f"the mathematical/computational split needs an exact solve; {n} training points exceed "
            f"MAX_DENSE={MAX_DENSE}"
        )
    K = kernel(X, X).double()
    K.diagonal().add_(torch.as_tensor(noise).double())
    L = safe_cholesky(K, "K + noise I")
    root = torch.linalg.solve_triangular(L, kernel(X, X_new).double(), upper=False)
    if full_cov:
        cov = kernel(X_new, X_new).double() - root.T @ root
        return 0.5 * (cov + cov.T)
    return (kernel.diag(X_new).double() - (root**2).sum(0)).clamp_min(0)
