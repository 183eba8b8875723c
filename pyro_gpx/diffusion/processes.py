r"""Discretised reference processes and their controlled forward kernels (pure functions).

A sampler carries :math:`z_0` to :math:`z_K` with forward kernels :math:`p_F(z_{k+1}\mid z_k)`;
the reference process supplies backward kernels :math:`p_B(z_k \mid z_{k+1})` from the target
back to the starting distribution. Each path has log weight

.. math::

    \log w = \log\rho(z_K) + \sum_k \log p_B(z_k\mid z_{k+1}) - \log p_{F,0}(z_0)
             - \sum_k \log p_F(z_{k+1}\mid z_k),

whose mean is the extended-space ELBO (:math:`\le \log Z`) and whose log-mean-exp estimates
:math:`\log Z` [1, 2, 3].

* **PIS** [1]: :math:`z_0 = 0`; :math:`p_F(z_{k+1}\mid z_k) = N(z_k + u_k\Delta t, \sigma^2\Delta t)`;
  the reference is Brownian motion from 0, whose backward kernels are the bridge
  :math:`N(z_{k+1}\tfrac{k}{k+1}, \sigma^2\Delta t\tfrac{k}{k+1})` (the step to :math:`z_0 = 0` is a
  point mass in both directions and cancels).
* **DDS** [2]: the reference noises the target with a variance-preserving (Ornstein–Uhlenbeck)
  chain :math:`p_B(z_k\mid z_{k+1}) = N(\sqrt{1-\alpha_k}\,z_{k+1}, \alpha_k\sigma^2)` towards
  :math:`N(0, \sigma^2 I)`; the sampler starts there and uses the exponential-integrator step
  :math:`p_F(z_{k+1}\mid z_k) = N(\sqrt{1-\alpha_k}\,z_k + 2\sigma^2(1-\sqrt{1-\alpha_k})\,u_k,\ \alpha_k\sigma^2)`.
  With :math:`u = 0` this is the stationary chain itself and :math:`\log w = \log\rho - \log N(0, \sigma^2)`.

Why not ``torchsde.sdeint``: the weights need the Gaussian transition density of every step,
evaluated at the very noise increments used to take it, for whole batches of paths; an explicit
loop gives these in closed form (and the exact exponential-integrator step for DDS), where an SDE
solver would return only the states.

References:

[1] Q. Zhang, Y. Chen. Path integral sampler: a stochastic control approach for sampling. ICLR 2022.
[2] F. Vargas, W. Grathwohl, A. Doucet. Denoising diffusion samplers. ICLR 2023.
[3] J. Berner, L. Richter, K. Ullrich. An optimal control perspective on diffusion-based generative
    modeling. TMLR 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ReferenceProcess", "make_process", "gaussian_log_density"]


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """:math:`\\log N(x; \\text{mean}, \\text{var}\\,I)` summed over the last dimension."""
    var = torch.as_tensor(var, dtype=x.dtype)
    d = x.shape[-1]
    return -0.5 * (((x - mean) ** 2).sum(-1) / var + d * torch.log(2 * math.pi * var))


@dataclass(frozen=True)
class ReferenceProcess:
    """A discretised reference process with ``num_steps`` steps.

    :ivar kind: ``"pis"`` or ``"dds"``.
    :ivar sigma: diffusion scale :math:`\\sigma`.
    :ivar horizon: :math:`T` (PIS; :math:`\\Delta t = T/K`).
    :ivar alphas: per-step :math:`\\alpha_k` (DDS).
    """

    kind: str
    num_steps: int
    sigma: float
    horizon: float = 1.0
    alphas: torch.Tensor | None = None

    @property
    def dt(self) -> float:
        return self.horizon / self.num_steps

    def times(self, dtype=torch.float64) -> torch.Tensor:
        """Normalised times :math:`t_k = k/K` of the steps (the drift's time input)."""
        return torch.arange(self.num_steps, dtype=dtype) / self.num_steps

    def initial(self, eps0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`z_0` from standard-normal ``eps0`` and :math:`\\log p_{F,0}(z_0) - \\log N(\\epsilon_0; 0, I)`.

        PIS starts at the point 0 in both directions (its term cancels), so ``eps0`` is unused and
        only its own density is removed.
        """
        if self.kind == "pis":
            zeros = torch.zeros_like(eps0)
            return zeros, -gaussian_log_density(eps0, zeros, 1.0)
        d = eps0.shape[-1]
        return self.sigma * eps0, torch.full(eps0.shape[:-1], -d * math.log(self.sigma), dtype=eps0.dtype)

    def step(self, k: int, z: torch.Tensor, drift: torch.Tensor, eps: torch.Tensor):
        """One forward step from :math:`z_k`: returns :math:`z_{k+1}`,
        :math:`\\log p_F(z_{k+1}\\mid z_k) - \\log N(\\epsilon; 0, I)` and :math:`\\log p_B(z_k\\mid z_{k+1})`."""
        d = z.shape[-1]
        if self.kind == "pis":
            std = self.sigma * math.sqrt(self.dt)
            z_next = z + drift * self.dt + std * eps
        else:
            alpha = float(self.alphas[k])
            keep = math.sqrt(1.0 - alpha)
            std = self.sigma * math.sqrt(alpha)
            z_next = keep * z + 2 * self.sigma**2 * (1 - keep) * drift + std * eps
        log_f_minus_noise = torch.full(z.shape[:-1], -d * math.log(std), dtype=z.dtype)
        return z_next, log_f_minus_noise, self.backward_log_density(k, z, z_next)

    def backward_log_density(self, k: int, z: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_B(z_k\\mid z_{k+1})` of the reference (no drift involved)."""
        if self.kind == "pis":
            if k == 0:  # the bridge ends at the point 0: cancels with the sampler's start
                return torch.zeros(z.shape[:-1], dtype=z.dtype)
            frac = k / (k + 1)
            return gaussian_log_density(z, z_next * frac, self.sigma**2 * self.dt * frac)
        alpha = float(self.alphas[k])
        return gaussian_log_density(z, math.sqrt(1.0 - alpha) * z_next, self.sigma**2 * alpha)

    def forward_log_density(self, k: int, z: torch.Tensor, drift: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_F(z_{k+1}\\mid z_k)` of a given transition (for fixed paths)."""
        if self.kind == "pis":
            return gaussian_log_density(z_next, z + drift * self.dt, self.sigma**2 * self.dt)
        alpha = float(self.alphas[k])
        keep = math.sqrt(1.0 - alpha)
        mean = keep * z + 2 * self.sigma**2 * (1 - keep) * drift
        return gaussian_log_density(z_next, mean, self.sigma**2 * alpha)

    def initial_log_density(self, z0: torch.Tensor) -> torch.Tensor:
        if self.kind == "pis":
            return torch.zeros(z0.shape[:-1], dtype=z0.dtype)
        return gaussian_log_density(z0, torch.zeros_like(z0), self.sigma**2)


def make_process(
    kind: str, num_steps: int, sigma: float = 1.0, horizon: float = 1.0, beta_min: float = 0.1, beta_max: float = 20.0
) -> ReferenceProcess:
    """A PIS (Brownian) or DDS (variance-preserving, linear :math:`\\beta` schedule) reference.

    DDS: with noising time :math:`s = 1 - t` and :math:`\\beta(s) = \\beta_{\\min} + s(\\beta_{\\max}-\\beta_{\\min})`,
    :math:`\\alpha_k = 1 - \\exp(-\\int_{s_{k+1}}^{s_k}\\beta)`, so the reference reaches
    :math:`N(0, \\sigma^2 I)` to within :math:`\\exp(-\\int_0^1\\beta)`.
    """
    if kind not in ("pis", "dds"):
        raise ValueError(f"process must be 'pis' or 'dds', got {kind!r}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if sigma <= 0 or horizon <= 0:
        raise ValueError(f"sigma and horizon must be positive, got {sigma} and {horizon}")
    if kind == "pis":
        return ReferenceProcess("pis", int(num_steps), float(sigma), float(horizon))
    s = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # noising time, 1 -> 0

    def integral(a):
        return beta_min * a + 0.5 * (beta_max - beta_min) * a**2

    alphas = 1.0 - torch.exp(-(integral(s[:-1]) - integral(s[1:])))
    return ReferenceProcess("dds", int(num_steps), float(sigma), 1.0, alphas)
