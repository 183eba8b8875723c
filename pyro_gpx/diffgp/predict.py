r"""Posterior predictive of a :class:`~pyro_gpx.diffgp.DifferentialGP`, averaged over guide draws and
flow paths.

Every (draw, path) pair :math:`j = 1..J` gives a Gaussian :math:`\mathcal N(m_j, v_j + \sigma^2)` for
``y`` (regression) or class probabilities (classification, averaged over the output GP by Monte
Carlo); the predictive is their equal-weight mixture, so the log density is a log-mean-exp,

.. math:: \log p(y_*\mid x_*) \approx \log\tfrac1J\textstyle\sum_j \mathcal N(y_*; m_j, v_j + \sigma^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.poutine as poutine
import torch

from .._validation import check_finite, check_positive_int

__all__ = ["DiffGPPrediction", "predict"]


@dataclass
class DiffGPPrediction:
    """Mixture components ``loc``, ``var`` ``(J, n)`` (regression: ``var`` includes the noise) or
    per-component class probabilities ``probs_components`` ``(J, n, C)`` (classification; :attr:`probs`
    is their mean, ``(n, C)``)."""

    loc: torch.Tensor | None = None
    var: torch.Tensor | None = None
    probs_components: torch.Tensor | None = None

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loc is None or self.var is None:
            raise AttributeError("a classification prediction has class probabilities (probs), not loc and var")
        return self.loc, self.var

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean ``(n,)``."""
        return self._moments()[0].mean(0)

    @property
    def variance(self) -> torch.Tensor:
        """Predictive variance ``(n,)`` (law of total variance over the mixture)."""
        loc, var = self._moments()
        return var.mean(0) + loc.var(0, unbiased=False)

    @property
    def probs(self) -> torch.Tensor:
        """Class probabilities ``(n, C)``."""
        if self.probs_components is None:
            raise AttributeError("a regression prediction has mean and variance, not class probabilities")
        return self.probs_components.mean(0)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """Pointwise log predictive density ``(n,)`` of targets / labels ``y``.

        :raises ValueError: if ``y`` is not an ``(n,)`` tensor, or (classification) its entries are not
            integer labels in ``[0, C)``."""
        n = self.probs_components.shape[1] if self.probs_components is not None else self._moments()[0].shape[-1]
        if not isinstance(y, torch.Tensor) or y.shape != (n,):
            raise ValueError(f"y must be a tensor of shape ({n},), got {tuple(getattr(y, 'shape', ()))}")
        if self.probs_components is not None:
            C = self.probs_components.shape[-1]
            if y.is_floating_point() and not torch.equal(y, y.round()):
                raise ValueError("y must hold integer class labels")
            if ((y < 0) | (y >= C)).any():
                raise ValueError(f"labels must lie in [0, {C}), got values in [{y.min()}, {y.max()}]")
            return self.probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).clamp_min(1e-300).log()
        check_finite("y", y)
        loc, var = self._moments()
        lp = -0.5 * (math.log(2 * math.pi) + var.log() + (y - loc) ** 2 / var)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])


@torch.no_grad()
def predict(model, guide, X: torch.Tensor, num_samples: int = 20, *, mc_samples: int = 32) -> DiffGPPrediction:
    """Predict at ``X`` ``(n, D)`` with ``num_samples`` guide draws × ``model.num_paths`` flow paths.

    :param mc_samples: output-GP draws per component for classification probabilities.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    mc_samples = check_positive_int("mc_samples", mc_samples)
    if getattr(guide, "prototype_trace", ...) is None:  # an autoguide that never ran: y would look latent
        raise ValueError("the guide has not run yet: train it, or call it once with the training data (X, y)")
    locs, vars_ = [], []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(X)
        out = poutine.block(poutine.replay(model, trace=guide_trace))(X)
        C = out.loc.shape[-1]
        locs.append(out.loc.reshape(-1, X.shape[0], C))
        vars_.append(out.var.reshape(-1, X.shape[0], C))
    loc, var = torch.cat(locs), torch.cat(vars_)
    if model.likelihood == "gaussian":
        return DiffGPPrediction(loc=loc[..., 0], var=var[..., 0] + model.noise.detach())
    g = loc.unsqueeze(1) + var.sqrt().unsqueeze(1) * torch.randn(
        (loc.shape[0], mc_samples) + loc.shape[1:], dtype=loc.dtype
    )
    if model.likelihood == "bernoulli":
        p1 = torch.sigmoid(g[..., 0]).mean(1)
        probs = torch.stack([1 - p1, p1], -1)
    else:
        probs = torch.softmax(g, -1).mean(1)
    return DiffGPPrediction(probs_components=probs)
