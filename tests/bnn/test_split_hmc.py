"""Split HMC: exact for its Gaussian reference, correct moments on a non-Gaussian target, errors."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.infer.autoguide.initialization import init_to_value
from scipy import stats

from pyro_gpx.bnn import SplitHMC


def test_a_target_equal_to_the_reference_accepts_every_step(float64):
    # reference N(0, I) (initial point 0, unit mass, no adaptation) = target: the rotation is the exact
    # flow and the kicks vanish, so any step size is accepted and each trajectory of length pi/2 is exact
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(40), 1.0).to_event(1))

    kernel = SplitHMC(model, step_size=0.7, adapt_step_size=False, adapt_mass_matrix=False,
                      init_strategy=init_to_value(values={"x": torch.zeros(40)}))  # fmt: skip
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True)
    mcmc.run()
    assert mcmc.diagnostics()["acceptance rate"]["chain 0"] == 1.0
    x = mcmc.get_samples()["x"].reshape(-1).numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-3


def test_moments_of_an_anisotropic_target_with_a_constrained_site(float64):
    loc, scale = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 2.0, 1.0])

    def model():
        pyro.sample("x", dist.Normal(loc, scale).to_event(1))
        pyro.sample("s", dist.HalfNormal(1.0))

    pyro.set_rng_seed(1)
    mcmc = MCMC(SplitHMC(model), num_samples=3000, warmup_steps=500, disable_progbar=True)
    mcmc.run()
    samples = mcmc.get_samples()
    x, s = samples["x"], samples["s"]
    ess = pyro.ops.stats.effective_sample_size(x[None]).min()
    se = scale / float(ess) ** 0.5
    assert ((x.mean(0) - loc).abs() / se).max() < 4.5
    torch.testing.assert_close(x.std(0), scale, rtol=0.1, atol=0)
    ess_s = float(pyro.ops.stats.effective_sample_size(s[None, :, None]))
    half_normal_mean, half_normal_sd = math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi)
    assert abs(float(s.mean()) - half_normal_mean) < 4.5 * half_normal_sd / ess_s**0.5
    assert float(np.mean(mcmc.diagnostics()["acceptance rate"]["chain 0"])) > 0.5


def test_bad_arguments():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="jitter"):
        SplitHMC(model, jitter=1.0)
    with pytest.raises(ValueError, match="trajectory_length"):
        SplitHMC(model, trajectory_length=0.0)
    with pytest.raises(NotImplementedError, match="full_mass"):
        SplitHMC(model, full_mass=True)
    with pytest.raises(ValueError, match="num_steps"):
        SplitHMC(model, num_steps=5)
