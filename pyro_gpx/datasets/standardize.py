"""Column standardisation with statistics from the training split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Standardizer"]


@dataclass(frozen=True)
class Standardizer:
    r"""Affine map :math:`z = (x - \mu) / s` fitted on training data.

    Columns with zero spread (constant features, as in the naval data) get :math:`s = 1` so
    they map to zero rather than NaN.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        if x.dim() not in (1, 2) or x.shape[0] < 2:
            raise ValueError(f"x must be (n,) or (n, d) with n >= 2, got shape {tuple(x.shape)}")
        mean = x.mean(0)
        std = x.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(mean=mean, std=std)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Back to original units (for means and samples)."""
        return z * self.std + self.mean

    def inverse_variance(self, var: torch.Tensor) -> torch.Tensor:
        """A variance in standardised units, in original units."""
        return var * self.std**2
