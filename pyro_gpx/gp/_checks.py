"""Argument checks of the GP package's public functions: a clear error naming the argument."""

from __future__ import annotations

import torch

from .._validation import check_finite, is_finite_at_least


def _check_dtype(name: str, t: torch.Tensor) -> None:
    r"""float32 and float64 only: kernel products run in the inputs' dtype, and bfloat16/float16
    products cannot resolve :math:`K + \sigma^2 I`."""
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name} has dtype {t.dtype}; computation-aware GPs need float32 or float64 {name} (kernel "
            "products run in its dtype, and bfloat16/float16 products cannot resolve K + noise I: with "
            "8-11 mantissa bits their rounding error exceeds typical noise variances)"
        )


def check_inputs(name: str, t) -> None:
    """A float32/float64 tensor with finite entries (``TypeError`` / ``ValueError`` naming ``name``)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_dtype(name, t)
    check_finite(name, t)


def check_noise(name: str, noise) -> None:
    """A positive finite number or tensor of them (not a ``bool``)."""
    if torch.is_tensor(noise) and noise.numel() != 1:
        if not (noise.is_floating_point() and torch.isfinite(noise).all() and (noise > 0).all()):
            raise ValueError(f"{name} must hold positive finite values")
        return
    if not is_finite_at_least(noise, 0.0, strict=True):
        raise ValueError(f"{name} must be a positive finite number, got {noise!r}")


def check_tolerance(name: str, value, strict: bool = False) -> None:
    """A finite number >= 0 (> 0 with ``strict``; not a ``bool``)."""
    if not is_finite_at_least(value, 0.0, strict=strict):
        raise ValueError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")


def check_nonzero_residual(residual: torch.Tensor) -> None:
    r"""A residual :math:`y - \mu(X)` that is not all zero: for zero targets the likelihood grows without
    bound as the outputscale and the noise go to zero, so a re-selection has no maximiser."""
    if not bool(residual.detach().ne(0).any()):
        raise ValueError(
            "the residual y - mean is zero at every point: the likelihood has no maximiser (it grows as the "
            "outputscale and the noise go to zero), so the outputscale and noise cannot be re-selected"
        )
