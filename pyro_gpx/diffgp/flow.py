r"""The flow: inputs carried by an SDE whose drift and diffusion are a sparse GP's conditional moments.

For state :math:`x` and whitened inducing outputs :math:`u_d` (one GP per dimension),

.. math::

    dx_d = \mu_d(x)\,dt + \sigma_d(x)\,dW_d, \qquad
    \mu_d(x) = k_{d}(x, Z) L_d^{-\top} u_d, \qquad
    \sigma^2_d(x) = k_d(x, x) - k_d(x, Z) K_{d,ZZ}^{-1} k_d(Z, x),

integrated with ``torchsde.sdeint`` (Itô, diagonal noise, Euler–Maruyama on a fixed grid of
``num_steps`` steps). :class:`GPVectorField` computes :math:`\mu` and :math:`\sigma` together
(``f_and_g``), from :math:`A = K_{xZ} L^{-\top}` (``L^{-1}`` is formed once per solve), so each step
costs one kernel block and one skinny product; the backward pass of a step is written out
(:class:`_WhitenedMoments`), and the first step, where every path starts from the same inputs, is
evaluated once per input (``integrate_flow(..., copies=S)``). :class:`GridBrownian` supplies the
increments from Torch's generator (reproducible under ``torch.manual_seed``) without the interval tree of
``BrownianInterval``, which a fixed grid does not need.
"""

from __future__ import annotations

import torch
import torchsde
from torch.autograd.function import once_differentiable
from torchsde._brownian import BaseBrownian  # the documented base class of `bm` objects

from .._validation import check_positive_int, is_finite_at_least
from .flow_kernel import KernelState
from .inducing import jittered_cholesky

__all__ = ["GPVectorField", "GridBrownian", "integrate_flow"]


class _WhitenedMoments(torch.autograd.Function):
    r"""The flow's conditional moments from the kernel block :math:`K_{xZ}` ``(B, D_k, n, M)``,
    ``U`` :math:`= L^{-\top}` ``(Bk, D_k, M, M)`` and the whitened inducing outputs ``u`` ``(B, D, M)``:
    with ``A = K U``, the means ``(B, n, D)`` (:math:`A_d u_d`, or :math:`A u^\top` for one shared kernel)
    and the squared row norms ``(B, D_k, n)`` of ``A``. ``K`` is given, or (RBF, ``z_aug`` given) it is
    ``exp(x_aug @ z_aug^T)`` from augmented rows ``x_aug`` (:meth:`KernelState.rbf_features`).

    The forward pass is the same tensor algebra as the plain expressions; the backward pass is written
    out: the gradient with respect to ``A`` is one pass over the ``(n, M)`` blocks (:math:`2\bar q A` plus
    the means' outer product, fused) instead of the norm's division, masking and products, a separate
    outer product and their sum, which together cost as much as the products with ``U``; the exponential
    and its derivative run in place."""

    @staticmethod
    def forward(ctx, K: torch.Tensor, z_aug: torch.Tensor | None, U: torch.Tensor, u: torch.Tensor):  # type: ignore[override]
        x_aug = None
        if z_aug is not None:
            x_aug, K = K, (K @ z_aug.transpose(-1, -2)).exp_()
        A = K @ U  # (B, D_k, n, M)
        sq = torch.linalg.vector_norm(A, dim=-1).square()
        if A.shape[1] == 1:  # one shared kernel: one (n, M) block serves all D outputs
            mean = A[:, 0] @ u.transpose(-1, -2)  # (B, n, D)
        else:
            mean = (A @ u.unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
        ctx.save_for_backward(x_aug, z_aug, K, U, u, A)
        return mean, sq

    @staticmethod
    @once_differentiable  # K and A are saved from the forward pass: no second derivatives
    def backward(ctx, g_mean: torch.Tensor, g_sq: torch.Tensor):  # type: ignore[override]
        x_aug, z_aug, K, U, u, A = ctx.saved_tensors
        need_x, need_z, need_U, need_u = ctx.needs_input_grad
        B, D_k, n, M = A.shape
        # the means are A v with v = u_d (M, 1) per kernel, or u^T (M, D) for one shared kernel: their
        # gradients ride along as extra columns, g_A_ext = [2 g_sq A | g_mean] and U_ext = [U | U v], so
        # g_K = g_A_ext U_ext^T and K^T g_A_ext = [g_U | K^T g_mean] are one product each
        v = u.unsqueeze(-1) if D_k > 1 else u.transpose(-1, -2).unsqueeze(1)  # (B, D_k, M, c)
        c = v.shape[-1]
        g_ext = A.new_empty((B, D_k, n, M + c))
        torch.mul(A, (2.0 * g_sq).unsqueeze(-1), out=g_ext[..., :M])
        g_ext[..., M:] = g_mean.transpose(-1, -2).unsqueeze(-1) if D_k > 1 else g_mean.unsqueeze(1)
        g_U = g_u = None
        if need_U or need_u:
            G = K.transpose(-1, -2) @ g_ext  # (B, D_k, M, M + c)
            g_v = G[..., M:]  # K^T g_mean
            if need_U:
                g_U = (G[..., :M] + g_v @ v.transpose(-1, -2)).sum_to_size(U.shape)
            if need_u:
                g_v = U.transpose(-1, -2) @ g_v  # A^T g_mean
                g_u = g_v.squeeze(-1) if D_k > 1 else g_v[:, 0].transpose(-1, -2)
        if not (need_x or need_z):
            return None, None, g_U, g_u
        U_ext = torch.cat([U.expand(B, D_k, M, M), U @ v], -1)
        g_K = g_ext @ U_ext.transpose(-1, -2)
        if z_aug is None:
            return g_K.sum_to_size(K.shape), None, g_U, g_u
        g_P = g_K.mul_(K)  # through exp
        g_x = (g_P @ z_aug).sum_to_size(x_aug.shape) if need_x else None
        g_z = (g_P.transpose(-1, -2) @ x_aug).sum_to_size(z_aug.shape) if need_z else None
        return g_x, g_z, g_U, g_u


class GPVectorField(torch.nn.Module):
    """Drift and diffusion of the flow for a batch of draws.

    :param state: the flow kernels (:class:`~pyro_gpx.diffgp.flow_kernel.KernelState`).
    :param Z: ``(M, D)`` inducing inputs; :param u: ``(B, D, M)`` whitened inducing outputs.
    :param jitter: added to :math:`K_{ZZ}`.

    ``torchsde`` sees the state flattened to ``(B * n, D)``; :meth:`f_and_g` reshapes it to
    ``(B, n, D)``.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, state: KernelState, Z: torch.Tensor, u: torch.Tensor, jitter: float = 1e-6):
        super().__init__()
        self.state, self.Z, self.u = state, Z, u
        L = jittered_cholesky(state.gram(Z), jitter)  # (Bk, D_k, M, M)
        eye = torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)
        self.L_inv_T = torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)
        self._rbf = state.rbf_features(Z)  # RBF: Z's half of the kernel block, once for all steps
        self._cache: tuple | None = None
        #: ``(y0, copies)`` while :func:`integrate_flow` solves from a ``y0`` made of identical blocks
        self._start: tuple[torch.Tensor, int] | None = None

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`\\mu(x)` and :math:`\\sigma^2(x)`, both ``(B, n, D)``, for ``x`` of shape ``(B, n, D)``."""
        if self._rbf is not None:
            z_aug, x_features = self._rbf
            mean, sq = _WhitenedMoments.apply(x_features(x), z_aug, self.L_inv_T, self.u)
        else:
            mean, sq = _WhitenedMoments.apply(self.state.cross(x, self.Z), None, self.L_inv_T, self.u)
        var = (self.state.diag(x) - sq).clamp_min(0.0)  # (B, D_k, n)
        return mean, var.transpose(-1, -2).expand_as(mean)

    def f_and_g(self, t, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sdeint evaluates the SDE once at (t0, y0) to check shapes and then again in its first step:
        # the cache makes that one evaluation
        if self._cache is not None and self._cache[0] is y and self._cache[1] == float(t):
            return self._cache[2]
        B = self.u.shape[0]
        x = y.reshape(B, -1, y.shape[-1])
        copies = self._start[1] if self._start is not None and self._start[0] is y else 1
        if copies > 1:  # every path starts at the same inputs: one evaluation serves all of them
            x = x[:, : x.shape[1] // copies]
        mean, var = self.moments(x)
        floor = 1e-20 if var.dtype == torch.float64 else 1e-8  # a finite sqrt gradient near 0 (float32: at most 5e3)
        sd = var.clamp_min(floor).sqrt()
        if copies > 1:
            mean, sd = (v.unsqueeze(1).expand((B, copies) + v.shape[1:]) for v in (mean, sd))
        out = mean.reshape(y.shape), sd.reshape(y.shape)
        self._cache = (y, float(t), out)
        return out


class GridBrownian(BaseBrownian):
    """Brownian motion on ``[0, T]`` drawn at the grid ``t_k = k T / K`` (piecewise linear between grid
    points); ``size`` is ``(batch, channels)``. Queries on grid points are exact Brownian increments."""

    def __init__(self, horizon: float, num_steps: int, size: tuple[int, int], dtype=torch.float64, device=None):
        if not is_finite_at_least(horizon, 0.0, strict=True):
            raise ValueError(f"horizon must be a finite positive number, got {horizon!r}")
        self._T, self._K = float(horizon), check_positive_int("num_steps", num_steps)
        self._size, self._dtype, self._device = torch.Size(size), dtype, device
        dt = self._T / self._K
        steps = torch.randn((self._K,) + self._size, dtype=dtype, device=device) * dt**0.5
        self._W = torch.cat([torch.zeros((1,) + self._size, dtype=dtype, device=device), steps.cumsum(0)])

    def _at(self, t: float) -> torch.Tensor:
        s = min(max(float(t) / self._T * self._K, 0.0), float(self._K))
        k = min(int(s), self._K - 1)
        w = s - k
        return self._W[k] if w == 0.0 else (1 - w) * self._W[k] + w * self._W[k + 1]

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("GridBrownian has no space-time or Levy area (use Euler-Maruyama)")
        return self._at(ta) if tb is None else self._at(tb) - self._at(ta)

    def __repr__(self) -> str:
        return f"GridBrownian(T={self._T}, steps={self._K}, size={tuple(self._size)})"

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return self._size

    @property
    def levy_area_approximation(self):
        return "none"


def integrate_flow(field: GPVectorField, x0: torch.Tensor, horizon: float, num_steps: int,
                   keep_path: bool = False, *, copies: int = 1) -> torch.Tensor:  # fmt: skip
    """Solve the flow from ``x0`` ``(B, n, D)`` to time ``horizon`` in ``num_steps`` Euler–Maruyama steps.

    :param copies: ``x0[b]`` is ``copies`` identical blocks of ``n / copies`` rows (the paths of one batch
        of inputs): the field is evaluated at the start once per block, not once per row (the same values,
        ``copies`` times cheaper). The caller vouches for the repetition; it is not checked.
    :returns: ``x_T`` ``(B, n, D)``, or the path ``(num_steps + 1, B, n, D)`` with ``keep_path``.
    """
    B, n, D = x0.shape
    copies = check_positive_int("copies", copies)
    if n % copies:
        raise ValueError(f"x0 has {n} rows per draw, not a multiple of copies={copies}")
    y0 = x0.reshape(B * n, D)
    bm = GridBrownian(horizon, num_steps, (B * n, D), dtype=x0.dtype, device=x0.device)
    # a step a hair longer than T / K: exactly K solver steps (the last one clipped to T), never a
    # round-off extra step, which would cost a full GP evaluation
    dt = horizon / num_steps * (1 + 1e-9)
    grid = torch.linspace(0.0, horizon, num_steps + 1 if keep_path else 2, dtype=x0.dtype)
    field._start = (y0, copies)
    try:
        ys = torchsde.sdeint(field, y0, grid, bm=bm, method="euler", dt=dt)
    finally:
        field._start = None
    ys = ys.reshape(len(grid), B, n, D)
    return ys if keep_path else ys[-1]
