"""Column standardisation with statistics from the training split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_finite

__all__ = ["Standardizer"]


@dataclass(frozen=True)
class Standardizer:
    r"""Affine map :math:`z = (x - \mu) / s` fitted on training data.

    Columns with zero spread (constant features, as in the naval data) get :math:`s = 1` so
    they map to zero rather than NaN; so do columns whose spread is only the rounding error of a
    constant (at most 16 machine epsilons of the mean's magnitude, e.g. a column of 0.1s).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __post_init__(self):
        check_finite("mean", self.mean)
        check_finite("std", self.std)
        if not (torch.as_tensor(self.std) > 0).all():
            raise ValueError("std must be positive")

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        """Column means and standard deviations (``ddof=1``) of ``x``, ``(n,)`` or ``(n, d)``, floating, finite."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() not in (1, 2) or x.shape[0] < 2:
            raise ValueError(f"x must be (n,) or (n, d) with n >= 2, got shape {tuple(x.shape)}")
        check_finite("x", x)
        mean = x.mean(0)
        std = x.std(0)
        constant = std <= 16 * torch.finfo(x.dtype).eps * mean.abs()  # also true where std == 0
        std = torch.where(constant, torch.ones_like(std), std)
        return cls(mean=mean, std=std)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Back to original units (for means and samples)."""
        return z * self.std + self.mean

    def inverse_variance(self, var: torch.Tensor) -> torch.Tensor:
        """A variance in standardised units, in original units."""
        return var * self.std**2
