"""Likelihood heads of a Bayesian last layer: Gaussian regression and softmax classification."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from .._validation import check_finite, check_positive_int
from .positive import register_positive

__all__ = ["GaussianHead", "CategoricalHead"]


class GaussianHead(PyroModule):
    """:math:`y \\mid f \\sim N(f, \\sigma^2)` for a scalar target.

    :param noise: :math:`\\sigma^2`; :param learn_noise: make it a ``PyroParam`` (point estimate).
    """

    num_outputs = 1

    def __init__(self, noise: float = 0.1, learn_noise: bool = True):
        super().__init__()
        register_positive(self, "noise", noise, learn_noise)

    def check_targets(self, y: torch.Tensor, n: int) -> torch.Tensor:
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must be a vector of {n} regression targets, got shape {tuple(y.shape)}")
        if not y.is_floating_point():
            raise ValueError(f"y must be floating point for a Gaussian head, got {y.dtype}")
        check_finite("y", y)
        return y

    def observe(self, name: str, f: torch.Tensor, y: torch.Tensor | None, infer: dict | None = None) -> None:
        """``f`` is ``(..., n, 1)``; ``infer`` is passed to the site (the noise is added to it)."""
        noise = self.noise.to(f.dtype)
        infer = dict(infer or {})
        if "last_layer" in infer:
            infer["last_layer"] = dict(infer["last_layer"], noise=noise)
        # Pyro's InferDict type lists only Pyro's own keys, not this package's last_layer
        pyro.sample(name, dist.Normal(f[..., 0], noise.sqrt()), obs=y, infer=infer)  # type: ignore[arg-type]


class CategoricalHead(PyroModule):
    """:math:`y \\mid f \\sim \\mathrm{Categorical}(\\mathrm{softmax}(f))` over ``num_classes`` classes."""

    def __init__(self, num_classes: int):
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_outputs = num_classes

    def check_targets(self, y: torch.Tensor, n: int) -> torch.Tensor:
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must be a vector of {n} class labels, got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must hold integer class labels, got {y.dtype}")
        if ((y < 0) | (y >= self.num_outputs)).any():
            raise ValueError(f"labels must lie in [0, {self.num_outputs}), got range [{int(y.min())}, {int(y.max())}]")
        return y

    def observe(self, name: str, f: torch.Tensor, y: torch.Tensor | None, infer: dict | None = None) -> None:
        # Pyro's InferDict type lists only Pyro's own keys, not this package's last_layer
        pyro.sample(name, dist.Categorical(logits=f), obs=y, infer=dict(infer or {}))  # type: ignore[arg-type]
