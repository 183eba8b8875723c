"""Several MCMC chains in separate processes, merged into one result.

Pyro's ``MCMC(num_chains > 1)`` runs chains in parallel only when more CPUs than chains are free,
and its multiprocessing is fragile (CUDA, forking, logging queues). :func:`run_chains` starts each
chain as an ordinary single-chain ``MCMC`` in its own spawned process (at most ``processes`` at a
time), with its own seed, progress bar (labelled ``chain i/n``, one terminal line per chain) and
:class:`~pyro_gpx.diagnostics.SampleStatsRecorder`, and merges the draws into ``(chain, draw, ...)``
arrays that :func:`~pyro_gpx.diagnostics.to_inference_data` accepts.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro.infer import HMC, MCMC, NUTS
from tqdm import tqdm

from .._validation import check_positive_int, is_integer
from ..diagnostics import SampleStatsRecorder, mcmc_sample_stats, to_inference_data
from .jittered_hmc import JitteredHMC
from .repriorise import _default_data
from .split_hmc import SplitHMC

__all__ = ["ChainsResult", "run_chains"]

KERNELS = {"nuts": NUTS, "hmc": HMC, "jittered_hmc": JitteredHMC, "split_hmc": SplitHMC}


@dataclass
class ChainsResult:
    """Merged chains: ``samples[name]`` and ``sample_stats[name]`` are ``(chain, draw, ...)``."""

    samples: dict[str, torch.Tensor]
    sample_stats: dict[str, np.ndarray]
    seconds: list[float] = field(default_factory=list)

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_gradients(self) -> int:
        return int(np.nansum(self.sample_stats["n_steps"]))  # NaN: a draw taken before counting began

    def get_samples(self, group_by_chain: bool = False) -> dict[str, torch.Tensor]:
        if group_by_chain:
            return self.samples
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.samples.items()}

    def to_inference_data(self, model: Callable, model_args: tuple = (), model_kwargs: dict | None = None, **kwargs):
        """ArviZ data for these chains (log-likelihood etc. from ``model``)."""
        return to_inference_data(self.samples, model=model, model_args=model_args, model_kwargs=model_kwargs,
                                 group_by_chain=True, sample_stats=self.sample_stats, **kwargs)  # fmt: skip


class _ChainProgress:
    """A progress bar for one chain, labelled with its index and driven by the MCMC hook (Pyro's own
    single-chain bar has no label, and bars of chains in other processes overwrite each other)."""

    def __init__(self, chain: int, num_chains: int, total: int, position: int | None):
        self.label = f"chain {chain + 1}/{num_chains}"
        self.sampling = False
        disable = "CI" in os.environ or "PYTEST_XDIST_WORKER" in os.environ  # as Pyro's bar
        bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        self.bar = tqdm(total=total, desc=f"{self.label} warmup", position=position, leave=True, file=sys.stderr,
                        disable=disable, bar_format=bar_format)  # fmt: skip

    def __call__(self, kernel, params, stage: str, i: int) -> None:
        if not self.sampling and stage.startswith("Sample"):
            self.sampling = True
            self.bar.set_description(f"{self.label} sample", refresh=False)
        logging = getattr(kernel, "logging", None)  # step size and acceptance probability, as Pyro shows
        if callable(logging):
            self.bar.set_postfix(logging(), refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _run_one(job: dict) -> dict:
    try:
        return _run_chain(job)
    except Exception as error:  # name the chain (the type is kept; the note travels back from a worker)
        if hasattr(error, "add_note"):
            error.add_note(f"in chain {job['chain'] + 1} of {job['num_chains']} (seed {job['seed']})")  # as its bar
        raise


def _run_chain(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    torch.set_default_dtype(job["dtype"])
    pyro.set_rng_seed(job["seed"])
    progress = None
    if job["progress"]:
        progress = _ChainProgress(job["chain"], job["num_chains"], job["warmup_steps"] + job["num_samples"],
                                  job["position"])  # fmt: skip
    recorder = SampleStatsRecorder(progress)
    kernel_cls = KERNELS[job["kernel"]]
    kernel = kernel_cls(job["model"], **job["kernel_kwargs"])
    mcmc = MCMC(kernel, num_samples=job["num_samples"], warmup_steps=job["warmup_steps"], hook_fn=recorder,
                disable_progbar=True)  # fmt: skip
    start = time.perf_counter()
    try:
        mcmc.run(*job["args"], **job["kwargs"])
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start
    stats = mcmc_sample_stats(mcmc, recorder)  # not mcmc.diagnostics(): its ESS of every weight needs tens of GB
    return {"samples": {k: v.detach() for k, v in mcmc.get_samples().items()}, "stats": stats, "seconds": seconds}


def _gather(pending: list, poll_seconds: float = 0.05) -> list[dict]:
    """The chains' outputs in order, raising the first failure as soon as it happens."""
    while True:
        for result in pending:
            if result.ready() and not result.successful():
                result.get()  # re-raises the chain's exception, with its note
        if all(result.ready() for result in pending):
            return [result.get() for result in pending]
        time.sleep(poll_seconds)


def run_chains(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_chains: int = 4,
    num_samples: int = 500,
    warmup_steps: int = 500,
    kernel: str = "nuts",
    kernel_kwargs: dict | None = None,
    seed: int = 0,
    processes: int | None = None,
    threads_per_chain: int = 1,
    progress: bool = True,
) -> ChainsResult:
    """Run ``num_chains`` independent chains of ``NUTS`` (or ``HMC``,
    :class:`~pyro_gpx.bnn.jittered_hmc.JitteredHMC`, :class:`~pyro_gpx.bnn.split_hmc.SplitHMC`) on ``model``.

    :param model: a picklable Pyro model (module-level function, ``PyroModule``, or e.g.
        :class:`~pyro_gpx.bnn.mlp.RepriorisedModel`).
    :param num_chains: independent chains; :param num_samples: draws kept per chain;
        :param warmup_steps: adaptation steps per chain (discarded).
    :param kernel: ``"nuts"``, ``"hmc"``, ``"jittered_hmc"`` or ``"split_hmc"``.
    :param kernel_kwargs: passed to the kernel (``max_tree_depth``, ``trajectory_length``, ``jitter``, ...).
    :param seed: chain ``c`` is seeded with ``seed + c``, as Pyro's multi-chain ``MCMC`` does, so runs
        meant to be independent need seeds at least ``num_chains`` apart (seeds 0 and 1 share 3 of 4 chains).
    :param processes: concurrent chains (default: the CPU count, at most ``num_chains``); 1 runs
        them one after another in this process. A chain that fails stops the others at once, and its
        exception (type and message kept) names the chain and its seed. More than one process starts
        fresh Python processes (``spawn``), which import the calling script: a script must then run
        this under ``if __name__ == "__main__":``, or its processes start it again.
    :param threads_per_chain: torch threads in each chain's process.
    :param progress: show a progress bar per chain (``chain i/n warmup`` / ``sample``, with the step
        size and acceptance probability).

    A model with a ``set_training_data`` method (:class:`~pyro_gpx.bnn.mlp.RepriorisedModel`,
    :class:`~pyro_gpx.bnn.collapsed.CollapsedModel`) gets the training data ``(X, y)`` of
    ``model_args`` / ``model_kwargs`` set first, so that the caller's model, which never ran in the
    chains' processes, predicts with them afterwards (``Predictive(model, result.get_samples())(X_new)``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    num_chains, num_samples = (
        check_positive_int("num_chains", num_chains),
        check_positive_int("num_samples", num_samples),
    )
    if not is_integer(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    processes = min(num_chains, processes or os.cpu_count() or 1)
    set_training_data = getattr(model, "set_training_data", None)
    if callable(set_training_data) and (model_args or "X" in (model_kwargs or {})):
        X, y = _default_data(tuple(model_args), dict(model_kwargs or {}))
        if y is not None:
            set_training_data(X, y)
    jobs = [
        {"model": model, "args": tuple(model_args), "kwargs": dict(model_kwargs or {}), "kernel": kernel,
         "kernel_kwargs": dict(kernel_kwargs or {}), "num_samples": num_samples, "warmup_steps": warmup_steps,
         "seed": seed + chain, "threads": threads_per_chain, "progress": progress,
         "dtype": torch.get_default_dtype(), "chain": chain, "num_chains": num_chains,
         "position": chain if processes > 1 else None}
        for chain in range(num_chains)
    ]  # fmt: skip
    if processes == 1:  # in this process: the caller's threads, default dtype and RNG are given back
        threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
        python_rng, numpy_rng = random.getstate(), np.random.get_state()  # pyro.set_rng_seed seeds all three
        try:
            with torch.random.fork_rng(devices=[]):
                outputs = [_run_one(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
            torch.set_default_dtype(dtype)
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)
    else:  # leaving the block terminates the workers: a failing chain (or Ctrl-C) stops the others at once
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            outputs = _gather([pool.apply_async(_run_one, (job,)) for job in jobs])
    samples = {k: torch.stack([o["samples"][k] for o in outputs]) for k in outputs[0]["samples"]}
    stats = {k: np.concatenate([o["stats"][k] for o in outputs]) for k in outputs[0]["stats"]}
    return ChainsResult(samples, stats, [o["seconds"] for o in outputs])
