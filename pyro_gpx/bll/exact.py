r"""The exact last-layer posterior and evidence of a Gaussian-prior, Gaussian-head last layer.

With the features :math:`\Phi` (``(n, D)``), noise :math:`\sigma^2` and prior scale :math:`s` held at
their current values, the last layer is Bayesian linear regression [1, ch. 3.3]:

.. math::

    P = \frac{\Phi^\top\Phi}{\sigma^2} + \frac{I}{s^2}, \qquad
    p(w \mid y) = N\Big(P^{-1}\frac{\Phi^\top y}{\sigma^2},\ P^{-1}\Big),

    \log p(y) = -\frac12\Big[n \log 2\pi\sigma^2 + 2D\log s + \log|P|
        + \frac{\|y - \Phi m\|^2}{\sigma^2} + \frac{\|m\|^2}{s^2}\Big], \quad
    m = P^{-1}\frac{\Phi^\top y}{\sigma^2},

(the matrix determinant lemma and Woodbury's identity on :math:`N(y; 0, s^2\Phi\Phi^\top + \sigma^2 I)`;
the quadratic form as a sum of non-negative terms, which does not cancel as
:math:`y^\top y/\sigma^2 - b^\top P^{-1} b/\sigma^4` does). :math:`\Phi^\top\Phi` and :math:`\Phi^\top y`
are accumulated over row chunks, and the evidence's residual takes a second pass, so the cost is
:math:`O(nD^2)` time and :math:`O(D^2)` memory.

:math:`\log p(y)` is the largest value the deterministic ELBO (:class:`~pyro_gpx.bll.elbo.LastLayerELBO`)
can reach at these features, so ``log_evidence(...) - (-LastLayerELBO().loss(...))`` measures how far a
trained :class:`~pyro_gpx.bll.guide.LastLayerNormal` is from its optimum (both at the same features: these
functions read them in eval mode, so with BatchNorm or dropout in the feature network evaluate the ELBO
under ``model.eval()`` too; in training mode it sees per-batch features, 215 nats apart on one example,
and its evaluation moves BatchNorm's running statistics), and
:meth:`~pyro_gpx.bll.guide.LastLayerNormal.set_posterior` moves it there. Joint SVI of features and
guide can stop far from it: on UCI targets with 5% heavy-tailed outliers the trained guide's ELBO was
18 to 4 458 nats below :math:`\log p(y)` (clean targets: 3 to 30, naval 2 082 to 2 896), and the exact
posterior fitted the outliers more than the guide did (``benchmarks/bll.py``, README).

References:

[1] C. M. Bishop. Pattern Recognition and Machine Learning. Springer, 2006.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn

from .._validation import check_positive_int
from .heads import GaussianHead
from .model import BayesianLastLayer, _check_batch, evaluation_mode
from .priors import GaussianWeightPrior

__all__ = ["exact_posterior", "log_evidence"]

#: layers whose output depends on the training mode
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _design_chunks(model: BayesianLastLayer, X: torch.Tensor, y: torch.Tensor, chunk_size: int):
    """``(Φ, y)`` row chunks in float64 at the store's current values, with no graph; in eval mode,
    so BatchNorm uses (and keeps) its running statistics."""
    with torch.no_grad(), model._pyro_context, evaluation_mode(model):
        for start in range(0, X.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            yield model.design(X[rows]).to(torch.float64), y[rows].to(torch.float64)


def _statistics(model: BayesianLastLayer, X: torch.Tensor, y: torch.Tensor, chunk_size: int):
    """``(P, b, y, σ², s)`` at the model's current features, noise and prior scale (``y`` checked)."""
    if not isinstance(model, BayesianLastLayer):
        raise TypeError(f"model must be a BayesianLastLayer, got {type(model).__name__}")
    if not isinstance(model.head, GaussianHead):
        raise ValueError(f"the exact posterior needs a GaussianHead; this model's head is {type(model.head).__name__}")
    if not isinstance(model.prior, GaussianWeightPrior):
        raise ValueError(
            f"the exact posterior needs a GaussianWeightPrior; this model's prior is {type(model.prior).__name__}"
        )
    chunk_size = check_positive_int("chunk_size", chunk_size)
    _check_batch("X", X)
    mode_dependent = [m for m in model.modules() if m.training and isinstance(m, _MODE_DEPENDENT)]
    if mode_dependent:
        warnings.warn(
            f"the exact last layer reads the features in eval mode, but {type(mode_dependent[0]).__name__} in the "
            "feature network is in training mode, where its features differ (batch statistics, dropout): compare "
            "with a LastLayerELBO evaluated under model.eval()",
            UserWarning,
            stacklevel=3,
        )
    y = model.head.check_targets(y, X.shape[0])
    D = model.weight_shape[1]
    # float64 whatever the model's dtype: P can be ill-conditioned
    f64: dict[str, Any] = dict(dtype=torch.float64, device=X.device)
    with torch.no_grad(), model._pyro_context:
        noise, scale = model.head.noise.to(**f64), model.prior.scale.to(**f64)
    A = torch.zeros(D, D, **f64)
    b = torch.zeros(D, **f64)
    for Phi, y_rows in _design_chunks(model, X, y, chunk_size):
        A += Phi.T @ Phi
        b += Phi.T @ y_rows
    P = A / noise + torch.eye(D, **f64) / scale**2
    return 0.5 * (P + P.T), b, y, noise, scale


def _cholesky(matrix: torch.Tensor, noise: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of the posterior precision (or covariance), or a ``ValueError`` saying why
    it has none in float64 rather than torch's ``LinAlgError``."""
    L, info = torch.linalg.cholesky_ex(matrix)
    if int(info):
        raise ValueError(
            f"the last layer's posterior precision Phi^T Phi / noise + I / scale^2 is numerically singular in "
            f"float64 (noise {float(noise):.3g}, prior scale {float(scale):.3g}; e.g. collinear features with a "
            "tiny noise): no exact posterior at these values; raise the noise or lower the prior scale"
        )
    return L


def exact_posterior(
    model: BayesianLastLayer, X: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 4096
) -> dist.MultivariateNormal:
    """The exact posterior of the last-layer weights given the model's current features, noise and
    prior scale, as :class:`~pyro_gpx.bll.guide.LastLayerNormal`'s base distribution is: batch shape
    ``(1,)`` (the one output row), event shape ``(D,)``, in ``X``'s dtype (computed in float64).

    :param model: a :class:`~pyro_gpx.bll.model.BayesianLastLayer` with a
        :class:`~pyro_gpx.bll.heads.GaussianHead` and a :class:`~pyro_gpx.bll.priors.GaussianWeightPrior`.
    :param X: all training inputs ``(n, inputs)``; :param y: their targets ``(n,)``.
    :param chunk_size: rows per feature-network call (memory only: the feature network runs in eval
        mode, so BatchNorm uses its running statistics, which stay as they were).

    >>> import torch
    >>> from pyro_gpx.bll import BayesianLastLayer, GaussianHead, GaussianWeightPrior, exact_posterior
    >>> model = BayesianLastLayer(None, 1, GaussianHead(0.01, learn_noise=False), GaussianWeightPrior(10.0))
    >>> X = torch.linspace(-1, 1, 50, dtype=torch.float64)[:, None]
    >>> q = exact_posterior(model, X, 2 * X[:, 0] + 1)
    >>> [round(v, 3) for v in q.loc[0].tolist()]  # slope, bias
    [2.0, 1.0]
    """
    P, b, _, noise, scale = _statistics(model, X, y, chunk_size)
    L = _cholesky(P, noise, scale)
    cov = torch.cholesky_inverse(L)
    mean = torch.cholesky_solve((b / noise)[:, None], L)[:, 0]
    cov = 0.5 * (cov + cov.T)
    return dist.MultivariateNormal(mean[None].to(X.dtype), scale_tril=_cholesky(cov, noise, scale)[None].to(X.dtype))


def log_evidence(model: BayesianLastLayer, X: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 4096) -> float:
    """:math:`\\log p(y)` with the last-layer weights integrated out, at the model's current features,
    noise and prior scale: the optimum of :class:`~pyro_gpx.bll.elbo.LastLayerELBO` over Gaussian
    guides. Arguments as :func:`exact_posterior`."""
    P, b, y, noise, scale = _statistics(model, X, y, chunk_size)
    L = _cholesky(P, noise, scale)
    mean = torch.cholesky_solve((b / noise)[:, None], L)[:, 0]  # the posterior mean m
    n, D = X.shape[0], P.shape[0]
    logdet_P = 2 * L.diagonal().log().sum()
    # |y - Phi m|^2 / s2 + |m|^2 / s^2 rather than y'y / s2 - b'P^-1 b / s2^2, which cancels (a target
    # offset of 1e4 at noise 1e-6 lost a nat): one more pass over X
    rss = sum(((y_rows - Phi @ mean).square().sum() for Phi, y_rows in _design_chunks(model, X, y, chunk_size)))
    quad = rss / noise + mean @ mean / scale**2
    value = -0.5 * (n * math.log(2 * math.pi) + n * noise.log() + 2 * D * scale.log() + logdet_P + quad)
    return float(value)
