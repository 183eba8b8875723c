r"""The flow: inputs carried by an SDE whose drift and diffusion are a sparse GP's conditional moments.

For state :math:`x` and whitened inducing outputs :math:`u_d` (one GP per dimension),

.. math::

    dx_d = \mu_d(x)\,dt + \sigma_d(x)\,dW_d, \qquad
    \mu_d(x) = k_{d}(x, Z) L_d^{-\top} u_d, \qquad
    \sigma^2_d(x) = k_d(x, x) - k_d(x, Z) K_{d,ZZ}^{-1} k_d(Z, x),

integrated with ``torchsde.sdeint`` (Itô, diagonal noise, Euler–Maruyama on a fixed grid of
``num_steps`` steps). :class:`GPVectorField` computes :math:`\mu` and :math:`\sigma` together
(``f_and_g``), from :math:`A = K_{xZ} L^{-\top}` (``L^{-1}`` is formed once per solve), so each step
costs one kernel block and one skinny product. :class:`GridBrownian` supplies the increments from
Torch's generator (reproducible under ``torch.manual_seed``) without the interval tree of
``BrownianInterval``, which a fixed grid does not need.
"""

from __future__ import annotations

import torch
import torchsde
from torchsde._brownian import BaseBrownian  # the documented base class of `bm` objects

from .._validation import check_positive_int, is_finite_at_least
from .flow_kernel import KernelState
from .inducing import jittered_cholesky

__all__ = ["GPVectorField", "GridBrownian", "integrate_flow"]


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
        self._cache: tuple | None = None

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`\\mu(x)` and :math:`\\sigma^2(x)`, both ``(B, n, D)``, for ``x`` of shape ``(B, n, D)``."""
        A = self.state.cross(x, self.Z) @ self.L_inv_T  # (B, D_k, n, M)
        var = (self.state.diag(x) - torch.linalg.vector_norm(A, dim=-1).square()).clamp_min(0.0)  # (B, D_k, n)
        if A.shape[1] == 1:  # one shared kernel: one (n, M) block serves all D outputs
            mean = A[:, 0] @ self.u.transpose(-1, -2)  # (B, n, D)
        else:
            mean = (A @ self.u.unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
        return mean, var.transpose(-1, -2).expand_as(mean)

    def f_and_g(self, t, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sdeint evaluates the SDE once at (t0, y0) to check shapes and then again in its first step:
        # the cache makes that one evaluation
        if self._cache is not None and self._cache[0] is y and self._cache[1] == float(t):
            return self._cache[2]
        B = self.u.shape[0]
        x = y.reshape(B, -1, y.shape[-1])
        mean, var = self.moments(x)
        floor = 1e-20 if var.dtype == torch.float64 else 1e-8  # a finite sqrt gradient near 0 (float32: at most 5e3)
        out = mean.reshape(y.shape), var.clamp_min(floor).sqrt().reshape(y.shape)
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
                   keep_path: bool = False) -> torch.Tensor:  # fmt: skip
    """Solve the flow from ``x0`` ``(B, n, D)`` to time ``horizon`` in ``num_steps`` Euler–Maruyama steps.

    :returns: ``x_T`` ``(B, n, D)``, or the path ``(num_steps + 1, B, n, D)`` with ``keep_path``.
    """
    B, n, D = x0.shape
    y0 = x0.reshape(B * n, D)
    bm = GridBrownian(horizon, num_steps, (B * n, D), dtype=x0.dtype, device=x0.device)
    # a step a hair longer than T / K: exactly K solver steps (the last one clipped to T), never a
    # round-off extra step, which would cost a full GP evaluation
    dt = horizon / num_steps * (1 + 1e-9)
    grid = torch.linspace(0.0, horizon, num_steps + 1 if keep_path else 2, dtype=x0.dtype)
    ys = torchsde.sdeint(field, y0, grid, bm=bm, method="euler", dt=dt)
    ys = ys.reshape(len(grid), B, n, D)
    return ys if keep_path else ys[-1]
