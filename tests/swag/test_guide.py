"""AutoSWAG as a Pyro guide: Predictive, constrained latents, ArviZ export, saving."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta

from pyro_gpx.diagnostics import get_group, to_inference_data
from pyro_gpx.swag import AutoSWAG


def regression(X, y=None, subsample=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", X.shape[0], subsample_size=subsample) as idx:
        obs = None if y is None else y[idx]
        pyro.sample("y", dist.Normal((X[idx] * w).sum(-1), sigma), obs=obs)


@pytest.fixture
def trained(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=gen)
    y = X @ torch.tensor([1.0, -0.5]) + 0.3 * torch.randn(200, generator=gen)
    delta = AutoDelta(regression)
    swag = AutoSWAG(regression, max_rank=10)
    svi = SVI(regression, delta, pyro.optim.SGD({"lr": 1e-4, "momentum": 0.9}), Trace_ELBO())
    for epoch in range(60):
        for _ in range(10):  # minibatch SGD: the noise SWAG measures
            svi.step(X, y, 20)
        if epoch >= 20:
            swag.collect(delta.median(), X, y, 20)
    return X, y, swag


def test_swag_guide_predictive_and_arviz(trained):
    X, y, swag = trained
    assert swag.moments.num_snapshots == 40 and swag.moments.rank == 10
    samples = Predictive(regression, guide=swag, num_samples=300, return_sites=["w", "sigma", "y"])(X)
    assert samples["y"].shape == (300, 200) and (samples["sigma"] > 0).all()
    w = samples["w"].reshape(300, 2)  # Predictive keeps a singleton plate dimension
    least_squares = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    torch.testing.assert_close(swag.median()["w"], least_squares, atol=0.05, rtol=0)  # the SWA mean
    sd = w.std(0)
    assert (sd > 0).all()  # a distribution, not a point
    assert ((w.mean(0) - swag.median()["w"]).abs() < 4 * sd / 300**0.5).all()
    median = swag.median()
    assert set(median) == {"w", "sigma"} and median["sigma"] > 0
    idata = to_inference_data(swag, model=regression, model_args=(X, y), num_samples=200)
    assert get_group(idata, "log_likelihood")["y"].shape == (1, 200, 200)


def test_swag_guide_density_is_the_gaussian_in_unconstrained_space(trained):
    X, y, swag = trained
    trace = pyro.poutine.trace(swag).get_trace(X, y)
    latent = trace.nodes["_AutoSWAG_latent"]
    expected = swag.get_posterior().log_prob(latent["value"])
    torch.testing.assert_close(latent["fn"].log_prob(latent["value"]), expected)


def test_swag_state_round_trip(trained):
    X, y, swag = trained
    fresh = AutoSWAG(regression, max_rank=10)
    fresh.load_swag_state_dict(swag.swag_state_dict(), X, y)
    pyro.set_rng_seed(3)
    a = swag(X, y)
    pyro.set_rng_seed(3)
    b = fresh(X, y)
    for name in ("w", "sigma"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_collect_errors(float64):
    X = torch.randn(10, 2)
    swag = AutoSWAG(regression)
    with pytest.raises(ValueError, match="'sigma'"):
        swag.collect({"w": torch.zeros(2)}, X)
    with pytest.raises(ValueError, match="collected nothing"):
        swag.median()
