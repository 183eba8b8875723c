"""JitteredHMC: exactly HMC without jitter; with jitter, escapes the resonance of a fixed length."""

import math

import pyro
import pytest
import torch
from pyro.infer import HMC, MCMC

from pyro_gpx.bnn import JitteredHMC, run_chains


def _potential(z):  # a 2-d standard normal
    return 0.5 * (z["x"] ** 2).sum()


def _run(kernel, num_samples=200, seed=0):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=0, initial_params={"x": torch.tensor([1.5, -0.5])},
                disable_progbar=True)  # fmt: skip
    mcmc.run()
    return mcmc.get_samples()["x"]


def _fixed(cls, **kwargs):
    # trajectory length pi: every exact trajectory maps x to -x on N(0, I)
    return cls(potential_fn=_potential, step_size=0.1, trajectory_length=math.pi, adapt_step_size=False,
               adapt_mass_matrix=False, **kwargs)  # fmt: skip


def test_no_jitter_is_hmc():
    torch.testing.assert_close(_run(_fixed(JitteredHMC, jitter=0.0), 40), _run(_fixed(HMC), 40), rtol=0, atol=0)


def test_jitter_breaks_the_resonance():
    plain = _run(_fixed(HMC))
    jittered = _run(_fixed(JitteredHMC, jitter=0.3))
    # at length pi, |x|^2 is (nearly) conserved from draw to draw: the radius only drifts
    assert float((plain**2).sum(-1).diff().abs().mean()) < 0.1
    # with jitter the draws cover N(0, I): E|x|^2 = 2, Var|x|^2 = 4 (200 draws, antithetic chain)
    r2 = (jittered**2).sum(-1)
    assert float(r2.diff().abs().mean()) > 0.5
    assert 1.4 < float(r2.mean()) < 2.6
    assert float(r2.std()) > 1.0
    assert float(jittered.mean(0).abs().max()) < 0.3


def test_lengths_stay_in_range():
    kernel = _fixed(JitteredHMC, jitter=0.25)
    pyro.set_rng_seed(1)
    steps = {kernel.num_steps for _ in range(200)}
    base = math.pi / 0.1
    assert min(steps) >= int(0.75 * base) and max(steps) <= int(1.25 * base)
    assert len(steps) > 10


def test_bad_jitter():
    with pytest.raises(ValueError, match="jitter"):
        JitteredHMC(potential_fn=_potential, jitter=1.0)
    for name in ("step_size", "trajectory_length"):
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
                JitteredHMC(potential_fn=_potential, **{name: bad})


def test_run_chains_kernel_name():
    def model():
        pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))

    out = run_chains(model, num_chains=2, num_samples=30, warmup_steps=30, kernel="jittered_hmc",
                     kernel_kwargs={"trajectory_length": 1.5, "jitter": 0.2}, processes=1, progress=False)  # fmt: skip
    assert out.samples["x"].shape == (2, 30)
    with pytest.raises(ValueError, match="kernel must be one of"):
        run_chains(model, kernel="mala")
