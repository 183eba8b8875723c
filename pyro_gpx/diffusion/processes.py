r"""Discretised reference processes and their controlled forward kernels (pure functions).

A sampler carries :math:`z_0` to :math:`z_K` with forward kernels :math:`p_F(z_{k+1}\mid z_k)`;
the reference process supplies backward kernels :math:`p_B(z_k \mid z_{k+1})` from the target
back to the starting distribution. Each path has log weight

.. math::

    \log w = \log\rho(z_K) + \sum_k \log p_B(z_k\mid z_{k+1}) - \log p_{F,0}(z_0)
             - \sum_k \log p_F(z_{k+1}\mid z_k),

whose mean is the extended-space ELBO (:math:`\le \log Z`) and whose log-mean-exp estimates
:math:`\log Z` [1, 2, 3].

* **PIS** [1]: :math:`z_0 = 0`; :math:`p_F(z_{k+1}\mid z_k) = N(z_k + u_k\Delta t_k, \sigma^2\Delta t_k)`
  on a time grid :math:`0 = t_0 < \dots < t_K = T` (:math:`\Delta t_k = t_{k+1} - t_k`; uniform by default);
  the reference is Brownian motion from 0, whose backward kernels are the bridge
  :math:`N(z_{k+1}\tfrac{t_k}{t_{k+1}}, \sigma^2\Delta t_k\tfrac{t_k}{t_{k+1}})` (the step to :math:`z_0 = 0` is a
  point mass in both directions and cancels). Both are exact for any grid, so the last steps may be
  shortened (``grid_power``) without changing the reference.
* **DDS** [2]: the reference noises the target with a variance-preserving (Ornstein–Uhlenbeck)
  chain :math:`p_B(z_k\mid z_{k+1}) = N(\sqrt{1-\alpha_k}\,z_{k+1}, \alpha_k\sigma^2)` towards
  :math:`N(0, \sigma^2 I)`; the sampler starts there and uses the exponential-integrator step
  :math:`p_F(z_{k+1}\mid z_k) = N(\sqrt{1-\alpha_k}\,z_k + 2\sigma^2(1-\sqrt{1-\alpha_k})\,u_k,\ \alpha_k\sigma^2)`.
  With :math:`u = 0` this is the stationary chain itself and :math:`\log w = \log\rho - \log N(0, \sigma^2)`.
* **DIS** [3]: the time reversal of the same variance-preserving noising SDE
  :math:`dX_s = -\tfrac12\beta(s)X_s\,ds + \sigma\sqrt{\beta(s)}\,dW_s` (the :math:`\beta` schedule and
  :math:`\sigma` of DDS), started at :math:`N(0, \sigma^2 I)`; the generative SDE has drift
  :math:`\tfrac12\beta y + \sigma^2\beta\,u(y, t)`, where :math:`u` plays the role of the score of the
  noised target (the optimal :math:`u` is :math:`\nabla\log p_{1-t}`). Both kernels are Euler–Maruyama
  steps (:math:`\Delta t = 1/K`), of the generative SDE forwards and of the noising SDE backwards, with
  one :math:`\beta` per step, its mean :math:`\bar\beta_k = \int_{s_{k+1}}^{s_k}\beta\,/\,\Delta t` over the
  step (:math:`s_k = 1 - k/K`; the midpoint value of the linear schedule; DDS's
  :math:`\alpha_k = 1 - e^{-\bar\beta_k\Delta t}`):
  :math:`p_F(z_{k+1}\mid z_k) = N(z_k + b_k\Delta t,\ \sigma^2\bar\beta_k\Delta t)` with the drift
  :math:`b_k = \tfrac12\bar\beta_k z_k + \sigma^2\bar\beta_k u_k`, and
  :math:`p_B(z_k\mid z_{k+1}) = N((1 - \tfrac12\bar\beta_k\Delta t)\,z_{k+1},\ \sigma^2\bar\beta_k\Delta t)`.
  (Evaluating each kernel's :math:`\beta` at the time its step starts from instead, :math:`\beta(s_k)`
  forwards and :math:`\beta(s_{k+1})` backwards, mismatches the two kernels' variances by up to a factor
  :math:`\beta(\Delta t)/\beta_{\min}` in the last step: with the optimal control on a 2-d Gaussian target,
  32 steps and the default schedule, the ELBO was 6.1 nats below :math:`\log Z`, against 0.06 here.)
  The drift network gives :math:`r_k = u_k + z_k/\sigma^2`, the score's deviation from the reference's
  stationary score (in the continuous-time limit this is DDS's :math:`u`), so the forward mean is
  :math:`(1 - \tfrac12\bar\beta_k\Delta t)\,z_k + \sigma^2\bar\beta_k\Delta t\,r_k`: DIS's kernels are the
  first-order expansions of DDS's. With :math:`r = 0` (:math:`u` the stationary score) the chain is the
  Euler–Maruyama discretisation of the stationary OU process, which, unlike DDS's chain, is *not*
  exactly stationary (its variance map :math:`v \mapsto (1 - \tfrac12\bar\beta\Delta t)^2 v + \sigma^2\bar\beta\Delta t`
  has the fixed point :math:`\sigma^2/(1 - \tfrac14\bar\beta\Delta t)`): even for the target
  :math:`N(0, \sigma^2 I)` the log weights vary. They are exact density ratios of the discrete chains all
  the same: their mean is an ELBO and their mean-exp an unbiased estimate of :math:`Z`. Every step must
  contract, :math:`\tfrac12\bar\beta_k\Delta t < 1`, which takes ``num_steps >= 10`` with the default schedule.

Why not ``torchsde.sdeint``: the weights need the Gaussian transition density of every step,
evaluated at the very noise increments used to take it, for whole batches of paths; an explicit
loop gives these in closed form (and the exact exponential-integrator step for DDS), where an SDE
solver would return only the states (its Euler–Maruyama step for DIS would be the same update).

References:

[1] Q. Zhang, Y. Chen. Path integral sampler: a stochastic control approach for sampling. ICLR 2022.
[2] F. Vargas, W. Grathwohl, A. Doucet. Denoising diffusion samplers. ICLR 2023.
[3] J. Berner, L. Richter, K. Ullrich. An optimal control perspective on diffusion-based generative
    modeling. TMLR 2024.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._validation import is_finite_at_least, is_integer

__all__ = ["ReferenceProcess", "make_process", "gaussian_log_density"]


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """:math:`\\log N(x; \\text{mean}, \\text{var}\\,I)` summed over the last dimension."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):  # var would be cast to x's dtype
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(var, torch.Tensor) and not is_finite_at_least(var, 0.0, strict=True):  # cheap: a number
        raise ValueError(f"var must be a positive finite number, got {var!r}")
    var = torch.as_tensor(var, dtype=x.dtype)
    d = x.shape[-1]
    return -0.5 * (((x - mean) ** 2).sum(-1) / var + d * torch.log(2 * math.pi * var))


@dataclass(frozen=True)
class ReferenceProcess:
    """A discretised reference process with ``num_steps`` steps.

    :ivar kind: ``"pis"``, ``"dds"`` or ``"dis"``.
    :ivar sigma: diffusion scale :math:`\\sigma`.
    :ivar horizon: :math:`T` (PIS; :math:`\\Delta t = T/K`; 1 for DDS and DIS).
    :ivar alphas: per-step :math:`\\alpha_k` (DDS).
    :ivar betas: per-step mean :math:`\\bar\\beta_k` of the :math:`\\beta` schedule (DIS).
    :ivar grid: PIS's times :math:`0 = t_0 < \\dots < t_K = T` (``None``: uniform, :math:`t_k = kT/K`).
    """

    kind: str
    num_steps: int
    sigma: float
    horizon: float = 1.0
    alphas: torch.Tensor | None = None
    betas: torch.Tensor | None = None
    grid: torch.Tensor | None = None

    def __post_init__(self):  # the checks of make_process, for processes built directly
        if self.kind not in ("pis", "dds", "dis"):
            raise ValueError(f"kind must be 'pis', 'dds' or 'dis', got {self.kind!r}")
        K = self.num_steps
        if not is_integer(K) or K < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {K!r}")
        for name, value in (("sigma", self.sigma), ("horizon", self.horizon)):
            if not is_finite_at_least(value, 0.0, strict=True):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.kind != "pis" and self.horizon != 1.0:
            raise ValueError(f"horizon applies to the PIS process only, got horizon={self.horizon!r}")
        needed = {"dds": "alphas", "dis": "betas"}.get(self.kind)
        for name in ("alphas", "betas", "grid"):
            value, size = getattr(self, name), K + 1 if name == "grid" else K
            if value is None:
                if name == needed:
                    raise ValueError(f"a {self.kind!r} process needs {name}")
                continue
            if name != needed and not (name == "grid" and self.kind == "pis"):
                raise ValueError(f"{name} does not apply to a {self.kind!r} process")
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == (size,)):
                raise ValueError(f"{name} must be a floating-point tensor of shape ({size},), got {value!r}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or inf")
        if self.alphas is not None and not ((self.alphas > 0) & (self.alphas <= 1)).all():
            raise ValueError("alphas must lie in (0, 1]")
        if self.betas is not None and not ((self.betas > 0) & (self.betas * self.dt < 2)).all():
            raise ValueError("betas must be positive with betas * dt / 2 < 1 (every DIS step contracts)")
        grid = self.grid
        if grid is not None and not (grid[0] == 0 and (grid.diff() > 0).all() and math.isclose(grid[-1], self.horizon)):
            raise ValueError("grid must increase strictly from 0 to horizon")

    @property
    def dt(self) -> float:
        """The step :math:`T/K` of a uniform grid (DDS, DIS, uniform PIS); see :meth:`step_size`."""
        return self.horizon / self.num_steps

    def step_size(self, k: int) -> float:
        """:math:`\\Delta t_k = t_{k+1} - t_k`."""
        if self.grid is None:
            return self.dt
        return float(self.grid[k + 1] - self.grid[k])

    def times(self, dtype=torch.float64) -> torch.Tensor:
        """Normalised start times :math:`t_k / T` of the steps (the drift's time input)."""
        if self.grid is not None:
            return (self.grid[:-1] / self.horizon).to(dtype)
        return torch.arange(self.num_steps, dtype=dtype) / self.num_steps

    def _alpha(self, k: int) -> float:
        if self.alphas is None:
            raise ValueError(f"a {self.kind!r} process has no alphas (DDS's per-step variances)")
        return float(self.alphas[k])

    def _beta(self, k: int) -> float:
        if self.betas is None:
            raise ValueError(f"a {self.kind!r} process has no betas (DIS's per-step schedule)")
        return float(self.betas[k])

    def _bridge_fraction(self, k: int) -> float:
        """:math:`t_k / t_{k+1}`, the Brownian bridge's shrinkage of :math:`z_{k+1}` towards 0."""
        if self.grid is None:
            return k / (k + 1)
        return float(self.grid[k] / self.grid[k + 1])

    def initial(self, eps0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`z_0` from standard-normal ``eps0`` and its log density under the guide's start,
        :meth:`initial_log_density` (PIS starts at the point 0 in both directions, so ``eps0`` is unused
        and the term is 0)."""
        z0 = torch.zeros_like(eps0) if self.kind == "pis" else self.sigma * eps0
        return z0, self.initial_log_density(z0)

    def forward_std(self, k: int) -> float:
        """The standard deviation of the forward kernel :math:`p_F(z_{k+1}\\mid z_k)`."""
        if self.kind == "pis":
            return self.sigma * math.sqrt(self.step_size(k))
        if self.kind == "dis":
            return self.sigma * math.sqrt(self._beta(k) * self.dt)
        return self.sigma * math.sqrt(self._alpha(k))

    def advance(self, k: int, z: torch.Tensor, drift: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """:math:`z_{k+1}` from :math:`z_k`, the drift and the standard-normal increment ``eps``."""
        std = self.forward_std(k)
        if self.kind == "pis":
            return torch.add(z, drift, alpha=self.step_size(k)) + std * eps
        if self.kind == "dis":
            return self._dis_forward(k, z, drift)[0] + std * eps
        keep = math.sqrt(1.0 - self._alpha(k))
        return torch.add(keep * z, drift, alpha=2 * self.sigma**2 * (1 - keep)) + std * eps

    def step(self, k: int, z: torch.Tensor, drift: torch.Tensor, eps: torch.Tensor):
        """One forward step from :math:`z_k`: returns :math:`z_{k+1}`,
        :math:`\\log p_F(z_{k+1}\\mid z_k) - \\log N(\\epsilon; 0, I)` and :math:`\\log p_B(z_k\\mid z_{k+1})`."""
        z_next = self.advance(k, z, drift, eps)
        log_f_minus_noise = torch.full(z.shape[:-1], -z.shape[-1] * math.log(self.forward_std(k)), dtype=z.dtype)
        return z_next, log_f_minus_noise, self.backward_log_density(k, z, z_next)

    @functools.cached_property
    def _path_coefficients(self) -> tuple[int, list[float], list[float], float]:
        """The first backward step that counts (PIS's step to the point 0 cancels), the backward kernels'
        mean factors and variances, and the sum of their log normalisers :math:`\\tfrac12\\log(2\\pi v_k)`
        per dimension (the forward kernels' log standard deviations: :meth:`_log_forward_stds`)."""
        first = 1 if self.kind == "pis" else 0
        moments = [self._backward_moments(k, torch.ones((), dtype=torch.float64)) for k in range(first, self.num_steps)]
        variances = [float(v) for _, v in moments]
        log_norm = 0.5 * sum(math.log(2 * math.pi * v) for v in variances)
        return first, [float(m) for m, _ in moments], variances, log_norm

    def path_backward_log_density(self, states: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_k \\log p_B(z_k\\mid z_{k+1})` of whole paths ``states`` ``(B, K+1, D)``: the sum of
        :meth:`backward_log_density` over the steps, in one vectorised evaluation (the backward kernels'
        means are fixed multiples of the next state), summed in float64."""
        d = states.shape[-1]
        log_norm = self._path_coefficients[3]
        return (-0.5 * self._backward_quadratic(states) - d * log_norm).to(states.dtype)

    def _backward_quadratic(self, states: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_k \\|z_k - c_k z_{k+1}\\|^2 / v_k` in float64, ``(B,)``: a sum of about :math:`KD`
        terms that float32 would round by more than the log weights' own size."""
        K = self.num_steps
        first, coefs, variances, _ = self._path_coefficients
        if first == K:
            return torch.zeros(states.shape[:-2], dtype=torch.float64, device=states.device)
        coef = torch.tensor(coefs, dtype=states.dtype, device=states.device)[:, None]
        var = torch.tensor(variances, dtype=torch.float64, device=states.device)
        residual = (states[..., first:K, :] - coef * states[..., first + 1 :, :]).double()
        return (residual.square().sum(-1) / var).sum(-1)

    def path_log_ratio(self, states: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_k [\\log p_F(z_{k+1}\\mid z_k) - \\log p_B(z_k\\mid z_{k+1})]` of whole paths
        ``states`` ``(B, K+1, D)`` taken by :meth:`advance` with the increments ``eps`` ``(B, K, D)``.

        The same sum as :meth:`step`'s terms, in one vectorised evaluation instead of :math:`K`: each
        forward density is :math:`N(\\epsilon_k; 0, I)` rescaled by its step's standard deviation. The
        forward and backward terms nearly cancel (exactly, for a path of the reference itself), so the
        quadratic sums are accumulated in float64 and the constants combined in Python before one
        cast: in float32 with :math:`KD = 2.6 \\cdot 10^5`, separate sums left log weights of 0.05 where
        they are 0."""
        K, d = self.num_steps, states.shape[-1]
        log_norm = self._path_coefficients[3]
        constant = d * (log_norm - self._log_forward_stds(states.dtype) - K * 0.5 * math.log(2 * math.pi))
        quadratic = 0.5 * (self._backward_quadratic(states) - eps.double().square().sum((-2, -1)))
        return (quadratic + constant).to(states.dtype)

    @functools.cached_property
    def _log_forward_std_sums(self) -> dict[torch.dtype, float]:
        return {}  # filled per dtype by _log_forward_stds

    def _log_forward_stds(self, dtype: torch.dtype) -> float:
        """:math:`\\sum_k \\log` of the forward standard deviations as :meth:`advance` applies them, rounded to
        ``dtype``: in float32 the rounding of each step's scale is a bias of :math:`D` times its relative
        error per step, which summed over 128 steps moved reference paths' log weights by 0.002."""
        sums = self._log_forward_std_sums
        if dtype not in sums:
            stds = torch.tensor([self.forward_std(k) for k in range(self.num_steps)], dtype=dtype)
            sums[dtype] = float(stds.double().log().sum())
        return sums[dtype]

    def _backward_moments(self, k: int, z_next: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean and variance of :math:`p_B(z_k\\mid z_{k+1})` (PIS's ``k = 0``: the point 0, variance 0)."""
        if self.kind == "pis":
            frac = self._bridge_fraction(k)
            return z_next * frac, self.sigma**2 * self.step_size(k) * frac
        if self.kind == "dis":  # Euler-Maruyama step of the noising SDE from z_{k+1}
            beta = self._beta(k)
            return (1 - 0.5 * beta * self.dt) * z_next, self.sigma**2 * beta * self.dt
        alpha = self._alpha(k)
        return math.sqrt(1.0 - alpha) * z_next, self.sigma**2 * alpha

    def backward_log_density(self, k: int, z: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_B(z_k\\mid z_{k+1})` of the reference (no drift involved)."""
        if self.kind == "pis" and k == 0:  # the bridge ends at the point 0: cancels with the sampler's start
            return torch.zeros(z.shape[:-1], dtype=z.dtype)
        mean, var = self._backward_moments(k, z_next)
        return gaussian_log_density(z, mean, var)

    def backward_step(self, k: int, z_next: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A draw of :math:`z_k \\sim p_B(\\cdot\\mid z_{k+1})` from standard-normal ``eps``: the reference
        run backwards from given end points (off-policy paths for the log-variance loss)."""
        mean, var = self._backward_moments(k, z_next)
        return mean + math.sqrt(var) * eps

    def forward_log_density(self, k: int, z: torch.Tensor, drift: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_F(z_{k+1}\\mid z_k)` of a given transition (for fixed paths)."""
        if self.kind == "pis":
            dt = self.step_size(k)
            return gaussian_log_density(z_next, z + drift * dt, self.sigma**2 * dt)
        if self.kind == "dis":
            mean, std = self._dis_forward(k, z, drift)
            return gaussian_log_density(z_next, mean, std**2)
        alpha = self._alpha(k)
        keep = math.sqrt(1.0 - alpha)
        mean = keep * z + 2 * self.sigma**2 * (1 - keep) * drift
        return gaussian_log_density(z_next, mean, self.sigma**2 * alpha)

    def _dis_forward(self, k: int, z: torch.Tensor, drift: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean and std of DIS's Euler-Maruyama step from :math:`z_k`: drift
        :math:`\\tfrac12\\bar\\beta_k z + \\sigma^2\\bar\\beta_k u` with :math:`u = r - z/\\sigma^2`."""
        beta = self._beta(k)
        mean = (1 - 0.5 * beta * self.dt) * z + self.sigma**2 * beta * self.dt * drift
        return mean, self.sigma * math.sqrt(beta * self.dt)

    def initial_log_density(self, z0: torch.Tensor) -> torch.Tensor:
        if self.kind == "pis":
            return torch.zeros(z0.shape[:-1], dtype=z0.dtype)
        return gaussian_log_density(z0, torch.zeros_like(z0), self.sigma**2)


def make_process(
    kind: str,
    num_steps: int,
    sigma: float = 1.0,
    horizon: float | None = None,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    grid_power: float = 1.0,
) -> ReferenceProcess:
    """A PIS (Brownian), DDS or DIS (variance-preserving, linear :math:`\\beta` schedule) reference.

    DDS: with noising time :math:`s = 1 - t` and :math:`\\beta(s) = \\beta_{\\min} + s(\\beta_{\\max}-\\beta_{\\min})`,
    :math:`\\alpha_k = 1 - \\exp(-\\int_{s_{k+1}}^{s_k}\\beta)`, so the reference reaches
    :math:`N(0, \\sigma^2 I)` to within :math:`\\exp(-\\int_0^1\\beta)`. DIS: the same schedule, evaluated at
    the grid points :math:`s_k = 1 - k/K` by its Euler-Maruyama kernels (see the module docstring).

    :param num_steps: an integer >= 1 (DIS: also large enough that every Euler-Maruyama step contracts,
        :math:`1 - \\tfrac12\\bar\\beta_k\\Delta t > 0`; about ``num_steps > max(beta_min, beta_max) / 2``).
    :param sigma: a positive finite number.
    :param horizon: :math:`T` of PIS (default 1); DDS and DIS have none (their time scale is the
        :math:`\\beta` schedule), so a horizon other than 1 is an error there rather than silently ignored.
    :param beta_min: the schedule of DDS and DIS, its rate at one end (finite and >= 0);
    :param beta_max: its rate at the other (finite and >= 0, not both 0).
    :param grid_power: PIS's time grid :math:`t_k = T\\,(1 - (1 - k/K)^p)`, a number >= 1: ``1`` is
        uniform; ``p > 1`` takes shorter steps towards the end (the last is :math:`T/K^p`, the first about
        :math:`pT/K`), so the final step's noise :math:`\\sigma\\sqrt{\\Delta t_{K-1}}` no longer limits how
        narrow a conditional the sampler can reach (a funnel's neck).
    """
    if kind not in ("pis", "dds", "dis"):
        raise ValueError(f"process must be 'pis', 'dds' or 'dis', got {kind!r}")
    if not is_integer(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    for name, value in (("sigma", sigma), ("horizon", 1.0 if horizon is None else horizon)):
        if not is_finite_at_least(value, 0.0, strict=True):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if kind in ("dds", "dis"):
        if horizon is not None and horizon != 1.0:
            raise ValueError(
                f"horizon applies to the PIS process only; {kind.upper()}'s time scale is set by beta_min and "
                f"beta_max, got horizon={horizon!r}"
            )
        if not (is_finite_at_least(beta_min, 0.0) and is_finite_at_least(beta_max, 0.0) and beta_min + beta_max > 0):
            raise ValueError(f"beta_min and beta_max must be finite, >= 0 and not both 0, got {beta_min}, {beta_max}")
    if not is_finite_at_least(grid_power, 1.0):
        raise ValueError(f"grid_power must be a finite number >= 1, got {grid_power!r}")
    if grid_power != 1.0 and kind != "pis":
        raise ValueError(f"grid_power applies to the PIS process only, got grid_power={grid_power!r} for {kind!r}")
    horizon = 1.0 if horizon is None else horizon
    if kind == "pis" and num_steps ** -float(grid_power) < 2.0**-30:
        raise ValueError(
            f"grid_power={grid_power!r} with num_steps={num_steps}: the last step, horizon / num_steps^grid_power, "
            "is below float64's resolution of the grid; take a smaller grid_power"
        )
    if kind == "pis":
        _check_step_variances(sigma, horizon, horizon * num_steps ** -float(grid_power))
        grid = None
        if grid_power != 1.0:
            fraction = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            grid = horizon * (1 - (1 - fraction) ** grid_power)
            grid[-1] = horizon
        return ReferenceProcess("pis", int(num_steps), float(sigma), float(horizon), grid=grid)
    s = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # noising time, 1 -> 0

    def integral(a):
        return beta_min * a + 0.5 * (beta_max - beta_min) * a**2

    step_integrals = integral(s[:-1]) - integral(s[1:])  # int of beta over each step
    _check_step_variances(sigma, 1.0, float(step_integrals.min()))  # alpha_k is about the step's integral
    if kind == "dis":
        betas = step_integrals * num_steps  # the mean beta of each step
        if float(betas.max()) >= 2 * num_steps:
            raise ValueError(
                f"DIS's Euler-Maruyama steps overshoot (1 - beta dt / 2 <= 0) with num_steps={num_steps} and "
                f"beta_max={beta_max}, beta_min={beta_min}: every step must contract (the step's mean beta "
                f"times dt / 2 < 1); take more steps (>= 10 with the default schedule) or a smaller beta_max"
            )
        return ReferenceProcess("dis", int(num_steps), float(sigma), 1.0, betas=betas)
    alphas = -torch.expm1(-step_integrals)  # not 1 - exp(-b), which rounds a tiny b's alpha to 0
    return ReferenceProcess("dds", int(num_steps), float(sigma), 1.0, alphas)


def _check_step_variances(sigma: float, horizon: float, smallest_step: float) -> None:
    """``ValueError`` unless the step variances :math:`\\sigma^2 \\Delta t` (PIS) or :math:`\\sigma^2 \\alpha_k`
    (DDS, DIS), from the smallest to the whole horizon's, are positive and finite in float64."""
    s2 = float(sigma) * float(sigma)  # inf on overflow (** raises OverflowError)
    if not (s2 * smallest_step > 0 and math.isfinite(s2 * max(horizon, 1.0))):
        raise ValueError(
            f"sigma={sigma!r} with horizon={horizon!r}: the reference's step variances (sigma^2 times a step of "
            f"{smallest_step:.3g} up to the horizon) under- or overflow float64; rescale the latents instead"
        )
