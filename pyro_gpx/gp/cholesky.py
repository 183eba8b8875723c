"""Cholesky factorisation of the small (actions x actions) Gram matrices, with jitter escalation."""

from __future__ import annotations

import warnings

import torch
from linear_operator.utils.warnings import NumericalWarning
from pyro.ops.integrator import register_exception_handler

from . import settings

__all__ = ["CholeskyError", "NonFiniteError", "NumericalWarning", "safe_cholesky"]


class CholeskyError(RuntimeError):
    """The matrix stayed non-positive-definite after every jitter that was tried.

    A ``RuntimeError`` whose message contains "input is not positive-definite": under SVI it reaches
    the user; Pyro's HMC/NUTS (``pyro.ops.integrator.potential_grad``) treats it, like torch's own
    Cholesky errors, as a rejected (divergent) proposal.
    """


class NonFiniteError(ValueError, RuntimeError):
    """A matrix that should be factorised contains NaN or inf (e.g. hyperparameters overflowed).

    Both a ``ValueError`` and a ``RuntimeError`` whose message contains "input is not
    positive-definite", so that HMC/NUTS rejects such a proposal as it does a failed Cholesky.
    Raised from ``log_prob`` it reaches Pyro's integrator wrapped in a plain ``ValueError`` (Pyro's
    trace names the site), so :func:`_rejects_non_finite` is registered with
    ``pyro.ops.integrator.register_exception_handler`` to recognise it as the cause.
    """


def _rejects_non_finite(exception: BaseException) -> bool:
    """Whether ``exception`` is, or was caused by, a :class:`NonFiniteError` or :class:`CholeskyError`: an HMC/NUTS
    proposal to reject (a potential of NaN), not an error to stop the run."""
    seen: BaseException | None = exception
    while seen is not None:
        if isinstance(seen, (NonFiniteError, CholeskyError)):
            return True
        seen = seen.__cause__  # raised "from" it, as Pyro's trace does; not any error met while handling one
    return False


register_exception_handler("pyro_gpx_non_finite_gp", _rejects_non_finite, warn_on_overwrite=False)


def safe_cholesky(A: torch.Tensor, name: str = "matrix") -> torch.Tensor:
    r"""Lower Cholesky factor of a symmetric positive (semi-)definite ``A``, in ``A``'s dtype.

    Tries :math:`A`, then :math:`A + \epsilon I` with :math:`\epsilon` growing tenfold from
    :class:`~pyro_gpx.gp.settings.cholesky_jitter` (relative to the mean diagonal), warning
    (:class:`NumericalWarning`, GPyTorch's) with the jitter that worked, and raises
    :class:`CholeskyError` naming the jitters tried.

    :raises NonFiniteError: if ``A`` contains NaN or inf.
    :raises CholeskyError: if every jitter fails.
    """
    if not torch.isfinite(A).all():
        raise NonFiniteError(
            f"{name} contains NaN or inf (are the hyperparameters finite?); the input is not positive-definite"
        )
    L, info = torch.linalg.cholesky_ex(A)
    if not info.any():
        return L
    jitter, tries = settings.cholesky_jitter.value()
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(torch.finfo(A.dtype).tiny)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    tried = []
    for k in range(tries + 1):
        relative = jitter * 10**k
        eps = relative * scale
        tried.append(f"{float(eps.detach()):.2e}")
        L, info = torch.linalg.cholesky_ex(A + eps * eye)
        if not info.any():
            warnings.warn(
                f"{name} ({A.shape[-1]}x{A.shape[-1]}) was not positive definite; added jitter of "
                f"{relative:.0e} x its mean diagonal",
                NumericalWarning,
                stacklevel=2,
            )
            return L
    raise CholeskyError(
        f"{name} ({A.shape[-1]}x{A.shape[-1]}): input is not positive-definite even with jitter [{', '.join(tried)}] "
        f"added to the diagonal (settings.cholesky_jitter = {(jitter, tries)})"
    )
