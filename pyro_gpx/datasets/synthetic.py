"""Small synthetic data sets for demos, tutorials and tests (no files, seeded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_positive_int, is_finite_at_least, is_integer

__all__ = ["SyntheticRegression", "SyntheticClassification", "gap_regression", "two_moons"]


@dataclass(frozen=True)
class SyntheticRegression:
    """Training data, a dense test grid and the noise-free function on it."""

    X: torch.Tensor
    y: torch.Tensor
    X_grid: torch.Tensor
    f_grid: torch.Tensor
    noise_std: float


@dataclass(frozen=True)
class SyntheticClassification:
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def _check_common(noise_std: float, seed: int, dtype: torch.dtype, **counts: int) -> None:
    for name, value in counts.items():
        if check_positive_int(name, value) < 2:
            raise ValueError(f"{name} must be >= 2, got {value!r}")
    if not is_finite_at_least(noise_std, 0.0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")


def _gap_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3.0 * x) + 0.3 * x


def gap_regression(
    n: int = 80,
    noise_std: float = 0.15,
    gap: tuple[float, float] = (-0.5, 0.8),
    domain: tuple[float, float] = (-2.0, 2.0),
    n_grid: int = 200,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SyntheticRegression:
    r"""1-d regression with no data inside ``gap``: a test of in-between uncertainty.

    :math:`y = \sin(3x) + 0.3x + \varepsilon`, :math:`\varepsilon \sim N(0, \sigma^2)`, with
    ``x`` uniform on ``domain`` minus ``gap``. The grid extends half a unit beyond ``domain``.
    """
    _check_common(noise_std, seed, dtype, n=n, n_grid=n_grid)
    n, n_grid = int(n), int(n_grid)
    lo, hi = domain
    g_lo, g_hi = gap
    if not all(is_finite_at_least(v, -math.inf) for v in (lo, hi, g_lo, g_hi)):
        raise ValueError(f"domain {domain} and gap {gap} must be finite")
    if not lo < g_lo < g_hi < hi:
        raise ValueError(f"gap {gap} must lie strictly inside domain {domain}")
    gen = torch.Generator().manual_seed(seed)
    left, right = g_lo - lo, hi - g_hi
    u = torch.rand(n, generator=gen, dtype=dtype) * (left + right)
    x = torch.where(u < left, lo + u, g_hi + (u - left))
    x, _ = torch.sort(x)
    y = _gap_function(x) + noise_std * torch.randn(n, generator=gen, dtype=dtype)
    grid = torch.linspace(lo - 0.5, hi + 0.5, n_grid, dtype=dtype)
    return SyntheticRegression(X=x[:, None], y=y, X_grid=grid[:, None], f_grid=_gap_function(grid), noise_std=noise_std)


def two_moons(
    n: int = 200, noise_std: float = 0.1, n_test: int = 200, seed: int = 0, dtype: torch.dtype = torch.float64
) -> SyntheticClassification:
    """Two interleaving half circles, labels 0/1 (as scikit-learn's ``make_moons``)."""
    _check_common(noise_std, seed, dtype, n=n, n_test=n_test)
    n, n_test = int(n), int(n_test)
    gen = torch.Generator().manual_seed(seed)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(m) % 2
        t = torch.rand(m, generator=gen, dtype=dtype) * math.pi
        x = torch.stack([torch.cos(t), torch.sin(t)], -1)
        x = torch.where(labels[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], -1), x)
        x = x + noise_std * torch.randn(m, 2, generator=gen, dtype=dtype)
        perm = torch.randperm(m, generator=gen)
        return x[perm], labels[perm]

    X, y = draw(n)
    X_test, y_test = draw(n_test)
    return SyntheticClassification(X=X, y=y, X_test=X_test, y_test=y_test)
