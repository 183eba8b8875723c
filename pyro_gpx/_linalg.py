r"""Small linear-algebra kernels shared by the modules."""

from __future__ import annotations

import torch

__all__ = ["gram"]


class _Gram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A):
        ctx.save_for_backward(A)
        return A.transpose(-1, -2) @ A

    @staticmethod
    def backward(ctx, grad):
        (A,) = ctx.saved_tensors
        return A @ (grad + grad.transpose(-1, -2))


def gram(A: torch.Tensor) -> torch.Tensor:
    r""":math:`A^\top A` for a matrix :math:`A` (``(n, k) -> (k, k)``), with a one-GEMM backward,
    :math:`\bar A = A(\bar G + \bar G^\top)` (autograd's product rule takes two GEMMs of the same size).

    Example::

        >>> A = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> torch.allclose(gram(A), A.T @ A)
        True
    """
    if A.dim() != 2:
        raise ValueError(f"gram expects a matrix, got shape {tuple(A.shape)}")
    return _Gram.apply(A)
