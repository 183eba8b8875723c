"""SampleStatsRecorder against quantities known exactly for HMC."""

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import HMC, MCMC, NUTS

from pyro_gpx.diagnostics import SampleStatsRecorder, get_group, mcmc_sample_stats, to_inference_data


def gaussian(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 0.5).to_event(1), obs=y)


@pytest.fixture
def y(float64):
    return torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) + 1.0


def test_fixed_hmc_steps_lp_and_acceptance(y):
    running_mean = {}
    recorder = SampleStatsRecorder(hook_fn=lambda kernel, *_: running_mean.update(last=kernel._mean_accept_prob))
    kernel = HMC(gaussian, step_size=0.2, num_steps=5, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=10, hook_fn=recorder, disable_progbar=True)
    mcmc.run(y)
    stats = mcmc_sample_stats(mcmc)
    assert stats["n_steps"].shape == (1, 40)
    np.testing.assert_array_equal(stats["n_steps"], 5)
    np.testing.assert_allclose(stats["step_size"], 0.2)
    # lp is the log joint density at each draw (no constrained sites here)
    mu = mcmc.get_samples()["mu"]
    for i in (0, 17, 39):
        trace = poutine.trace(poutine.condition(gaussian, {"mu": mu[i]})).get_trace(y)
        assert stats["lp"][0, i] == pytest.approx(float(trace.log_prob_sum()), rel=1e-10)
    # per-draw acceptance probabilities average to Pyro's running mean
    assert stats["acceptance_rate"].mean() == pytest.approx(running_mean["last"], rel=1e-8)
    assert ((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1 + 1e-12)).all()


def test_divergences_marked_per_draw(y):
    def stiff(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 0.001), obs=y[:, 0])

    mcmc = MCMC(HMC(stiff, step_size=0.5, num_steps=4, adapt_step_size=False), num_samples=20, warmup_steps=2,
                disable_progbar=True)  # fmt: skip
    mcmc.run(y)
    expected = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(expected) > 0

    def refuse():  # the full diagnostics hold the ESS of every latent: far too big for wide networks
        raise AssertionError("MCMC.diagnostics() called")

    mcmc.diagnostics = refuse
    idata = to_inference_data(mcmc)
    diverging = get_group(idata, "sample_stats")["diverging"].values[0]
    np.testing.assert_array_equal(np.flatnonzero(diverging), sorted(expected))


def test_nuts_sequential_chains_and_chained_hook(y):
    calls = []
    recorder = SampleStatsRecorder(hook_fn=lambda *args: calls.append(args[2]))
    mcmc = MCMC(NUTS(gaussian), num_samples=30, warmup_steps=30, num_chains=2, hook_fn=recorder, disable_progbar=True)
    mcmc.run(y)
    stats = mcmc_sample_stats(mcmc)
    assert stats["n_steps"].shape == (2, 30)
    assert (stats["n_steps"] >= 1).all() and (stats["n_steps"] <= 2**10).all()
    assert len(calls) == 2 * 60
    recorder.reset()
    with pytest.warns(UserWarning, match="no complete record"):
        stats = mcmc_sample_stats(mcmc, recorder)
    assert set(stats) == {"diverging"}


def test_n_steps_of_a_reused_kernel_and_of_draws_before_the_counter(y):
    def potential(z):
        return 0.5 * (z["x"] ** 2).sum()

    kernel = HMC(potential_fn=potential, num_steps=4, step_size=0.3, adapt_step_size=False)
    for _ in range(2):  # a fresh recorder on the same kernel counted nothing: n_steps 0
        recorder = SampleStatsRecorder()
        mcmc = MCMC(kernel, num_samples=5, warmup_steps=3, initial_params={"x": torch.zeros(2)}, hook_fn=recorder,
                    disable_progbar=True)  # fmt: skip
        mcmc.run()
        np.testing.assert_array_equal(mcmc_sample_stats(mcmc)["n_steps"], 4)
        assert kernel.potential_fn is potential  # the counter is removed at the end of the run
    # without warmup, a chain's first draw is taken before the recorder sees the kernel: unknown, not 0
    kernel = HMC(gaussian, num_steps=5, step_size=0.3, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=4, warmup_steps=0, num_chains=2, hook_fn=SampleStatsRecorder(),
                disable_progbar=True)  # fmt: skip
    mcmc.run(y)
    np.testing.assert_array_equal(mcmc_sample_stats(mcmc)["n_steps"], [[np.nan, 5, 5, 5]] * 2)
