"""Input checks shared by the modules: a clear ``ValueError`` naming the argument, never a silent NaN."""

from __future__ import annotations

import torch

__all__ = ["check_finite"]


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError("<name> contains NaN or inf")`` unless every entry of ``x`` is finite."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
