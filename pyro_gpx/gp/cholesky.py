"""Cholesky factorisation of the small (actions x actions) Gram matrices, with jitter escalation."""

from __future__ import annotations

import torch

from . import settings

__all__ = ["CholeskyError", "NonFiniteError", "safe_cholesky"]


class CholeskyError(RuntimeError):
    """The matrix stayed non-positive-definite after every jitter that was tried."""


class NonFiniteError(ValueError):
    """A matrix that should be factorised contains NaN or inf (e.g. hyperparameters overflowed)."""


def safe_cholesky(A: torch.Tensor, name: str = "matrix") -> torch.Tensor:
    r"""Lower Cholesky factor of a symmetric positive (semi-)definite ``A``, in ``A``'s dtype.

    Tries :math:`A`, then :math:`A + \epsilon I` with :math:`\epsilon` growing tenfold from
    :class:`~pyro_gpx.gp.settings.cholesky_jitter` (relative to the mean diagonal), and raises
    :class:`CholeskyError` naming the jitters tried.

    :raises ValueError: if ``A`` contains NaN or inf.
    """
    if not torch.isfinite(A).all():
        raise NonFiniteError(f"{name} contains NaN or inf; cannot factorise it")
    L, info = torch.linalg.cholesky_ex(A)
    if not info.any():
        return L
    jitter, tries = settings.cholesky_jitter.value()
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(torch.finfo(A.dtype).tiny)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    tried = []
    for k in range(tries + 1):
        eps = jitter * 10**k * scale
        tried.append(float(eps.detach()))
        L, info = torch.linalg.cholesky_ex(A + eps * eye)
        if not info.any():
            return L
    raise CholeskyError(f"{name} ({A.shape[-1]}x{A.shape[-1]}) is not positive definite even with jitter {tried}")
