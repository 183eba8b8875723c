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

__all__ = ["inverse_sqrt_shrinkage", "whitening_terms"]


def _h(x: torch.Tensor) -> torch.Tensor:
    """:math:`h(x) = ((1 + x)^{-1/2} - 1) / x = -a^2 / (1 + a)` with :math:`a = (1 + x)^{-1/2}` (no cancellation)."""
    a = torch.rsqrt(1 + x)
    return -(a * a) / (1 + a)


def _dh(x: torch.Tensor) -> torch.Tensor:
    a = torch.rsqrt(1 + x)
    return 0.5 * a**4 * (a + 2) / (1 + a) ** 2


def _psd_eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, U = torch.linalg.eigh(S)
    # S is positive semi-definite: only rounding makes x < 0 (h and 1 / (1 + x) need x > -1)
    return x.clamp_min(-0.5), U


class _InverseSqrtShrinkage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: torch.Tensor) -> torch.Tensor:
        x, U = _psd_eigh(S)
        ctx.save_for_backward(x, U)
        return (U * _h(x)) @ U.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, U = ctx.saved_tensors
        F = _divided_differences(x, _h(x))
        inner = U.T @ (0.5 * (grad + grad.T)) @ U
        return U @ (F * inner) @ U.T


def _divided_differences(x: torch.Tensor, hx: torch.Tensor) -> torch.Tensor:
    r""":math:`F_{ij}` of the Daleckii–Krein formula for :math:`h`, with :math:`h'` where :math:`x_i \approx x_j`."""
    dx = x[:, None] - x[None, :]
    close = dx.abs() <= torch.finfo(x.dtype).eps ** 0.5 * (1 + x[:, None].abs() + x[None, :].abs())
    return torch.where(
        close, _dh(0.5 * (x[:, None] + x[None, :])), (hx[:, None] - hx[None, :]) / dx.masked_fill(close, 1.0)
    )


class _WhiteningTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: torch.Tensor, V: torch.Tensor, Y: torch.Tensor):
        x, U = _psd_eigh(S)
        UV, UY = U.T @ V, U.T @ Y
        ctx.save_for_backward(x, U, UV, UY)
        return U @ (_h(x)[:, None] * UV), U @ (UY / (1 + x)[:, None]), torch.log1p(x).sum()

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        x, U, UV, UY = ctx.saved_tensors
        hx, gx = _h(x), 1 / (1 + x)
        Ugv, Ugy = U.T @ grad_v, U.T @ grad_y
        A, B = Ugv @ UV.T, Ugy @ UY.T  # U^T (grad out) (input)^T U, of rank d_out: no n x n x n products
        # the divided differences of g(x) = 1 / (1 + x) are -g(x_i) g(x_j), exactly
        M = _divided_differences(x, hx) * (0.5 * (A + A.T)) - (gx[:, None] * gx[None, :]) * (0.5 * (B + B.T))
        M = M + torch.diag(grad_logdet * gx)
        return U @ M @ U.T, U @ (hx[:, None] * Ugv), U @ (gx[:, None] * Ugy)


def whitening_terms(
    S: torch.Tensor, V: torch.Tensor, Y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":math:`h(S)V`, :math:`(I + S)^{-1}Y` and :math:`\log\det(I + S)` from one eigendecomposition of
    the symmetric positive semi-definite ``S`` (:math:`h` as in :func:`inverse_sqrt_shrinkage`).

    Everything the dual repriorisation map needs from :math:`S = \tilde\Phi\tilde\Phi^\top/\lambda`.
    Neither matrix function is formed: the forward pass is the eigendecomposition plus products with
    the thin ``V`` and ``Y``, and the backward pass (Daleckii–Krein, finite at repeated eigenvalues)
    takes two :math:`n\times n` products, where forming :math:`h(S)` and a Cholesky factor of
    :math:`I + S` took about ten.

    :param S: ``(n, n)``; :param V: ``(n, m)``; :param Y: ``(n, m')``.
    """
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square matrix, got shape {tuple(S.shape)}")
    if V.dim() != 2 or Y.dim() != 2 or V.shape[0] != S.shape[0] or Y.shape[0] != S.shape[0]:
        raise ValueError(f"V and Y must have {S.shape[0]} rows, got shapes {tuple(V.shape)} and {tuple(Y.shape)}")
    return _WhiteningTerms.apply(S, V, Y)


def inverse_sqrt_shrinkage(S: torch.Tensor) -> torch.Tensor:
    r""":math:`h(S)` with :math:`h(x) = ((1+x)^{-1/2} - 1)/x`, for symmetric positive semi-definite ``S``.

    With :math:`S = \Phi\Phi^\top/\lambda`,
    :math:`I + \Phi^\top h(S)\Phi/\lambda = \sqrt\lambda\,(\Phi^\top\Phi + \lambda I)^{-1/2}` (the symmetric root),
    at the cost of an :math:`n\times n` eigendecomposition.
    """
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square matrix, got shape {tuple(S.shape)}")
    return _InverseSqrtShrinkage.apply(S)
