r"""Observation models for the output GP :math:`g(x_T)\mid u_g \sim \mathcal N(m, v)` (per path).

* :class:`GaussianVariationalExpectation`: :math:`\log p` is the SVGP variational expectation
  :math:`\mathbb E_{\mathcal N(g; m, v)}\log\mathcal N(y; g, \sigma^2)
  = \log\mathcal N(y; m, \sigma^2) - v / 2\sigma^2` (closed form), so the ELBO is that of the
  DiffGP paper [1]; samples are drawn from the predictive :math:`\mathcal N(m, v + \sigma^2)`.
* classification: one reparameterised draw :math:`g = m + \sqrt v\,\epsilon` per path, then a
  Bernoulli / categorical with logits :math:`g` (a Monte Carlo estimate of the same expectation).

[1] P. Hegde, M. Heinonen, H. Lähdesmäki, S. Kaski. Deep learning with differential Gaussian
    process flows. AISTATS 2019.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

__all__ = ["GaussianVariationalExpectation", "LIKELIHOODS", "observation"]

LIKELIHOODS = ("gaussian", "bernoulli", "categorical")


class GaussianVariationalExpectation(TorchDistribution):
    """``log_prob(y)`` :math:`= \\log\\mathcal N(y; m, \\sigma^2) - v / 2\\sigma^2`; ``sample`` from
    :math:`\\mathcal N(m, v + \\sigma^2)`. Not a normalised density of ``y``: a likelihood term (the ELBO's),
    a lower bound on :meth:`pointwise_log_likelihood` by Jensen's inequality."""

    arg_constraints = {"loc": constraints.real, "var": constraints.nonnegative, "noise": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor, var: torch.Tensor, noise: torch.Tensor, validate_args=None):
        self.loc, self.var = torch.broadcast_tensors(loc, var)
        self.noise = torch.as_tensor(noise, dtype=self.loc.dtype)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return GaussianVariationalExpectation(self.loc.expand(shape), self.var.expand(shape), self.noise)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (self.var + self.noise).sqrt() * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r = value - self.loc
        return -0.5 * (math.log(2 * math.pi) + self.noise.log() + (r * r + self.var) / self.noise)

    def pointwise_log_likelihood(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`\\log\\mathcal N(y; m, v + \\sigma^2)`, the density of ``y`` given the inducing outputs
        (:math:`g` integrated out): what :func:`~pyro_gpx.diagnostics.to_inference_data` records as the
        log-likelihood, where ``log_prob`` is the ELBO's lower bound on it."""
        r, total = value - self.loc, self.var + self.noise
        return -0.5 * (math.log(2 * math.pi) + total.log() + r * r / total)


def observation(likelihood: str, loc: torch.Tensor, var: torch.Tensor, noise: torch.Tensor | None):
    """The observation distribution for output moments ``loc``, ``var`` of shape ``(..., C)``."""
    if likelihood == "gaussian":
        if noise is None:
            raise ValueError("a Gaussian likelihood needs the noise variance")
        return GaussianVariationalExpectation(loc[..., 0], var[..., 0], noise)
    g = loc + var.sqrt() * torch.randn_like(loc)
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=g[..., 0])
    if likelihood == "categorical":
        return dist.Categorical(logits=g)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
