"""Input checks shared by the modules: a clear ``ValueError`` naming the argument, never a silent NaN."""

from __future__ import annotations

import math

import torch

__all__ = ["check_finite", "check_positive_int", "check_positive_or_none"]


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError("<name> contains NaN or inf")`` unless every entry of ``x`` is finite."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_positive_or_none(name: str, value) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is ``None`` or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number or None, got {value}")
