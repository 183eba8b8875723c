r"""Fused kernel products for stationary kernels, with an analytic backward pass.

For :math:`k(x, x') = s^2\,\kappa(\rho)` with :math:`\rho = \|z - z'\|^2`, :math:`z = x / \ell`
(ARD lengthscales), the products computation-aware inference needs,

.. math:: O = K(X_1, X_2)\,V \quad\text{(dense actions)}, \qquad
          O_{\cdot a} = K(X_1, X_{B_a})\, b_a \quad\text{(block-sparse actions)},

are formed chunk by chunk and never stored. Autograd through a chunked product keeps every chunk
for the backward pass (O(n^2) memory) or recomputes it with a full autograd graph; here the
backward pass is written out. With :math:`W = \partial L / \partial K` (a chunk; :math:`G V^\top`
for dense, :math:`G_{r a} b_{a m}` for block-sparse actions) and
:math:`M = s^2\, W \odot \kappa'(\rho)`:

.. math::

    \frac{\partial L}{\partial s^2} = \frac{\sum W \odot K}{s^2}, \qquad
    \frac{\partial L}{\partial Z_1} = 2\big(\operatorname{diag}(M\mathbf 1) Z_1 - M Z_2\big), \qquad
    \frac{\partial L}{\partial Z_2} = 2\big(\operatorname{diag}(M^\top\mathbf 1) Z_2 - M^\top Z_1\big),

and :math:`\partial L/\partial V = K^\top G` (dense) or
:math:`\partial L / \partial b_{am} = \sum_r G_{ra} K_{r,(a,m)}` (block-sparse). Gradients with
respect to the lengthscales follow from :math:`z = x/\ell` by ordinary autograd. Each pass costs
a few elementwise operations and two skinny matrix products per kernel entry.

Supported: RBF and Matérn (:math:`\nu = 1/2, 3/2, 5/2`) from GPyTorch (those exact classes, not
subclasses, optionally inside a ``ScaleKernel``, without ``active_dims`` or batch shapes) and
``pyro.contrib.gp`` (``RBF``, ``Exponential``, ``Matern32``, ``Matern52``, on their ``active_dims``);
other kernels use the generic path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gpytorch
import numpy as np
import torch
from pyro.contrib.gp import kernels as contrib_kernels

from . import settings

__all__ = [
    "StationarySpec",
    "stationary_spec",
    "stationary_matmul",
    "stationary_matmul_accumulate",
    "stationary_block_matmul",
]

_SQRT3, _SQRT5 = math.sqrt(3.0), math.sqrt(5.0)


def _profile(family: str, rho: torch.Tensor, derivative: bool = False):
    """:math:`\\kappa(\\rho)` and, if asked, :math:`\\kappa'(\\rho)` (derivative in :math:`\\rho = r^2`)."""
    if family == "rbf":
        k = torch.exp(-0.5 * rho)
        return (k, -0.5 * k) if derivative else k
    # without the explicit derivative (the autograd path of dense blocks) r is clamped above zero: at
    # rho = 0 (the diagonal of K(X, X)) the sqrt's derivative is infinite and autograd would form
    # 0 * inf = NaN; d(rho_ii)/d(hyperparameters) = 0 there, so any finite value will do
    r = rho.clamp_min(0 if derivative else torch.finfo(rho.dtype).tiny).sqrt()
    if family == "matern12":
        e = torch.exp(-r)
        if not derivative:
            return e
        return e, torch.where(r > 0, -e / (2 * r.clamp_min(1e-30)), torch.zeros_like(r))
    if family == "matern32":
        e = torch.exp(-_SQRT3 * r)
        k = (1 + _SQRT3 * r) * e
        return (k, -1.5 * e) if derivative else k
    if family == "matern52":
        e = torch.exp(-_SQRT5 * r)
        k = (1 + _SQRT5 * r + 5.0 / 3.0 * rho) * e
        return (k, -5.0 / 6.0 * (1 + _SQRT5 * r) * e) if derivative else k
    raise ValueError(f"unknown stationary family {family!r}")


def centred(Z1: torch.Tensor, Z2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""``Z1`` and ``Z2`` shifted by one point (the mean of ``Z2``'s rows, else ``Z1``'s; a constant for
    autograd): a stationary kernel is unchanged, and the expansion :math:`\|z\|^2 + \|z'\|^2 - 2z^\top z'`
    that the fused products use loses about :math:`\epsilon\,\|z\|^2` to cancellation, which for
    inputs far from the origin (years, coordinates; :math:`\|z\| = 300` in float32) swamps the
    distances themselves."""
    ref = Z2 if Z2 is not None and Z2.shape[0] else Z1
    if ref.shape[0] == 0:
        return Z1, Z2
    c = ref.detach().mean(0)
    return Z1 - c, (None if Z2 is None else Z2 - c)


def _sqdist(Z1: torch.Tensor, Z2: torch.Tensor) -> torch.Tensor:
    Z1, Z2c = centred(Z1, Z2)
    assert Z2c is not None
    d = (Z1 * Z1).sum(-1, keepdim=True) - 2 * Z1 @ Z2c.T + (Z2c * Z2c).sum(-1)
    return d.clamp_min_(0)


#: multiple of eps * (|z|^2 + |z'|^2) below which Matern-1/2's rho is rounding and is set to 0
_SNAP = 8.0


def _matern12_rho(Z1: torch.Tensor, Z2: torch.Tensor) -> torch.Tensor:
    r""":math:`\rho` for Matern-1/2, whose :math:`e^{-\sqrt\rho}` turns the expansion's rounding,
    :math:`\epsilon\|z\|^2` in :math:`\rho`, into :math:`\sqrt{\epsilon}\|z\|` in the kernel (2e-3 on
    its diagonal in float32): formed in float64, and distances within rounding of zero (the diagonal,
    repeated inputs) set to exactly zero, where the kernel is flat in the other families."""
    Z1, Z2c = centred(Z1.double(), Z2.double())
    assert Z2c is not None
    return _matern12_chunk_rho(Z1, Z2c)


@dataclass(frozen=True)
class StationarySpec:
    r""":math:`k(x, x') = s^2 \kappa(\|x/\ell - x'/\ell\|^2)`: family, lengthscales and scale."""

    family: str
    lengthscale: torch.Tensor  # () or (d,)
    outputscale: torch.Tensor  # ()
    active_dims: tuple[int, ...] | None = None  # the input columns the kernel reads (None: all)

    def columns(self, X: torch.Tensor) -> torch.Tensor:
        """The input columns the kernel acts on (``pyro.contrib.gp``'s ``active_dims``)."""
        active = self.active_dims
        if active is None or (X.shape[-1] == len(active) and active == tuple(range(len(active)))):
            return X
        return X[..., list(active)]

    def scale(self, X: torch.Tensor) -> torch.Tensor:
        return self.columns(X) / self.lengthscale.to(X.dtype)

    def dense(self, X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
        Z1, Z2 = self.scale(X1), self.scale(X2)
        if self.family == "matern12":
            return self.outputscale.to(X1.dtype) * _profile(self.family, _matern12_rho(Z1, Z2)).to(X1.dtype)
        return self.outputscale.to(X1.dtype) * _profile(self.family, _sqdist(Z1, Z2))

    def diag(self, X: torch.Tensor) -> torch.Tensor:
        return self.outputscale.to(X.dtype).expand(X.shape[0])


def _gpytorch_family(kernel) -> str | None:
    # exact types: a subclass (RBFKernelGrad, a user's warped RBF) computes something else
    if type(kernel) is gpytorch.kernels.RBFKernel:
        return "rbf"
    if type(kernel) is gpytorch.kernels.MaternKernel:
        return {0.5: "matern12", 1.5: "matern32", 2.5: "matern52"}.get(float(kernel.nu))
    return None


_CONTRIB = {
    contrib_kernels.RBF: "rbf",
    contrib_kernels.Exponential: "matern12",
    contrib_kernels.Matern32: "matern32",
    contrib_kernels.Matern52: "matern52",
}


def stationary_spec(kernel) -> StationarySpec | None:
    """Read a supported stationary kernel's hyperparameters (inside the model run); else ``None``."""
    if isinstance(kernel, gpytorch.kernels.Kernel):
        if kernel.batch_shape != torch.Size() or kernel.active_dims is not None:
            return None
        outputscale = None
        base = kernel
        if type(kernel) is gpytorch.kernels.ScaleKernel:
            outputscale, base = kernel.outputscale, kernel.base_kernel
            if base.batch_shape != torch.Size() or base.active_dims is not None:
                return None
        family = _gpytorch_family(base)
        if family is None:
            return None
        lengthscale = _one_draw("lengthscale", base.lengthscale, (1, base.ard_num_dims or 1))
        if outputscale is None:
            outputscale = torch.ones((), dtype=lengthscale.dtype)
        return StationarySpec(family, lengthscale, outputscale.reshape(()))
    family = _CONTRIB.get(type(kernel))
    if family is None:
        return None
    active = getattr(kernel, "active_dims", None)  # Pyro's default: the first input_dim columns
    active = tuple(int(i) for i in (active if active is not None else range(kernel.input_dim)))
    lengthscale = _one_draw("lengthscale", kernel.lengthscale, (1, len(active)))
    return StationarySpec(family, lengthscale, kernel.variance.reshape(()), active)


def _one_draw(name: str, value: torch.Tensor, sizes: tuple[int, int]) -> torch.Tensor:
    """The hyperparameter as a vector, refusing a batch of draws (read as ARD values, they would give
    another kernel, silently)."""
    if value.numel() not in sizes:
        expected = " or ".join(str(k) for k in sorted(set(sizes)))
        raise ValueError(
            f"the kernel's {name} has shape {tuple(value.shape)}: expected {expected} value(s) (a batch of "
            "hyperparameter draws is not supported; run one draw at a time)"
        )
    return value.reshape(-1)


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """In-place exp; NumPy's vectorised exp is about twice as fast as torch's on CPU (no autograd here)."""
    if t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.float64):
        array = t.numpy()
        np.exp(array, out=array)
        return t
    return t.exp_()


class _Workspace:
    """Tile buffers reused across the chunks of one pass. A fresh multi-MB tensor per chunk is
    handed back to the OS when freed and page-faults in again on the next chunk; on CPU that cost
    more than the arithmetic."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[name] = like.new_empty(size)
        return buffer[:size].view(shape)


def _chunk_profile(family, Z1c, Z2, half_sq1c, half_sq2, derivative, work: _Workspace | None = None):
    """kappa (and kappa') on a chunk, computed in place from one GEMM: -rho/2 = z1.z2 - |z1|^2/2 - |z2|^2/2.

    With ``work``, the results live in its buffers until the next call."""
    work = work or _Workspace()
    A = torch.addmm(half_sq2[None, :], Z1c, Z2.T, beta=-1.0, out=work("A", (Z1c.shape[0], Z2.shape[0]), Z1c))
    A.sub_(half_sq1c[:, None]).clamp_max_(0.0)
    if family == "rbf":
        k = _exp_(A)
        return (k, None) if derivative else k  # kappa' = -kappa / 2, applied by the caller
    if family in _MATERN_ROOT:
        return _matern_inplace(family, A, derivative, work)
    if family == "matern12":  # (see _matern12_rho: the chunk's rho again, in float64 and snapped at zero)
        rho = _matern12_chunk_rho(Z1c, Z2)
        out = _profile(family, rho, derivative)
        return tuple(t.to(Z1c.dtype) for t in out) if derivative else out.to(Z1c.dtype)
    return _profile(family, A.mul_(-2.0), derivative)


def _matern12_chunk_rho(Z1c, Z2):
    """:func:`_matern12_rho` on a chunk of the fused products (inputs centred by the caller; the squared
    norms again in float64, not the callers' float32 ones)."""
    Z1c, Z2 = Z1c.double(), Z2.double()
    sq1, sq2 = (Z1c * Z1c).sum(-1)[:, None], (Z2 * Z2).sum(-1)[None, :]
    d = torch.addmm(sq1 + sq2, Z1c, Z2.T, alpha=-2.0)
    floor = (_SNAP * torch.finfo(torch.float64).eps) * (sq1 + sq2)
    return torch.where(d > floor, d, torch.zeros((), dtype=d.dtype))


_MATERN_ROOT = {"matern32": 6.0, "matern52": 10.0}  # t = sqrt(nu') r = sqrt(-c A) with A = -rho/2


def _matern_inplace(family, A, derivative, work):
    """Matern-3/2 / 5/2 kappa (and kappa') from A = -rho/2 in few in-place passes (same values as
    :func:`_profile`); ``A`` is overwritten."""
    t = A.mul_(-_MATERN_ROOT[family]).sqrt_()
    e = _exp_(torch.neg(t, out=work("e", A.shape, A)))
    if family == "matern32":  # kappa = (1 + t) e, kappa' = -3/2 e
        k = t.add_(1.0).mul_(e)
        return (k, e.mul_(-1.5)) if derivative else k
    k = torch.mul(t, t, out=work("t2", A.shape, A)).mul_(1.0 / 3.0).add_(t).add_(1.0).mul_(e)  # (1 + t + t^2/3) e
    return (k, t.add_(1.0).mul_(e).mul_(-5.0 / 6.0)) if derivative else k  # kappa' = -5/6 (1 + t) e


def _half_sq(Z):
    return 0.5 * (Z * Z).sum(-1)


def _widened(k: torch.Tensor, like: torch.Tensor, work: _Workspace) -> torch.Tensor:
    """The kernel chunk ``k`` in ``like``'s dtype (a workspace copy when that is wider)."""
    return k if k.dtype == like.dtype else work("wide", k.shape, like).copy_(k)


def _forward(Z1, Z2, weights, s2, family, chunk, combine, width):
    """Row chunks of s^2 * combine(kappa chunk, weights)."""
    out = torch.empty(Z1.shape[0], width, dtype=Z1.dtype)
    h1, h2 = _half_sq(Z1), _half_sq(Z2)
    work = _Workspace()
    for start in range(0, Z1.shape[0], chunk):
        rows = slice(start, start + chunk)
        out[rows] = combine(_chunk_profile(family, Z1[rows], Z2, h1[rows], h2, False, work), weights)
    return out.mul_(s2)


def _backward(Z1, Z2, weights, s2, family, chunk, G, chunk_grads):
    """Shared backward loop: ``chunk_grads(k, dk, G_rows, weights, s2, g_weights)`` adds the chunk's
    weight gradient in place and returns (M, d loss / d s^2 of the chunk); the input gradients
    follow from M (module docstring)."""
    gZ1, gZ2 = torch.zeros_like(Z1), torch.zeros_like(Z2)
    g_weights, gs = torch.zeros_like(weights), torch.zeros((), dtype=Z1.dtype)
    h1, h2 = _half_sq(Z1), _half_sq(Z2)
    work = _Workspace()
    for start in range(0, Z1.shape[0], chunk):
        rows = slice(start, start + chunk)
        k, dk = _chunk_profile(family, Z1[rows], Z2, h1[rows], h2, True, work)
        M, gs_chunk = chunk_grads(k, dk, G[rows], weights, s2, g_weights)
        gs += gs_chunk
        gZ1[rows] = 2 * (M.sum(1, keepdim=True) * Z1[rows] - M @ Z2)
        gZ2 += 2 * (M.sum(0)[:, None] * Z2 - M.T @ Z1[rows])
    return gZ1, gZ2, g_weights, gs.reshape(s2.shape)


def _dense_grads(k, dk, Gr, V, s2, gV):
    gV.addmm_(k.T, Gr, alpha=float(s2))
    W = Gr @ V.T
    gs = (W * k).sum()
    M = W.mul_(k).mul_(-0.5 * s2) if dk is None else W.mul_(dk).mul_(s2)  # RBF: kappa' = -kappa/2
    return M, gs


def _block_grads(k, dk, Gr, B, s2, gB):
    i, m = B.shape
    k3 = k.view(-1, i, m)
    gB += (k3 * Gr[:, :, None]).sum(0) * s2
    W = k3 * B  # kappa_{r,(a,m)} B_am; times G_ra below gives W (.) kappa
    gs = (W.sum(-1) * Gr).sum()
    if dk is None:  # RBF: kappa' = -kappa/2
        M = W.mul_(Gr[:, :, None]).mul_(-0.5 * s2)
    else:
        M = dk.view(-1, i, m).mul_(B).mul_(Gr[:, :, None]).mul_(s2)
    return M.view(-1, i * m), gs


class _DenseProduct(torch.autograd.Function):
    """O = s^2 kappa(sqdist(Z1, Z2)) @ V, chunked over the rows of Z1."""

    @staticmethod
    def forward(ctx, Z1, Z2, V, outputscale, family, chunk):
        ctx.save_for_backward(Z1, Z2, V, outputscale)
        ctx.family, ctx.chunk = family, chunk
        return _forward(Z1, Z2, V, outputscale, family, chunk, torch.matmul, V.shape[1])

    @staticmethod
    def backward(ctx, G):
        return (*_backward(*ctx.saved_tensors, ctx.family, ctx.chunk, G, _dense_grads), None, None)


class _BlockProduct(torch.autograd.Function):
    """O[r, a] = sum_m s^2 kappa(sqdist(z1_r, z2_{a,m})) B[a, m], chunked over rows."""

    @staticmethod
    def forward(ctx, Z1, Z2, B, outputscale, family, chunk):
        i, m = B.shape
        ctx.save_for_backward(Z1, Z2, B, outputscale)
        ctx.family, ctx.chunk = family, chunk

        def combine(k, weights):
            return k.view(-1, i, m).mul_(weights).sum(-1)

        return _forward(Z1, Z2, B, outputscale, family, chunk, combine, i)

    @staticmethod
    def backward(ctx, G):
        return (*_backward(*ctx.saved_tensors, ctx.family, ctx.chunk, G, _block_grads), None, None)


def stationary_matmul(spec: StationarySpec, X1: torch.Tensor, X2: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """:math:`K(X_1, X_2) V` for a stationary kernel (fused, chunked, analytic backward)."""
    dtype = X1.dtype
    chunk = settings.chunk_size.rows(X2.shape[0], fused=True)
    Z1, Z2 = centred(spec.scale(X1), spec.scale(X2))
    return _DenseProduct.apply(Z1, Z2, V.to(dtype), spec.outputscale.to(dtype), spec.family, chunk)


@torch.no_grad()
def stationary_matmul_accumulate(
    spec: StationarySpec, X1: torch.Tensor, X2: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """:math:`K(X_1, X_2) V` with kernel entries in ``X1``'s dtype and the product in ``V``'s (e.g.
    float32 entries, float64 sums over the columns of :math:`K`); no gradient."""
    chunk = settings.chunk_size.rows(X2.shape[0], fused=True)
    Z1, Z2 = centred(spec.scale(X1), spec.scale(X2))
    assert Z2 is not None
    h1, h2 = _half_sq(Z1), _half_sq(Z2)
    out = V.new_empty(X1.shape[0], V.shape[1])
    work = _Workspace()
    for start in range(0, Z1.shape[0], chunk):
        rows = slice(start, start + chunk)
        k = _chunk_profile(spec.family, Z1[rows], Z2, h1[rows], h2, False, work)
        torch.matmul(_widened(k, V, work), V, out=out[rows])
    return out.mul_(spec.outputscale.to(V.dtype))


def stationary_block_matmul(
    spec: StationarySpec, X1: torch.Tensor, X_blocks_flat: torch.Tensor, blocks: torch.Tensor
) -> torch.Tensor:
    """:math:`K(X_1, X) S` for block-sparse :math:`S` (``X_blocks_flat`` holds the blocks' points in order)."""
    dtype = X1.dtype
    chunk = settings.chunk_size.rows(X_blocks_flat.shape[0], fused=True)
    Z1, Z2 = centred(spec.scale(X1), spec.scale(X_blocks_flat))
    return _BlockProduct.apply(Z1, Z2, blocks.to(dtype), spec.outputscale.to(dtype), spec.family, chunk)
