r"""The training product :math:`K(X, X) S` for block-sparse actions, each kernel entry formed once.

Training CaGP-Opt needs :math:`O = K S` with :math:`K = K(X, X)` symmetric. Order the points
block by block (:math:`Z`, scaled by the lengthscales) and cut them into tiles of whole blocks.
The tile :math:`T = K(Z_a, Z_b)`, :math:`a \le b`, feeds two parts of the output,

.. math:: O_{a, B_b} \mathrel{+}= T\, \operatorname{blockdiag}(b_{B_b}), \qquad
          O_{b, B_a} \mathrel{+}= T^\top \operatorname{blockdiag}(b_{B_a}) \quad (a < b),

so only the upper triangle of tiles is formed: half the kernel work of the row-chunked product
in :mod:`pyro_gpx.gp.stationary`, forward and backward. In the backward pass the gradient with
respect to a tile entry gathers both uses,
:math:`W_{rc} = G_{r, \beta(c)} b_c + G_{c, \beta(r)} b_r` (:math:`\beta` = block of a point;
the second term only off the diagonal), and the input gradients follow from
:math:`M = s^2\, W \odot \kappa'(\rho)` as for the row-chunked product. The outputscale's
gradient is :math:`\sum G \odot O / s^2`, read off the saved output.
"""

from __future__ import annotations

import torch

from . import settings
from .stationary import StationarySpec, _chunk_profile, _half_sq, _widened, _Workspace, centred

__all__ = ["training_block_matmul", "training_stacked_matmul", "symmetric_matmul"]

_TILE_POINTS = 512  # about 2**18 kernel entries per tile, which stay in cache
_MATVEC_TILE_POINTS = 1024  # a few columns: larger tiles amortise the loop (protein: 3.7 s vs 4.9 s)


def _block_order_positions(index: torch.Tensor, mask: torch.Tensor, num_data: int) -> torch.Tensor:
    """The row of each training point in block order (``index`` flattened, padding included)."""
    position = torch.empty(num_data, dtype=torch.long)
    position[index[mask]] = torch.arange(mask.numel()).reshape(mask.shape)[mask]
    return position


def _tiles(num_blocks: int, per_tile: int, block: int):
    """Upper-triangle tiles: (rows of a, blocks of a, rows of b, blocks of b, on the diagonal)."""
    for a in range(0, num_blocks, per_tile):
        blocks_a = slice(a, min(a + per_tile, num_blocks))
        rows_a = slice(a * block, blocks_a.stop * block)
        for b in range(a, num_blocks, per_tile):
            blocks_b = slice(b, min(b + per_tile, num_blocks))
            yield rows_a, blocks_a, slice(b * block, blocks_b.stop * block), blocks_b, a == b


def _times_blocks(k: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(R, c*m)`` tile times blockdiag of ``B`` ``(c, m)``: ``(R, c)``."""
    return torch.einsum("rbm,bm->rb", k.view(k.shape[0], *B.shape), B)


def _transpose_times_blocks(k: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(c*m, C)`` tile, transposed, times blockdiag of ``B`` ``(c, m)``, transposed: ``(c, C)``."""
    return torch.bmm(B.unsqueeze(1), k.view(*B.shape, k.shape[1])).squeeze(1)


class _SymmetricBlockProduct(torch.autograd.Function):
    """raw[r, a] = sum_m kappa(|z_r - z_{a,m}|^2) B[a, m] over block-ordered ``Z``; returns s^2 raw."""

    @staticmethod
    def forward(ctx, Z, B, s2, family, per_tile):
        num_blocks, block = B.shape
        half_sq = _half_sq(Z)
        raw = Z.new_zeros(Z.shape[0], num_blocks)
        work = _Workspace()
        for rows_a, blocks_a, rows_b, blocks_b, diagonal in _tiles(num_blocks, per_tile, block):
            k = _chunk_profile(family, Z[rows_a], Z[rows_b], half_sq[rows_a], half_sq[rows_b], False, work)
            raw[rows_a, blocks_b] += _times_blocks(k, B[blocks_b])
            if not diagonal:
                raw[rows_b, blocks_a] += _transpose_times_blocks(k, B[blocks_a]).T
        ctx.save_for_backward(Z, B, s2, raw)
        ctx.family, ctx.per_tile = family, per_tile
        return raw * s2

    @staticmethod
    def backward(ctx, G):
        Z, B, s2, raw = ctx.saved_tensors
        num_blocks, block = B.shape
        scale = float(s2)  # d loss / d raw = s^2 G, applied to each tile's small slices of G
        G_t = G.T.contiguous()
        half_sq = _half_sq(Z)
        Z1 = torch.cat([Z, torch.ones_like(Z[:, :1])], dim=1)  # M @ Z1 gives M Z and the row sums at once
        Z1t = Z1.T.contiguous()  # Z1t @ M is faster than M.T @ Z1 on CPU
        gZ1, gZ1t, gB = torch.zeros_like(Z1), torch.zeros_like(Z1t), torch.zeros_like(B)
        work = _Workspace()
        for rows_a, blocks_a, rows_b, blocks_b, diagonal in _tiles(num_blocks, per_tile=ctx.per_tile, block=block):
            k, dk = _chunk_profile(ctx.family, Z[rows_a], Z[rows_b], half_sq[rows_a], half_sq[rows_b], True, work)
            Ba, Bb = B[blocks_a], B[blocks_b]
            G_ab = G[rows_a, blocks_b] * scale  # (rows of a, blocks of b)
            gB[blocks_b] += torch.einsum("rbm,rb->bm", k.view(k.shape[0], *Bb.shape), G_ab)
            W = torch.mul(G_ab[:, :, None], Bb, out=work("W", (k.shape[0], *Bb.shape), k)).view_as(k)
            if not diagonal:
                G_ba = G_t[blocks_a, rows_b] * scale  # (blocks of a, rows of b)
                k3t = k.view(*Ba.shape, k.shape[1])
                gB[blocks_a] += torch.bmm(k3t, G_ba.unsqueeze(-1)).squeeze(-1)
                W.view_as(k3t).addcmul_(Ba[:, :, None], G_ba[:, None, :])
            M = W.mul_(k).mul_(-0.5) if dk is None else W.mul_(dk)  # RBF: kappa' = -kappa/2
            gZ1[rows_a] += M @ Z1[rows_b]
            gZ1t[:, rows_b] += Z1t[:, rows_a] @ M
        gZ1 += gZ1t.T
        gZ = 2 * (gZ1[:, -1:] * Z - gZ1[:, :-1])
        gs = torch.dot(G.reshape(-1), raw.reshape(-1)).reshape(s2.shape)
        return gZ, gB, gs, None, None


def training_block_matmul(
    spec: StationarySpec, X: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, blocks: torch.Tensor
) -> torch.Tensor:
    r""":math:`K(X, X) S` for block-sparse :math:`S` (``index``, ``mask``, ``blocks`` as in
    :class:`~pyro_gpx.gp.actions.BlockSparseActions`), forming each kernel entry once.

    Same result and gradients as :func:`~pyro_gpx.gp.stationary.stationary_block_matmul` with
    ``X1 = X``, in about half the time.
    """
    num_blocks, block = blocks.shape
    dtype = X.dtype
    side = settings.chunk_size.value() or _TILE_POINTS
    per_tile = max(1, side // block)
    Z = centred(spec.scale(X[index.reshape(-1)]))[0]
    raw = _SymmetricBlockProduct.apply(Z, blocks.to(dtype), spec.outputscale.to(dtype), spec.family, per_tile)
    return raw.index_select(0, _block_order_positions(index, mask, X.shape[0]))


@torch.no_grad()
def training_stacked_matmul(
    spec: StationarySpec,
    X: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
    blocks: torch.Tensor,
    V: torch.Tensor,
) -> torch.Tensor:
    r""":math:`K(X, X)\,[S, V]` for block-sparse :math:`S` and dense :math:`V` ``(n, c)`` from one
    upper triangle of tiles (no gradient): the prediction-time product of trained plus refinement
    actions (:class:`~pyro_gpx.gp.actions.StackedActions`).

    Kernel entries are formed in ``X``'s dtype; the dense columns accumulate in ``V``'s (a float32
    tile is widened before it multiplies ``V``), the block columns, sums over one block each, in
    ``X``'s. The result has the wider dtype, columns ``[S, V]``.
    """
    num_blocks, block = blocks.shape
    dtype, wide = X.dtype, torch.promote_types(X.dtype, V.dtype)
    per_tile = max(1, (settings.chunk_size.value() or _TILE_POINTS) // block)
    flat = index.reshape(-1)
    Z = centred(spec.scale(X[flat]))[0]
    B = blocks.to(dtype)
    Vz = V.to(wide)[flat] * mask.reshape(-1, 1)  # block order; padding rows contribute nothing
    half_sq = _half_sq(Z)
    raw = Z.new_zeros(Z.shape[0], num_blocks)
    dense = Vz.new_zeros(Vz.shape)
    work = _Workspace()
    for rows_a, blocks_a, rows_b, blocks_b, diagonal in _tiles(num_blocks, per_tile, block):
        k = _chunk_profile(spec.family, Z[rows_a], Z[rows_b], half_sq[rows_a], half_sq[rows_b], False, work)
        raw[rows_a, blocks_b] += _times_blocks(k, B[blocks_b])
        k_wide = _widened(k, Vz, work)
        dense[rows_a] += k_wide @ Vz[rows_b]
        if not diagonal:
            raw[rows_b, blocks_a] += _transpose_times_blocks(k, B[blocks_a]).T
            dense[rows_b] += k_wide.T @ Vz[rows_a]
    out = torch.cat([raw.to(wide), dense], 1).index_select(0, _block_order_positions(index, mask, X.shape[0]))
    return out.mul_(spec.outputscale.to(wide))


@torch.no_grad()
def symmetric_matmul(spec: StationarySpec, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r""":math:`K(X, X) V` from the upper triangle of kernel tiles (half the kernel work of
    :func:`~pyro_gpx.gp.stationary.stationary_matmul`; no gradient), e.g. a CG iteration's product.
    Kernel entries in ``X``'s dtype, sums in the wider of ``X``'s and ``V``'s."""
    wide = torch.promote_types(X.dtype, V.dtype)
    side = settings.chunk_size.value() or _MATVEC_TILE_POINTS
    Z, V = centred(spec.scale(X))[0], V.to(wide)
    half_sq = _half_sq(Z)
    out = torch.zeros_like(V)
    work = _Workspace()
    for rows_a, _, rows_b, _, diagonal in _tiles(Z.shape[0], side, 1):  # tiles of single points
        k = _widened(_chunk_profile(spec.family, Z[rows_a], Z[rows_b], half_sq[rows_a], half_sq[rows_b], False, work),
                     V, work)  # fmt: skip
        out[rows_a] += k @ V[rows_b]
        if not diagonal:
            out[rows_b] += k.T @ V[rows_a]
    return out.mul_(spec.outputscale.to(wide))
