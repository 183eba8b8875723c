"""Input checks shared by the modules: a clear ``ValueError`` naming the argument, never a silent NaN."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

__all__ = [
    "check_finite",
    "check_positive_int",
    "check_positive_or_none",
    "is_bool",
    "is_finite_at_least",
    "is_integer",
]


def is_bool(value) -> bool:
    """A Python, NumPy or 0-d torch boolean (``True`` is an ``int`` to Python, but never a count here)."""
    return isinstance(value, bool | np.bool_) or (torch.is_tensor(value) and value.dtype == torch.bool)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError("<name> contains NaN or inf")`` unless every entry of ``x`` is finite."""
    if not torch.isfinite(torch.as_tensor(x)).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is an integer >= 1 (``2.0``
    passes; ``2.5``, NaN, inf, a ``bool`` or a non-number do not)."""
    try:
        valid = not is_bool(value) and math.isfinite(float(value)) and int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_or_none(name: str, value) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is ``None`` or a finite number > 0 (not a ``bool``)."""
    if value is not None and not is_finite_at_least(value, 0.0, strict=True):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (anything with ``__index__``: ``int``, NumPy integers, 0-d integer
    tensors), but not a ``bool``; ``2.0`` is not."""
    if is_bool(value):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_finite_at_least(value, bound: float, strict: bool = False) -> bool:
    """Whether ``value`` is a finite real number ``> bound`` (``strict``) or ``>= bound``; NaN and
    ``bool`` (and strings such as ``"1"``) fail."""
    if is_bool(value) or isinstance(value, str | bytes):
        return False
    if isinstance(value, torch.Tensor):
        value = value.detach()  # a learnable parameter: float() of it would warn
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and (value > bound if strict else value >= bound)
