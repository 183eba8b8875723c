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
from pyro_gpx.diagnostics import SampleStatsRecorder


@pytest.mark.parametrize("stages", [1, 2])
def test_a_target_equal_to_the_reference_accepts_every_step(float64, stages):
    # reference N(0, I) (initial point 0, unit mass, no adaptation) = target: the rotation is the exact
    # flow and the kicks vanish, so any step size is accepted and each trajectory of length pi/2 is exact
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(40), 1.0).to_event(1))

    kernel = SplitHMC(model, step_size=0.7, adapt_step_size=False, adapt_mass_matrix=False, stages=stages,
                      init_strategy=init_to_value(values={"x": torch.zeros(40)}))  # fmt: skip
    recorder = SampleStatsRecorder()
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True, hook_fn=recorder)
    mcmc.run()
    assert mcmc.diagnostics()["acceptance rate"]["chain 0"] == 1.0
    # the step taken: pi/2 in ceil(length / 0.7) equal steps of a jittered length, never above 0.7
    steps = recorder.as_arrays(1, 300)["step_size"]
    assert (steps <= 0.7).all() and (steps > 0.7 / 2).all() and len(set(steps.ravel().tolist())) > 1
    x = mcmc.get_samples()["x"].reshape(-1).numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-3


@pytest.mark.parametrize("stages, gradient_adaptation", [(1, False), (2, False), (2, True)])
def test_moments_of_an_anisotropic_target_with_a_constrained_site(float64, stages, gradient_adaptation):
    loc, scale = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 2.0, 1.0])

    def model():
        pyro.sample("x", dist.Normal(loc, scale).to_event(1))
        pyro.sample("s", dist.HalfNormal(1.0))

    pyro.set_rng_seed(1)
    kernel = SplitHMC(model, stages=stages, gradient_adaptation=gradient_adaptation)
    mcmc = MCMC(kernel, num_samples=3000, warmup_steps=500, disable_progbar=True)
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


def test_two_stage_steps_cost_two_gradients_and_beat_strang_at_equal_cost(float64):
    # a Gaussian target whose precision exceeds the unit reference by a smooth remainder (eigenvalues
    # 1 + a_i, a_i up to 3, 1000 dimensions): at the same gradients per unit time the two-stage splitting
    # (kicks 1/6, 2/3, 1/6) has a smaller energy error than Strang's, so it accepts more often
    a = torch.linspace(0.0, 3.0, 1000)

    def potential_fn(z):
        return 0.5 * ((1 + a) * z["x"].square()).sum()

    rates, gradients = {}, {}
    for stages, step in [(1, 0.25), (2, 0.5)]:
        calls = [0]

        def counted(z, calls=calls):
            calls[0] += 1
            return potential_fn(z)

        pyro.set_rng_seed(3)
        kernel = SplitHMC(potential_fn=counted, step_size=step, adapt_step_size=False, adapt_mass_matrix=False,
                          trajectory_length=2.0, jitter=0.0, stages=stages)  # fmt: skip
        mcmc = MCMC(kernel, num_samples=200, warmup_steps=0, initial_params={"x": torch.zeros(1000)},
                    disable_progbar=True)  # fmt: skip
        mcmc.run()
        rates[stages] = float(np.mean(mcmc.diagnostics()["acceptance rate"]["chain 0"]))
        gradients[stages] = calls[0]
    assert gradients[2] == gradients[1]  # 4 steps of 2 gradients against 8 of 1 per trajectory
    assert rates[2] > rates[1] + 0.05, rates


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
    with pytest.raises(ValueError, match="stages"):
        SplitHMC(model, stages=3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="trajectory_length must be a finite positive number"):
            SplitHMC(model, trajectory_length=bad)
    for bad in (0.0, -1.0, float("nan")):  # Pyro lifted 0 to 1e-10: about 1e10 steps per trajectory, a hang
        with pytest.raises(ValueError, match="step_size must be a finite positive number"):
            SplitHMC(model, step_size=bad)
