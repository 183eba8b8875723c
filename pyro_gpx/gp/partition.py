r"""Partitions of the training points into the blocks of block-sparse actions (CaGP-Opt).

Both functions return ``(index, mask)`` of shape ``(blocks, size)`` with
``size = ceil(n / blocks)``: ``index[j]`` lists the points of block :math:`j` and ``mask`` marks
the real entries (a block one point short is padded with a repeat of its first point, masked out).
Block sizes differ by at most one.

* :func:`random_partition`: a seeded random permutation, as in [1].
* :func:`kd_partition`: recursive median splits along the coordinate of largest spread (a
  balanced k-d tree), so each block holds points that are close together. A learned action on
  such a block is a local basis function, much as an inducing point is in SGPR; a random block
  scatters its action over the whole input space. Splitting in the kernel's scaled space
  :math:`x / \ell` spends the splits on the inputs the kernel varies along.

Example::

    >>> import torch
    >>> index, mask = kd_partition(torch.arange(10.0)[:, None], 3)
    >>> [sorted(row[m].tolist()) for row, m in zip(index, mask)]
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]

References:

[1] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_finite, check_positive_int, is_integer

__all__ = ["random_partition", "kd_partition"]


def _check(n: int, num_blocks: int) -> None:
    num_blocks = check_positive_int("num_blocks", num_blocks)  # (True gave one block, 2.5 a slice error)
    if not 1 <= num_blocks <= n:
        raise ValueError(f"num_blocks must be in [1, {n}] for {n} points, got {num_blocks}")


def _pad(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    size = max(len(b) for b in blocks)
    index = torch.stack([torch.cat([b, b[:1].expand(size - len(b))]) for b in blocks])
    mask = torch.stack([torch.arange(size) < len(b) for b in blocks])
    return index, mask


def random_partition(n: int, num_blocks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_blocks`` blocks of a seeded random permutation of ``range(n)``."""
    _check(n, num_blocks)
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    size = math.ceil(n / num_blocks)
    short = size * num_blocks - n  # the last ``short`` blocks hold size - 1 points
    sizes = [size] * (num_blocks - short) + [size - 1] * short
    return _pad(list(torch.split(perm, sizes)))


def kd_partition(Z: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-d tree leaves of the rows of ``Z`` (``(n, d)``): each split sorts its points along
    the coordinate with the largest standard deviation and cuts them in proportion to the number
    of leaves on either side (every block gets the floor or the ceiling of ``n / num_blocks``)."""
    if Z.dim() != 2:
        raise ValueError(f"Z must be (n, d), got shape {tuple(Z.shape)}")
    check_finite("Z", Z)
    _check(Z.shape[0], num_blocks)
    Z = Z.detach()
    blocks: list[torch.Tensor] = []
    stack = [(torch.arange(Z.shape[0]), num_blocks)]
    while stack:  # depth first, right child pushed first, so blocks come out left to right
        idx, leaves = stack.pop()
        if leaves == 1:
            blocks.append(idx)
            continue
        points = Z[idx]
        spread = points.std(0) if len(idx) > 1 else torch.zeros(Z.shape[1])
        order = idx[torch.argsort(points[:, int(spread.argmax())], stable=True)]
        left = leaves // 2  # left leaves get ceil(m / leaves) points while the remainder lasts
        cut = left * (len(idx) // leaves) + min(left, len(idx) % leaves)
        stack.append((order[cut:], leaves - left))
        stack.append((order[:cut], left))
    return _pad(blocks)
