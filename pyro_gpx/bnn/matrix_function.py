r"""Functions of symmetric matrices with a backward pass that survives repeated eigenvalues.

For symmetric :math:`S = U\,\mathrm{diag}(x)\,U^\top`, :math:`h(S) = U\,\mathrm{diag}(h(x))\,U^\top`. Its
derivative is the Daleckii–Krein formula [1]

.. math::

    \bar S = U\big(F \circ (U^\top \bar H U)\big)U^\top, \qquad
    F_{ij} = \frac{h(x_i) - h(x_j)}{x_i - x_j}\ (x_i \ne x_j), \quad F_{ii} = h'(x_i),

which, unlike differentiating ``torch.linalg.eigh`` (whose backward divides by
:math:`x_i - x_j`), stays finite when eigenvalues coincide, as they do for the nearly
low-rank Gram matrices of network features.

References:

[1] N. J. Higham. Functions of Matrices: Theory and Computation. SIAM, 2008, Theorem 3.11.
"""

from __future__ import annotations

import torch

__all__ = ["inverse_sqrt_shrinkage"]


def _h(x: torch.Tensor) -> torch.Tensor:
    """:math:`h(x) = ((1 + x)^{-1/2} - 1) / x = -a^2 / (1 + a)` with :math:`a = (1 + x)^{-1/2}` (no cancellation)."""
    a = torch.rsqrt(1 + x)
    return -(a * a) / (1 + a)


def _dh(x: torch.Tensor) -> torch.Tensor:
    a = torch.rsqrt(1 + x)
    return 0.5 * a**4 * (a + 2) / (1 + a) ** 2


class _InverseSqrtShrinkage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: torch.Tensor) -> torch.Tensor:
        x, U = torch.linalg.eigh(S)
        x = x.clamp_min(-0.5)  # S is positive semi-definite: only rounding makes x < 0 (h needs x > -1)
        ctx.save_for_backward(x, U)
        return (U * _h(x)) @ U.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, U = ctx.saved_tensors
        hx, dx = _h(x), x[:, None] - x[None, :]
        close = dx.abs() <= torch.finfo(x.dtype).eps ** 0.5 * (1 + x[:, None].abs() + x[None, :].abs())
        F = torch.where(
            close, _dh(0.5 * (x[:, None] + x[None, :])), (hx[:, None] - hx[None, :]) / dx.masked_fill(close, 1.0)
        )
        inner = U.T @ (0.5 * (grad + grad.T)) @ U
        return U @ (F * inner) @ U.T


def inverse_sqrt_shrinkage(S: torch.Tensor) -> torch.Tensor:
    r""":math:`h(S)` with :math:`h(x) = ((1+x)^{-1/2} - 1)/x`, for symmetric positive semi-definite ``S``.

    With :math:`S = \Phi\Phi^\top/\lambda`,
    :math:`I + \Phi^\top h(S)\Phi/\lambda = \sqrt\lambda\,(\Phi^\top\Phi + \lambda I)^{-1/2}` (the symmetric root),
    at the cost of an :math:`n\times n` eigendecomposition.
    """
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square matrix, got shape {tuple(S.shape)}")
    return _InverseSqrtShrinkage.apply(S)
