r"""Action matrices :math:`S \in \mathbb{R}^{n \times i}`: what a policy hands to the inference.

Computation-aware inference only touches the data through :math:`S`: the kernel product
:math:`K(X_*, X) S`, the projections :math:`S^\top v`, and :math:`S w`. Three storage formats
cover every policy:

* :class:`IndexActions`: columns of the identity (unit vectors), :math:`K(X_*, X)S = K(X_*, X_I)`;
* :class:`DenseActions`: a dense :math:`n \times i` matrix (CG directions, sketches, pseudo-inputs);
* :class:`BlockSparseActions`: column :math:`j` nonzero only on block :math:`B_j` of a partition of
  the training points (CaGP-Opt); the kernel product costs one kernel entry per training point
  and row, and memory is O(n).

:class:`StackedActions` puts several action matrices side by side, :math:`S = [S_1, S_2, \dots]`,
each kept in its own format (learned block-sparse actions followed by a few dense CG directions,
see ``refine`` in :meth:`~pyro_gpx.gp.model.ComputationAwareGP.posterior`).
"""

from __future__ import annotations

import functools

import torch

from .._validation import check_positive_int
from .kernel_fn import KernelFn
from .kernel_ops import block_sparse_kernel_matmul, kernel_matmul, kernel_matmul_accumulate
from .symmetric import training_block_matmul, training_stacked_matmul

__all__ = ["Actions", "IndexActions", "DenseActions", "BlockSparseActions", "StackedActions"]


def _checked_indices(name: str, indices, num_data: int) -> torch.Tensor:
    """``indices`` as a long tensor of row numbers in ``[0, num_data)`` (float indices were truncated, and
    out-of-range ones accepted, failing later with a raw IndexError or silently acting on other rows)."""
    indices = torch.as_tensor(indices)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer row numbers, got dtype {indices.dtype}")
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_data):
        raise ValueError(f"{name} must lie in [0, {num_data}), got [{int(indices.min())}, {int(indices.max())}]")
    return indices


class Actions:
    """Interface of an action matrix :math:`S` (``n x i``)."""

    num_data: int
    num_actions: int

    def kernel_product(self, kernel: KernelFn, X_new: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        r""":math:`K(X_*, X) S`, shape ``(n_*, i)``."""
        raise NotImplementedError

    def t_matmul(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`S^\top v` for ``v`` of shape ``(n,)`` or ``(n, m)``."""
        raise NotImplementedError

    def matmul(self, w: torch.Tensor) -> torch.Tensor:
        r""":math:`S w` for ``w`` of shape ``(i,)`` or ``(i, m)``."""
        raise NotImplementedError

    def gram(self) -> torch.Tensor:
        r""":math:`S^\top S`, ``(i, i)``."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The ``(n, i)`` matrix."""
        return self.matmul(torch.eye(self.num_actions, dtype=self._dtype))

    def to(self, dtype: torch.dtype) -> Actions:
        """The same actions with entries of ``dtype``."""
        raise NotImplementedError

    @property
    def _dtype(self) -> torch.dtype:
        return torch.get_default_dtype()


class IndexActions(Actions):
    """Unit-vector actions :math:`S = [e_{k_1}, \\dots, e_{k_i}]`; all ``n`` indices give the exact GP."""

    def __init__(self, indices: torch.Tensor, num_data: int, dtype: torch.dtype = torch.float64):
        num_data = check_positive_int("num_data", num_data)
        self.indices = _checked_indices("indices", indices, num_data)
        if len(torch.unique(self.indices)) != len(self.indices):  # dependent columns: a singular G
            raise ValueError("indices must not repeat")
        self.num_data = num_data
        self.num_actions = len(self.indices)
        self.dtype = dtype

    @property
    def _dtype(self):
        return self.dtype

    def kernel_product(self, kernel, X_new, X):
        return kernel(X_new, X[self.indices])

    def t_matmul(self, v):
        return v[self.indices]

    def matmul(self, w):
        out = w.new_zeros((self.num_data,) + tuple(w.shape[1:]))
        out[self.indices] = w
        return out

    def gram(self):
        return torch.eye(self.num_actions, dtype=self.dtype)

    def to(self, dtype):
        return IndexActions(self.indices, self.num_data, dtype)


def _accumulates_wider(S: torch.Tensor, X: torch.Tensor) -> bool:
    """Whether a product with actions ``S`` forms kernel entries in ``X``'s dtype and sums in the
    wider dtype of ``S`` (only without autograd; the differentiable path works in ``X``'s dtype)."""
    return not torch.is_grad_enabled() and torch.promote_types(S.dtype, X.dtype) != X.dtype


class DenseActions(Actions):
    """A dense action matrix ``S`` of shape ``(n, i)``."""

    def __init__(self, S: torch.Tensor):
        if S.dim() != 2:
            raise ValueError(f"S must be (n, i), got shape {tuple(S.shape)}")
        self.S = S
        self.num_data, self.num_actions = S.shape

    @property
    def _dtype(self):
        return self.S.dtype

    def kernel_product(self, kernel, X_new, X):
        if _accumulates_wider(self.S, X_new):  # e.g. float32 kernel entries, float64 sums
            return kernel_matmul_accumulate(kernel, X_new, X, self.S)
        return kernel_matmul(kernel, X_new, X, self.S)

    def to(self, dtype):
        return DenseActions(self.S.to(dtype))

    def t_matmul(self, v):
        return self.S.transpose(-1, -2).to(v.dtype) @ v

    def matmul(self, w):
        return self.S.to(w.dtype) @ w

    def gram(self):
        S = self.S.double()
        return S.T @ S


class BlockSparseActions(Actions):
    r"""Block-sparse actions: :math:`S_{kj} = b_{j,m}` if :math:`k` is the :math:`m`-th point of
    block :math:`j`, else 0. Blocks partition the training points.

    :param index: ``(i, block)`` training-point indices of each block; entries with
        ``mask == False`` are padding (the last block of an uneven partition).
    :param blocks: ``(i, block)`` nonzero entries (learnable).
    :param mask: ``(i, block)`` boolean, which entries are real.

    The blocks must be disjoint (:math:`S^\top S` is taken as diagonal); they may leave points out.
    Overlapping actions (e.g. sliding windows) are :class:`DenseActions`.
    """

    def __init__(self, index: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor, num_data: int):
        if index.shape != blocks.shape or mask.shape != blocks.shape:
            raise ValueError("index, blocks and mask must have the same (actions, block) shape")
        num_data = check_positive_int("num_data", num_data)
        points = _checked_indices("index", index[mask.bool()], num_data)
        if len(torch.unique(points)) != len(points):  # overlapping blocks gave a wrong, diagonal S^T S, silently
            raise ValueError(
                "the blocks overlap (a point in two blocks, or twice in one): block-sparse actions need disjoint "
                "blocks; give overlapping actions as DenseActions"
            )
        #: whether every training point lies in a block (the symmetric training products need it)
        self.covers_all = len(points) == num_data
        self.index = index
        self.mask = mask
        self.blocks = blocks * mask
        self.num_data = num_data
        self.num_actions = blocks.shape[0]

    @property
    def _dtype(self):
        return self.blocks.dtype

    def to(self, dtype):
        return BlockSparseActions(self.index, self.blocks.to(dtype), self.mask, self.num_data)

    def kernel_product(self, kernel, X_new, X):
        if X_new is X and kernel.spec is not None and self.covers_all:  # training: K(X, X) is symmetric
            return training_block_matmul(kernel.spec, X, self.index, self.mask, self.blocks)
        return block_sparse_kernel_matmul(kernel, X_new, X[self.index], self.blocks)

    def t_matmul(self, v):
        gathered = v[self.index]  # (i, block, ...)
        blocks = self.blocks.to(v.dtype)
        if v.dim() == 1:
            return (gathered * blocks).sum(-1)
        return torch.einsum("ab,ab...->a...", blocks, gathered)

    def matmul(self, w):
        blocks = self.blocks.to(w.dtype)
        out = w.new_zeros((self.num_data,) + tuple(w.shape[1:]))
        contrib = blocks.unsqueeze(-1) * w.reshape(self.num_actions, 1, -1) if w.dim() > 1 else blocks * w[:, None]
        flat_index = self.index[self.mask]
        contrib = contrib[self.mask]
        return out.index_add(0, flat_index, contrib.reshape((len(flat_index),) + tuple(w.shape[1:])))

    def gram(self):
        # blocks are disjoint: S^T S is diagonal
        return torch.diag((self.blocks.double() ** 2).sum(-1))


class StackedActions(Actions):
    r"""The columns of several action matrices side by side, :math:`S = [S_1, \dots, S_p]`.

    Each part keeps its own storage (a block-sparse part still costs one kernel entry per point and
    row); the Gram matrix :math:`S^\top S` is assembled from the parts' own Gram matrices and the
    cross products :math:`S_a^\top S_b` (one dense part of every pair is formed).

    :param parts: the action matrices, all on the same ``num_data`` points.

    Example::

        >>> import torch
        >>> S = StackedActions([IndexActions(torch.tensor([0, 2]), 4), DenseActions(torch.ones(4, 1))])
        >>> S.num_actions, S.gram().tolist()
        (3, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 4.0]])
    """

    def __init__(self, parts: list[Actions]):
        if not parts:
            raise ValueError("parts must hold at least one Actions")
        if len({a.num_data for a in parts}) != 1:
            raise ValueError(f"parts act on different numbers of points: {[a.num_data for a in parts]}")
        self.parts = list(parts)
        self.num_data = parts[0].num_data
        self.num_actions = sum(a.num_actions for a in parts)

    @property
    def _dtype(self):
        return self.parts[0]._dtype

    def kernel_product(self, kernel, X_new, X):
        if self._one_training_pass(kernel, X_new, X):
            dense_parts = [part for part in self.parts[1:] if isinstance(part, DenseActions)]
            first = self.parts[0]
            joint = training_stacked_matmul(kernel.spec, X, first.index, first.mask, first.blocks,
                                            torch.cat([part.S for part in dense_parts], 1))  # fmt: skip
            pieces = iter(torch.split(joint, [first.num_actions] + [part.num_actions for part in dense_parts], 1))
            products = [next(pieces)]
            for part in self.parts[1:]:  # unit-vector parts: kernel columns, no pass over K
                products.append(next(pieces) if isinstance(part, DenseActions) else part.kernel_product(kernel, X, X))
            return torch.cat([p.to(joint.dtype) for p in products], 1)
        products = [a.kernel_product(kernel, X_new, X) for a in self.parts]
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in products])
        return torch.cat([p.to(dtype) for p in products], 1)

    def _one_training_pass(self, kernel, X_new, X) -> bool:
        """Block-sparse then dense (and unit-vector) parts, :math:`K(X, X)` of a stationary kernel, no
        gradient: the block-sparse and dense products from one upper triangle of kernel tiles
        (:func:`training_stacked_matmul`), unit vectors as kernel columns."""
        return (
            X_new is X
            and kernel.spec is not None
            and not torch.is_grad_enabled()
            and len(self.parts) > 1
            and isinstance(self.parts[0], BlockSparseActions)
            and self.parts[0].covers_all
            and all(isinstance(part, (DenseActions, IndexActions)) for part in self.parts[1:])
            and any(isinstance(part, DenseActions) for part in self.parts[1:])
        )

    def to(self, dtype):
        return StackedActions([a.to(dtype) for a in self.parts])

    def t_matmul(self, v):
        return torch.cat([a.t_matmul(v) for a in self.parts], 0)

    def matmul(self, w):
        pieces = torch.split(w, [a.num_actions for a in self.parts], 0)
        return sum(a.matmul(piece) for a, piece in zip(self.parts, pieces))

    def gram(self):
        blocks = [[None] * len(self.parts) for _ in self.parts]
        for a, part_a in enumerate(self.parts):
            blocks[a][a] = part_a.gram().double()
            for b in range(a + 1, len(self.parts)):
                cross = part_a.t_matmul(self.parts[b].dense().double())  # S_a^T S_b
                blocks[a][b], blocks[b][a] = cross, cross.T
        return torch.cat([torch.cat(row, 1) for row in blocks], 0)
