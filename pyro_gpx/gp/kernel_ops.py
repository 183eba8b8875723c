r"""Matrix-free kernel products: :math:`K(X_1, X_2) V` without forming :math:`K`.

Rows of :math:`K` are formed ``chunk`` at a time, multiplied, and dropped. Under autograd each
chunk is recomputed in the backward pass (``torch.utils.checkpoint``), so memory is
O(chunk x n + n x columns) rather than O(n^2). Hyperparameter gradients flow through the
recomputation. Products may run in the data's dtype (e.g. float32); callers accumulate the small
reductions in float64.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import settings
from ._checks import check_inputs
from .kernel_fn import KernelFn
from .stationary import stationary_block_matmul, stationary_matmul, stationary_matmul_accumulate
from .symmetric import symmetric_matmul

__all__ = ["kernel_matmul", "kernel_matmul_accumulate", "block_sparse_kernel_matmul", "kernel_diag"]


def _chunked(fn, rows: torch.Tensor, *others, chunk: int | None = None) -> torch.Tensor:
    chunk = chunk or settings.chunk_size.rows(others[0].shape[0])
    if rows.shape[0] <= chunk:
        return fn(rows, *others)
    outs = []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        if torch.is_grad_enabled():
            outs.append(checkpoint(fn, part, *others, use_reentrant=False))
        else:
            outs.append(fn(part, *others))
    return torch.cat(outs)


def kernel_matmul(
    kernel: KernelFn, X1: torch.Tensor, X2: torch.Tensor, V: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """:math:`K(X_1, X_2) V` for dense ``V`` of shape ``(n2, m)``, in ``X1``'s dtype."""
    for name, t in (("X1", X1), ("X2", X2), ("V", V)):
        check_inputs(name, t)
    if V.shape[0] != X2.shape[0]:
        raise ValueError(f"V has {V.shape[0]} rows; X2 has {X2.shape[0]}")
    V = V.to(X1.dtype)
    if kernel.spec is not None:
        return stationary_matmul(kernel.spec, X1, X2, V)
    return _chunked(lambda rows, X, W: kernel(rows, X) @ W, X1, X2, V, chunk=chunk)


@torch.no_grad()
def training_matmul(kernel: KernelFn, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """:math:`K(X, X) V` in float64, no gradient (CG and the likelihood search): from the upper
    triangle of kernel tiles for a stationary kernel (half the kernel work, entries in ``X``'s dtype,
    float64 sums), else row-chunked."""
    if kernel.spec is not None:
        return symmetric_matmul(kernel.spec, X, V.double())
    return kernel_matmul(kernel, X, X, V).double()


@torch.no_grad()
def kernel_matmul_accumulate(
    kernel: KernelFn, X1: torch.Tensor, X2: torch.Tensor, V: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """:math:`K(X_1, X_2) V` with kernel entries in ``X1``'s dtype and the sums in ``V``'s (no
    gradient): float32 kernel evaluation, float64 accumulation over the ``n2`` columns."""
    if V.shape[0] != X2.shape[0]:
        raise ValueError(f"V has {V.shape[0]} rows; X2 has {X2.shape[0]}")
    if kernel.spec is not None:
        return stationary_matmul_accumulate(kernel.spec, X1, X2, V)
    return _chunked(lambda rows, X, W: kernel(rows, X).to(W.dtype) @ W, X1, X2, V, chunk=chunk)


def block_sparse_kernel_matmul(
    kernel: KernelFn,
    X1: torch.Tensor,
    X_blocks: torch.Tensor,
    blocks: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    r""":math:`K(X_1, X) S` for block-sparse actions :math:`S`.

    Column :math:`j` of :math:`S` is nonzero only on the :math:`j`-th block of training points,
    with entries ``blocks[j]``; ``X_blocks`` holds those points as ``(actions, block, d)``. Each row
    of the result costs one kernel evaluation per training point: :math:`O(n_1 n)` work in all.
    """
    for name, t in (("X1", X1), ("X_blocks", X_blocks), ("blocks", blocks)):
        check_inputs(name, t)
    num_actions, block, dim = X_blocks.shape
    if blocks.shape != (num_actions, block):
        raise ValueError(f"blocks has shape {tuple(blocks.shape)}; expected {(num_actions, block)}")
    flat = X_blocks.reshape(num_actions * block, dim)
    blocks = blocks.to(X1.dtype)
    if kernel.spec is not None:
        return stationary_block_matmul(kernel.spec, X1, flat, blocks)

    def product(rows, X, B):
        K = kernel(rows, X).reshape(rows.shape[0], num_actions, block)
        return torch.einsum("rab,ab->ra", K, B)

    return _chunked(product, X1, flat, blocks, chunk=chunk)


def kernel_diag(kernel: KernelFn, X: torch.Tensor) -> torch.Tensor:
    """The diagonal :math:`k(x_i, x_i)` (cheap for stationary kernels)."""
    check_inputs("X", X)
    return kernel.diag(X)
