r"""HMC that integrates a Gaussian reference exactly and only the remainder numerically (split HMC).

Write the potential as a diagonal Gaussian reference plus a remainder, in standardised coordinates
:math:`x = (z - m)/s`:

.. math::

    U(z) = \tfrac12\|x\|^2 + R(x), \qquad H(x, p) = U(z(x)) + \tfrac12\|p\|^2 .

Each step is a half kick :math:`p \leftarrow p - \tfrac\epsilon2\nabla_x R`, the *exact* flow of the
Gaussian part (a rotation of :math:`(x, p)` by the angle :math:`\epsilon`), and another half kick [1, 2].
The composition is symplectic and reversible, so the Metropolis correction on :math:`H` keeps the
target exact for any :math:`m, s`. Leapfrog's step size is limited by the stiffness of the whole
target (for an isotropic Gaussian in :math:`d` dimensions, :math:`\epsilon \propto d^{-1/4}`); the
split integrator's only by the remainder. When the posterior is close to a Gaussian, as the hidden
weights of a wide network are once the readout is integrated out [3], the remainder is weak and
far larger steps are accepted: on yacht (width 1024, :math:`n = 100`, about 7 200 dimensions) a
step of 0.3 was accepted with probability 0.8 where leapfrog needs 0.12.

``stages=2`` takes each step as two rotations by :math:`\epsilon/2` between kicks of weights
:math:`\tfrac16, \tfrac23, \tfrac16` (two gradients per step). That palindromic two-stage splitting
cancels the leading error term that is linear in the remainder, leaving one quadratic in it [4, 5],
so while the remainder is weak it accepts more often than Strang's splitting at the same number of
gradients. The error expansion needs a remainder with a continuous gradient. With ReLU activations
the gradient jumps wherever a unit's pre-activation crosses zero: on yacht with two hidden layers
of 256, trajectories of length 2 from a warm-up draw had typical energy errors of 0.05,
0.12 and 0.35 at steps 0.006, 0.025 and 0.05 (falling like :math:`\epsilon`, not
:math:`\epsilon^2`), with erf activations 0.003, 0.04 and 0.17 (like :math:`\epsilon^2`). With
GELU activations (ReLU-like, smooth) the two-stage splitting took 9-12 gradients per draw there
(14 with Strang's), where a ReLU network needs 36-42 with either splitting (README, issue 6).

The reference is the diagonal Gaussian that Pyro's warm-up adapts anyway: :math:`s^2` is the
adapted diagonal inverse mass matrix and :math:`m` the mean of the warm-up draws of the same
adaptation window (the initial point before the first window ends); with ``gradient_adaptation=True``
both come from the draws and their gradients
(:class:`~pyro_gpx.bnn.gradient_mass_matrix.GradientMassMatrix`). The step size adapts by dual
averaging as in ``HMC``; each trajectory's length is ``trajectory_length`` times a fresh
:math:`U(1 - j, 1 + j)` draw, as in :class:`~pyro_gpx.bnn.jittered_hmc.JitteredHMC`, integrated in
:math:`\lceil \text{length}/\epsilon\rceil` equal steps. The trajectory's time is then exactly the
drawn length, the reference's rotation angle, even when the reference matches the target so well
that the adapted step size outgrows it (a fixed angle would resonate).

References:

[1] B. Shahbaba, S. Lan, W. O. Johnson, R. M. Neal. Split Hamiltonian Monte Carlo. Statistics and
    Computing 24, 2014.

[2] A. Beskos, F. J. Pinski, J. M. Sanz-Serna, A. M. Stuart. Hybrid Monte Carlo on Hilbert spaces.
    Stochastic Processes and their Applications 121, 2011.

[3] J. Hron, R. Novak, J. Pennington, J. Sohl-Dickstein. Wide Bayesian neural networks have a
    simple weight posterior: theory and accelerated sampling. ICML 2022.

[4] R. I. McLachlan. Composition methods in the presence of small parameters. BIT 35, 1995.

[5] S. Blanes, F. Casas, J. M. Sanz-Serna. Numerical integrators for the hybrid Monte Carlo method.
    SIAM Journal on Scientific Computing 36(4), 2014.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro.ops.integrator import potential_grad
from pyro.util import optional

from .._validation import is_finite_at_least
from .gradient_mass_matrix import GradientMassMatrix
from .jittered_hmc import JitteredHMC

__all__ = ["SplitHMC"]

# the two-stage kick weight that cancels the integrator's leading error term linear in the remainder [4]
_TWO_STAGE_KICK = 1.0 / 6.0


class SplitHMC(JitteredHMC):
    """Split HMC with an adapted diagonal Gaussian reference (see the module docstring).

    :param trajectory_length: integration time in standardised coordinates (the reference's period
        is :math:`2\\pi`; :math:`\\pi/2` moves a reference coordinate to an independent draw).
    :param jitter: :math:`j \\in [0, 1)`: each length is ``trajectory_length`` times :math:`U(1 - j, 1 + j)`.
    :param stages: 1 (Strang splitting: half kick, rotation, half kick) or 2 (two rotations by
        :math:`\\epsilon/2` between kicks weighted 1/6, 2/3, 1/6, which cancels the leading error term
        of a nearly Gaussian remainder; see the module docstring).
    :param gradient_adaptation: adapt the reference from draws *and* gradients
        (:class:`~pyro_gpx.bnn.gradient_mass_matrix.GradientMassMatrix`: scale
        :math:`\\sqrt{\\operatorname{Var} z/\\operatorname{Var}\\nabla U}`, centre the window mean with the
        gradient as a control variate) instead of the draws' variance and mean.
    :param kwargs: passed to ``HMC`` (``step_size``, ``adapt_step_size``, ``adapt_mass_matrix``,
        ``target_accept_prob``, ``init_strategy``, ...); a dense mass matrix is not supported.

    Example::

        >>> import pyro.distributions as dist
        >>> from pyro.infer import MCMC
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> mcmc = MCMC(SplitHMC(model), num_samples=20, warmup_steps=20, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([20, 3])
    """

    def __init__(self, model: Callable | None = None, potential_fn: Callable | None = None, *,
                 trajectory_length: float = math.pi / 2, jitter: float = 0.5, stages: int = 1,
                 gradient_adaptation: bool = False, **kwargs):  # fmt: skip
        if not is_finite_at_least(trajectory_length, 0.0, strict=True):
            raise ValueError(f"trajectory_length must be a finite positive number, got {trajectory_length}")
        if kwargs.get("full_mass"):
            raise NotImplementedError("SplitHMC uses a diagonal Gaussian reference; full_mass is not supported")
        if "num_steps" in kwargs:
            raise ValueError("num_steps is not an option: SplitHMC sets it from trajectory_length and the step size")
        super().__init__(model, potential_fn, trajectory_length=trajectory_length, jitter=jitter, **kwargs)
        if isinstance(stages, bool) or stages not in (1, 2):
            raise ValueError(f"stages must be 1 (Strang) or 2 (two-stage), got {stages!r}")
        self.stages = int(stages)
        self.gradient_adaptation = bool(gradient_adaptation)
        if self.gradient_adaptation:
            self.mass_matrix_adapter = GradientMassMatrix()

    def _reset(self) -> None:
        super()._reset()
        self._ref_mean: dict[str, torch.Tensor] | None = None
        self._ref_scale: dict[str, torch.Tensor] | None = None
        self._window_sum: dict[str, torch.Tensor] = {}
        self._window_count = 0
        self.step_size_used: float | None = None

    def logging(self):
        """Pyro's progress-bar fields, with the step the last trajectory took."""
        out = super().logging()
        if self.step_size_used is not None:
            out["step size"] = f"{self.step_size_used:.2e}"
        return out

    def _reference_scale(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the diagonal inverse mass matrix, read through the adapter's own product M^{-1} r at r = 1
        ones = {k: torch.ones_like(v) for k, v in z.items()}
        return {k: v.sqrt() for k, v in self.mass_matrix_adapter.kinetic_grad(ones).items()}

    def _track_reference(self, z: dict[str, torch.Tensor]) -> None:
        """Warm-up: accumulate the draws; when the adapter ends a mass-matrix window, centre the
        reference on that window's mean draw and take the new scale."""
        for k, v in z.items():
            self._window_sum[k] = self._window_sum.get(k, 0.0) + v.detach()
        self._window_count += 1
        scale, ref_scale = self._reference_scale(z), self._ref_scale
        assert ref_scale is not None  # sample() sets the reference before its first call here
        if any(not torch.equal(scale[k], ref_scale[k]) for k in scale):
            self._ref_mean = {k: v / self._window_count for k, v in self._window_sum.items()}
            centre = getattr(self.mass_matrix_adapter, "centre", {})
            for names, flat in centre.items():  # the gradient-corrected window mean, where the adapter has one
                sizes = [z[name].numel() for name in names]
                for name, part in zip(names, flat.split(sizes)):
                    self._ref_mean[name] = part.reshape(z[name].shape)
            self._ref_scale = scale
            self._window_sum, self._window_count = {}, 0

    def sample(self, params):
        z, potential_energy, z_grads = self._fetch_from_cache()
        if z is None:
            z = params
            z_grads, potential_energy = potential_grad(self.potential_fn, z)
            self._cache(z, potential_energy, z_grads)
        elif len(z) == 0:
            return super().sample(params)
        if self._ref_mean is None:  # before the first adaptation window ends: centred on the initial point
            self._ref_mean = {k: v.detach().clone() for k, v in z.items()}
            self._ref_scale = self._reference_scale(z)
        # the jittered length in ceil(length / step_size) equal steps: the adapted step size is an upper bound,
        # and the trajectory's time (the reference's rotation angle) is the drawn length even when the
        # reference is so close to the target that the adapted step outgrows it
        length = self._jittered_length()
        num_steps = max(1, math.ceil(length / self.step_size))
        m, s, eps = self._ref_mean, self._ref_scale, length / num_steps
        self.step_size_used = eps  # what the diagnostics report: the adapted step_size can outgrow the length
        x = {k: (z[k] - m[k]) / s[k] for k in z}
        p = {k: torch.randn_like(v) for k, v in z.items()}
        energy_current = potential_energy + 0.5 * sum(v.square().sum() for v in p.values())
        g = {k: s[k] * z_grads[k] - x[k] for k in z}  # gradient of the remainder in x
        z_new, grads_new, energy_new = z, z_grads, potential_energy
        # one step: kicks of weights `kicks` around rotations by `angle` (Strang: 1/2, 1/2; two-stage: b, 1 - 2b, b)
        kicks = (0.5, 0.5) if self.stages == 1 else (_TWO_STAGE_KICK, 1 - 2 * _TWO_STAGE_KICK, _TWO_STAGE_KICK)
        angle = eps / self.stages
        cos, sin = math.cos(angle), math.sin(angle)
        with optional(pyro.validation_enabled(False), self._t < self._warmup_steps):
            for _ in range(num_steps):
                p = {k: p[k] - kicks[0] * eps * g[k] for k in p}
                for kick in kicks[1:]:
                    x, p = {k: x[k] * cos + p[k] * sin for k in x}, {k: p[k] * cos - x[k] * sin for k in x}
                    z_new = {k: m[k] + s[k] * x[k] for k in x}
                    grads_new, energy_new = potential_grad(self.potential_fn, z_new)
                    g = {k: s[k] * grads_new[k] - x[k] for k in x}
                    p = {k: p[k] - kick * eps * g[k] for k in p}
        delta = energy_new + 0.5 * sum(v.square().sum() for v in p.values()) - energy_current
        delta = torch.as_tensor(float("inf")) if not torch.isfinite(delta) else delta.detach()
        if delta > self._max_sliced_energy and self._t >= self._warmup_steps:
            self._divergences.append(self._t - self._warmup_steps)
        accept_prob = (-delta).exp().clamp(max=1.0)
        if float(torch.rand(())) < float(accept_prob):
            z, z_grads, potential_energy = z_new, grads_new, energy_new
            self._cache(z, potential_energy, z_grads)
            accepted = True
        else:
            accepted = False
        self._t += 1
        if self._t > self._warmup_steps:
            n = self._t - self._warmup_steps
            self._accept_cnt += int(accepted)
        else:
            n = self._t
            self._adapter.step(self._t, z, accept_prob, z_grads)
            self._track_reference(z)
        self._mean_accept_prob += (float(accept_prob) - self._mean_accept_prob) / n
        return z.copy()
