r"""Hamiltonian Monte Carlo with a randomised trajectory length.

Pyro's :class:`~pyro.infer.mcmc.HMC` integrates every trajectory for the same time :math:`T`. On a
target that is close to Gaussian, as a repriorised BNN posterior is once the mass matrix is adapted,
a coordinate with frequency :math:`\omega` moves from :math:`x` to
:math:`x\cos\omega T + (p/\omega)\sin\omega T`: when :math:`\omega T` is near a multiple of
:math:`\pi`, every trajectory takes it back to :math:`\pm x` and it barely mixes (for
:math:`\omega T = \pi`, :math:`x^2` never changes). Drawing the length afresh for each trajectory,
:math:`T_t = T\,u_t` with :math:`u_t \sim U(1 - j, 1 + j)`, breaks that resonance [1]. The default
:math:`j = 0.5` sweeps :math:`\omega T_t` over at least a quarter period either side of any
resonance (randomised HMC goes further, with exponentially distributed lengths [2]). Each trajectory
is still a reversible, volume-preserving proposal with a Metropolis correction, so the
chain keeps the target; the random length only mixes kernels that each leave it invariant.

References:

[1] R. M. Neal. MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo, 2011.

[2] N. Bou-Rabee, J. M. Sanz-Serna. Randomized Hamiltonian Monte Carlo. Annals of Applied
    Probability 27(4), 2017.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.mcmc import HMC

from .._validation import is_finite_at_least

__all__ = ["JitteredHMC"]


class JitteredHMC(HMC):
    """:class:`~pyro.infer.mcmc.HMC` whose trajectory length is ``trajectory_length`` times a fresh
    :math:`U(1 - j, 1 + j)` draw (from torch's global generator, so ``pyro.set_rng_seed`` fixes it)
    on every iteration, warm-up included. Step size and mass matrix adapt as in ``HMC``.

    :param jitter: :math:`j \\in [0, 1)`; ``0`` is exactly ``HMC``.
    :param kwargs: everything else is passed to ``HMC`` (``trajectory_length``, ``step_size``, ...).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import MCMC
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> kernel = JitteredHMC(model, trajectory_length=2.0)
        >>> mcmc = MCMC(kernel, num_samples=20, warmup_steps=20, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([20, 2])
    """

    def __init__(self, model: Callable | None = None, potential_fn: Callable | None = None, *, jitter: float = 0.5,
                 **kwargs):  # fmt: skip
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        # Pyro lifts a step size <= 0 to 1e-10 (about 1e10 leapfrog steps per trajectory): refuse it here
        for name in ("step_size", "trajectory_length"):
            if name in kwargs and kwargs[name] is not None and not is_finite_at_least(kwargs[name], 0.0, strict=True):
                raise ValueError(f"{name} must be a finite positive number, got {kwargs[name]}")
        super().__init__(model, potential_fn, **kwargs)
        self.jitter = float(jitter)

    def _jittered_length(self) -> float:
        """A fresh trajectory length, ``trajectory_length`` times a :math:`U(1 - j, 1 + j)` draw."""
        if self.jitter == 0:
            return self.trajectory_length
        return self.trajectory_length * (1.0 + self.jitter * (2.0 * float(torch.rand(())) - 1.0))

    @property
    def num_steps(self) -> int:
        # HMC.sample reads this once per trajectory
        return max(1, int(self._jittered_length() / self.step_size))
