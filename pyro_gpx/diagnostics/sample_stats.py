"""Per-draw sampler statistics from Pyro's HMC and NUTS.

Pyro's :class:`~pyro.infer.MCMC` keeps only the indices of divergent transitions and a mean
acceptance rate per chain. :class:`SampleStatsRecorder` is an ``hook_fn`` that records, for every
post-warmup draw, what ArviZ's ``sample_stats`` group expects: step size, acceptance probability,
log density and the number of gradient evaluations (leapfrog steps), from which ESS per gradient
evaluation follows.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np

__all__ = ["SampleStatsRecorder", "mcmc_sample_stats"]

_CHAIN = re.compile(r"\[(\d+)\]")


def _chain_id(stage: str) -> int:
    match = _CHAIN.search(stage)
    return int(match.group(1)) if match else 0


class _Counted:
    """A kernel's potential function, counting its calls for one recorder."""

    def __init__(self, fn: Callable, owner: SampleStatsRecorder):
        functools.update_wrapper(self, fn)
        self.fn, self.owner = fn, owner

    def __call__(self, *args, **kwargs):
        self.owner._calls += 1
        return self.fn(*args, **kwargs)


class SampleStatsRecorder:
    """Record HMC/NUTS statistics for each post-warmup draw; pass as ``MCMC(..., hook_fn=recorder)``.

    Recorded per chain and draw (ArviZ names):

    * ``step_size``: the adapted step size (or, for a kernel whose trajectories take another step,
      such as :class:`~pyro_gpx.bnn.SplitHMC` capping it at the trajectory length, its
      ``step_size_used``);
    * ``acceptance_rate``: the draw's acceptance probability (NUTS: its mean over the tree);
    * ``lp``: minus the potential energy, the log joint density in unconstrained space
      including the transforms' log-Jacobians;
    * ``n_steps``: gradient evaluations spent on the draw (leapfrog steps); NaN for a draw taken
      before the recorder first saw the kernel (the first draw of a chain without warmup: the
      counter is installed on the kernel's potential function at the first hook call, and removed
      when the run ends).

    Chains run in worker processes (Pyro's parallel mode, whenever ``num_chains`` is below the CPU
    count) record in those processes, so nothing comes back: use
    :func:`~pyro_gpx.bnn.chains.run_chains`, which records in each chain's process (or, with
    ``processes=1``, runs them here) and returns the statistics with the samples.

    :param hook_fn: another hook to call after recording, with the same arguments.

    Example::

        >>> recorder = SampleStatsRecorder()
        >>> mcmc = MCMC(NUTS(model), num_samples=500, hook_fn=recorder)  # doctest: +SKIP
        >>> mcmc.run(data)  # doctest: +SKIP
        >>> idata = to_inference_data(mcmc)  # finds the recorder itself  # doctest: +SKIP
    """

    stat_names = ("step_size", "acceptance_rate", "lp", "n_steps")

    def __init__(self, hook_fn: Callable | None = None):
        self.hook_fn = hook_fn
        self.records: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self._calls = 0
        self._prev_mean: dict[int, float] = {}

    def _counting(self, kernel) -> bool:
        potential_fn = getattr(kernel, "potential_fn", None)
        return isinstance(potential_fn, _Counted) and potential_fn.owner is self

    def _count_gradients(self, kernel) -> None:
        """Count the calls of ``kernel.potential_fn`` (its own, not another recorder's counter) until the
        kernel's ``cleanup`` at the end of the run, which gives the kernel its function back."""
        potential_fn = getattr(kernel, "potential_fn", None)
        if potential_fn is None or self._counting(kernel):
            return
        original = potential_fn.fn if isinstance(potential_fn, _Counted) else potential_fn
        counted = _Counted(original, self)
        kernel.potential_fn = counted
        cleanup = kernel.cleanup

        def restore() -> None:
            if kernel.potential_fn is counted:
                kernel.potential_fn = original
            if vars(kernel).get("cleanup") is restore:
                del kernel.cleanup
            cleanup()

        kernel.cleanup = restore

    def __call__(self, kernel, params, stage: str, i: int) -> None:
        counted = self._counting(kernel)  # since the previous draw: else this draw's count is unknown
        self._count_gradients(kernel)
        if stage.startswith("Sample"):
            chain = _chain_id(stage)
            rec = self.records[chain]
            mean = float(getattr(kernel, "_mean_accept_prob", float("nan")))
            n = i + 1
            # Pyro keeps a running mean of the acceptance probability over post-warmup draws
            rec["acceptance_rate"].append(n * mean - (n - 1) * self._prev_mean.get(chain, 0.0) if n > 1 else mean)
            self._prev_mean[chain] = mean
            step = getattr(kernel, "step_size_used", None)  # the step taken, where it differs from the adapted one
            rec["step_size"].append(float(step if step is not None else getattr(kernel, "step_size", float("nan"))))
            energy = getattr(kernel, "_potential_energy_last", None)
            rec["lp"].append(float("nan") if energy is None else -float(energy))
            rec["n_steps"].append(self._calls if counted else float("nan"))
        self._calls = 0
        if self.hook_fn is not None:
            self.hook_fn(kernel, params, stage, i)

    def as_arrays(self, num_chains: int, num_draws: int) -> dict[str, np.ndarray]:
        """Stacked ``(chain, draw)`` arrays of the latest run; empty if a chain was not recorded here."""
        if any(len(self.records[c]["lp"]) < num_draws for c in range(num_chains)):
            return {}
        return {
            name: np.asarray([self.records[c][name][-num_draws:] for c in range(num_chains)], dtype=np.float64)
            for name in self.stat_names
        }

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.records.clear()
        self._prev_mean.clear()
        self._calls = 0


def _divergence_indices(mcmc) -> dict[int, list]:
    """Post-warmup divergence indices per chain. Not through ``MCMC.diagnostics()``: it also computes
    the ESS and R-hat of every latent, in memory quadratic in the draws times the latent size (tens of
    GB for a 65 000-weight layer and 500 draws); Pyro keeps the kernels' own diagnostics per chain."""
    per_chain = getattr(mcmc, "_diagnostics", None)
    if isinstance(per_chain, list) and all(isinstance(d, dict) for d in per_chain):
        return {c: list(d.get("divergences", [])) for c, d in enumerate(per_chain)}
    divergences = mcmc.diagnostics().get("divergences", {})
    return {c: list(divergences.get(f"chain {c}", [])) for c in range(mcmc.num_chains)}


def mcmc_sample_stats(mcmc, recorder: SampleStatsRecorder | None = None) -> dict[str, np.ndarray]:
    """``(chain, draw)`` sampler statistics of a finished :class:`pyro.infer.MCMC` run.

    Always includes ``diverging`` (from Pyro's divergence indices); adds the
    :class:`SampleStatsRecorder` statistics when a recorder was used (found on the run's sampler if
    not given).
    """
    num_chains, num_draws = mcmc.num_chains, mcmc.num_samples
    diverging = np.zeros((num_chains, num_draws), dtype=bool)
    for c, indices in _divergence_indices(mcmc).items():
        diverging[c, [int(i) for i in indices if 0 <= int(i) < num_draws]] = True
    stats: dict[str, np.ndarray] = {"diverging": diverging}
    if recorder is None:
        hook = getattr(getattr(mcmc, "sampler", None), "hook", None)
        recorder = hook if isinstance(hook, SampleStatsRecorder) else None
    if recorder is not None:
        arrays = recorder.as_arrays(num_chains, num_draws)
        if not arrays:
            warnings.warn(
                "SampleStatsRecorder holds no complete record of this run (were the chains run in worker "
                "processes?); sample_stats has only 'diverging'",
                stacklevel=2,
            )
        stats.update(arrays)
    return stats
