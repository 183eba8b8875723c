"""The optional training loops."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_gpx.svi import fit_lbfgs, fit_svi


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_fit_svi_reduces_loss():
    y = torch.randn(50) + 3.0
    losses = fit_svi(model, AutoNormal(model), y, num_steps=300, optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
    assert losses[-1] < losses[0]


def test_fit_lbfgs_finds_the_map_exactly():
    y = torch.randn(50, generator=torch.Generator().manual_seed(0)) + 3.0
    guide = AutoDelta(model)
    fit_lbfgs(model, guide, y, num_steps=10, progress=False)
    # MAP of a Normal mean with a N(0, 10^2) prior and unit noise
    expected = y.sum() / (len(y) + 1 / 100)
    assert float(guide.median()["mu"]) == pytest.approx(float(expected), abs=1e-4)


def test_non_finite_loss_is_an_error():
    def bad(y):
        mu = pyro.param("mu", torch.tensor(0.0))
        pyro.factor("nan", mu * float("nan"))

    with pyro.validation_enabled(False):  # Pyro's own checks would catch this NaN earlier
        with pytest.raises(FloatingPointError, match="step 0"):
            fit_svi(bad, lambda y: None, torch.zeros(1), num_steps=2, progress=False)
        with pytest.raises(FloatingPointError):
            fit_lbfgs(bad, lambda y: None, torch.zeros(1), num_steps=2, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        fit_svi(model, AutoNormal(model), torch.zeros(1), num_steps=0)


def _banana():
    x = pyro.param("x", torch.tensor([-1.5, 2.0], dtype=torch.float64))
    pyro.factor("rosenbrock", -((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2))


def _lbfgs_point(schedule, **kwargs):
    pyro.clear_param_store()
    for num_steps in schedule:
        fit_lbfgs(_banana, lambda: None, num_steps=num_steps, max_eval=3, progress=False, **kwargs)
    return pyro.param("x").detach().clone()


def test_fit_lbfgs_restart_clears_the_memory():
    # a restart after 2 iterations is a fresh L-BFGS from where the first 2 left off
    restarted = _lbfgs_point([4], restart_after=2)
    assert torch.equal(restarted, _lbfgs_point([2, 2]))
    assert not torch.equal(restarted, _lbfgs_point([4]))  # the memory mattered
    with pytest.raises(ValueError, match="restart_after"):
        fit_lbfgs(_banana, lambda: None, restart_after=-1, progress=False)
