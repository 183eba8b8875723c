"""AutoSWAG as a Pyro guide: Predictive, constrained latents, ArviZ export, saving, dtypes."""

import io

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta

from pyro_gpx.diagnostics import get_group, to_inference_data
from pyro_gpx.swag import AutoMultiSWAG, AutoSWAG, swag_distribution

from .test_collector import _assert_moments_match, _swag_reference


def regression(X, y=None, subsample=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", X.shape[0], subsample_size=subsample) as idx:
        obs = None if y is None else y[idx]
        pyro.sample("y", dist.Normal((X[idx] * w).sum(-1), sigma), obs=obs)


@pytest.fixture(scope="module")
def trained():
    """Trained once per module (600 SVI steps); the tests only read it. Same seed and dtype as the
    function-scoped ``_fresh_pyro_state`` and ``float64`` fixtures give."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    try:
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
    finally:
        torch.set_default_dtype(old)
        pyro.clear_param_store()
    return X, y, swag


def test_swag_guide_predictive_and_arviz(trained, float64):
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


def test_swag_guide_density_is_the_gaussian_in_unconstrained_space(trained, float64):
    X, y, swag = trained
    trace = pyro.poutine.trace(swag).get_trace(X, y)
    latent = trace.nodes["_AutoSWAG_latent"]
    expected = swag.get_posterior().log_prob(latent["value"])
    torch.testing.assert_close(latent["fn"].log_prob(latent["value"]), expected)


def test_swag_state_round_trip(trained, float64):
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
    with pytest.raises(ValueError, match="value of 'sigma' is not finite, or outside its support"):
        swag.collect({"w": torch.zeros(2), "sigma": torch.tensor(-1.0)}, X)  # was 'theta contains NaN or inf'
    with pytest.raises(ValueError, match="collected nothing"):
        swag.median()


def test_a_failed_first_call_does_not_fix_the_observed_sites_as_latent(float64):
    X, y = torch.randn(10, 2), torch.randn(10)
    values = {"w": torch.zeros(2), "sigma": torch.tensor(1.0)}
    swag = AutoSWAG(regression)
    with pytest.raises(ValueError, match="latent site 'y'"):
        swag.collect(values, X)  # the targets forgotten: 'y' looks latent
    with pytest.raises(ValueError, match="collected nothing"):
        Predictive(regression, guide=swag, num_samples=2)(X)  # before any collect, without targets
    with pytest.raises(ValueError, match="collected nothing"):
        swag.median(X)
    for _ in range(3):
        swag.collect(values, X, y)  # was: "needs a value for latent site 'y'" forever
    assert swag.moments.num_snapshots == 3 and set(swag.median(X)) == {"w", "sigma"}


def _same_samples(a, b, *args):
    pyro.set_rng_seed(3)
    x = a(*args)
    pyro.set_rng_seed(3)
    y = b(*args)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=0)


def test_module_state_dict_carries_the_statistics(trained, float64):
    X, y, swag = trained
    buffer = io.BytesIO()
    torch.save(swag.state_dict(), buffer)
    buffer.seek(0)
    fresh = AutoSWAG(regression, max_rank=3)  # the saved max_rank replaces this one
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # no model args needed
    assert fresh.max_rank == 10 and fresh.moments.num_snapshots == 40
    _same_samples(swag, fresh, X, y)
    torch.testing.assert_close(fresh.median(X, y)["w"], swag.median()["w"], rtol=0, atol=0)
    empty = AutoSWAG(regression)  # nothing collected: the state is empty and loads as empty
    fresh.load_state_dict(empty.state_dict())
    with pytest.raises(ValueError, match="collected nothing"):
        _ = fresh.moments


def test_saved_sampling_settings_are_restored_and_checked(trained, float64):
    X, y, swag = trained
    saved = AutoSWAG(regression, max_rank=10, scale=0.1, diag_only=True)
    saved.load_swag_state_dict(swag.swag_state_dict(), X, y)
    saved.scale, saved.diag_only = 0.1, True  # the trained guide's state carries 0.5 and False
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh = AutoSWAG(regression)  # default scale 0.5, full covariance: the saved settings replace them
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert (fresh.scale, fresh.diag_only) == (0.1, True)
    _same_samples(saved, fresh, X, y)
    torch.testing.assert_close(fresh.quantiles([0.9], X, y)["w"], saved.quantiles([0.9])["w"], rtol=0, atol=0)
    old = {k: v for k, v in swag.swag_state_dict().items() if k not in ("scale", "diag_only")}
    kept = AutoSWAG(regression, max_rank=10, scale=0.2)
    kept.load_swag_state_dict(old, X, y)  # a state saved without the settings keeps the guide's
    assert (kept.scale, kept.diag_only) == (0.2, False)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            AutoSWAG(regression, scale=bad)
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            swag_distribution(swag.moments, bad)
        with pytest.raises(ValueError, match=r"state\['scale'\]"):
            kept.load_swag_state_dict(old | {"scale": bad})
    with pytest.raises(ValueError, match="max_rank"):
        AutoSWAG(regression, max_rank=0)
    with pytest.raises(TypeError, match="diag_only"):
        AutoSWAG(regression, diag_only=1)


def other_model(X, y=None):  # as many unconstrained entries as `regression` (3), other sites
    a = pyro.sample("a", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 1.0))
    pyro.sample("y", dist.Normal((X * a).sum(-1) + b, 1.0).to_event(1), obs=y)


def test_loading_checks_entries_and_latent_shapes(trained, float64):
    X, y, swag = trained
    state = swag.swag_state_dict()
    assert state["shapes"] == {"w": (2,), "sigma": ()}
    fresh = AutoSWAG(regression, max_rank=10)
    bad = [
        ({k: v for k, v in state.items() if k != "deviations"}, r"lacks the SWAG entries \['deviations'\]"),
        (state | {"deviations": state["deviations"][:, :2]}, r"state\['deviations'\] has shape \(10, 2\)"),
        (state | {"num_snapshots": 5}, r"expected \(5, 3\)"),
        (state | {"shapes": {"w": (3,), "sigma": ()}}, "disagrees with the 3 entries"),
        (state | {"shapes": {"w": (1,), "sigma": (2,)}}, r"tracks latent sites \{'w': \(1,\), 'sigma': \(2,\)\}"),
    ]  # fmt: skip
    for s, match in bad:
        with pytest.raises(ValueError, match=match):
            fresh.load_swag_state_dict(s, X, y)
    other = AutoSWAG(other_model)  # same number of entries, other sites: refused, not silently loaded
    with pytest.raises(ValueError, match="tracks latent sites"):
        other.load_swag_state_dict(state, X, y)
    other = AutoSWAG(other_model)
    other.load_state_dict(swag.state_dict())  # before the model has run: checked at the first call
    with pytest.raises(ValueError, match="tracks latent sites"):
        other(X, y)


def _random_walk(T, dtype, seed=0):
    """Synthetic iterates of `regression`'s latents."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -0.5], dtype=torch.float64) + 0.05 * torch.randn(
        T, 2, generator=gen, dtype=torch.float64
    ).cumsum(0)
    sigma = 0.3 * (0.05 * torch.randn(T, generator=gen, dtype=torch.float64).cumsum(0)).exp()
    return [{"w": w[t].to(dtype), "sigma": sigma[t].to(dtype)} for t in range(T)]


@pytest.mark.parametrize("diag_only, max_rank", [(True, 5), (False, 5), (False, 1)])
def test_float32_model(diag_only, max_rank):
    X = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    swag = AutoSWAG(regression, max_rank=max_rank, diag_only=diag_only)
    for values in _random_walk(12, torch.float32):
        swag.collect(values, X, X.sum(-1))
    assert swag.moments.mean.dtype == torch.float64  # float64 accumulation
    samples = Predictive(regression, guide=swag, num_samples=20, return_sites=["w", "sigma", "y"])(X)
    assert samples["y"].shape == (20, 30) and {v.dtype for v in samples.values()} == {torch.float32}
    # the float32 posterior is the float64 SWAG Gaussian, cast
    d64, d32 = swag_distribution(swag.moments, 0.5, diag_only), swag.get_posterior()
    assert type(d32) is type(d64)
    torch.testing.assert_close(d32.variance, d64.variance.float(), rtol=1e-6, atol=0)
    median, quantiles = swag.median(), swag.quantiles([0.1, 0.5, 0.9])
    assert {v.dtype for v in [*median.values(), *quantiles.values()]} == {torch.float32}
    torch.testing.assert_close(median["w"], swag.moments.mean[:2].float(), rtol=0, atol=0)
    torch.testing.assert_close(median["sigma"], swag.moments.mean[2].exp().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(quantiles["sigma"][1], median["sigma"], rtol=1e-6, atol=0)


def latent5():
    return pyro.sample("theta", dist.Normal(torch.zeros(5, dtype=torch.float64), 1.0).to_event(1))


@pytest.mark.parametrize("diag_only", [False, True])
def test_predictive_sampling_covariance_matches_numpy_sigma(diag_only):
    rng = np.random.default_rng(2)
    thetas = np.cumsum(rng.normal(size=(10, 5)), 0) * 0.1 + rng.normal(size=5)
    swag = AutoSWAG(latent5, max_rank=3, scale=0.5, diag_only=diag_only)
    for t in thetas:
        swag.collect({"theta": torch.as_tensor(t)})
    mean, cov = _swag_reference(thetas, 3, 0.5)
    if diag_only:
        cov = 0.5 * np.diag(thetas.var(0))
    draws = Predictive(latent5, guide=swag, num_samples=20_000, parallel=True, return_sites=["theta"])()["theta"]
    assert draws.dtype == torch.float64
    _assert_moments_match(draws.reshape(20_000, 5).numpy(), mean, cov)


def _walks(seeds, T=10):
    rng = [np.random.default_rng(s) for s in seeds]
    return [np.cumsum(r.normal(size=(T, 5)), 0) * 0.1 + r.normal(size=5) for r in rng]


def _latent5_swag(thetas, **kwargs):
    swag = AutoSWAG(latent5, **kwargs)
    for t in thetas:
        swag.collect({"theta": torch.as_tensor(t)})
    return swag


def test_multiswag_guide_is_the_equal_mixture_of_the_members():
    walks = _walks([2, 3])
    members = [_latent5_swag(walks[0], max_rank=3), _latent5_swag(walks[1], max_rank=3, diag_only=True)]
    guide = AutoMultiSWAG(members)
    references = [_swag_reference(walks[0], 3, 0.5), (walks[1].mean(0), 0.5 * np.diag(walks[1].var(0)))]
    mean = np.mean([m for m, _ in references], 0)
    cov = np.mean([c + np.outer(m, m) for m, c in references], 0) - np.outer(mean, mean)
    n = 20_000
    draws = Predictive(latent5, guide=guide, num_samples=n, parallel=True, return_sites=["theta"])()["theta"]
    x = draws.reshape(n, 5).numpy()
    # within 5 Monte Carlo standard errors, estimated from the draws (a mixture is not Gaussian)
    assert (np.abs(x.mean(0) - mean) < 5 * x.std(0) / n**0.5).all()
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    assert (np.abs(np.cov(x.T) - cov) < 5 * products.std(0) / n**0.5).all()
    # the density: log of the average of the members' densities
    theta = torch.as_tensor(x[:7])
    members_lp = torch.stack([m.get_posterior().log_prob(theta) for m in members])
    expected = torch.logsumexp(members_lp, 0) - np.log(2)
    torch.testing.assert_close(guide.get_posterior().log_prob(theta), expected, rtol=1e-10, atol=0)
    median = guide.median()["theta"].numpy()
    np.testing.assert_allclose(median, mean, rtol=1e-12)
    quantile = guide.quantiles([0.8413447460685429])["theta"][0].numpy()  # mean + 1 sd
    np.testing.assert_allclose(quantile, mean + np.sqrt(np.diag(cov)), rtol=1e-9)


def test_multiswag_guide_state_and_errors():
    walks = _walks([2, 3, 4])
    guide = AutoMultiSWAG([_latent5_swag(w, max_rank=3) for w in walks[:2]])
    guide()  # runs the model (without drawing from the RNG: as a fresh guide's first call)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)
    fresh = AutoMultiSWAG([AutoSWAG(latent5), AutoSWAG(latent5)])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _same_samples(guide, fresh)
    with pytest.raises(ValueError, match="saved MultiSWAG state has 2 members; this guide has 3"):
        AutoMultiSWAG([AutoSWAG(latent5) for _ in range(3)]).load_state_dict(guide.state_dict())
    with pytest.raises(TypeError, match="non-empty sequence of AutoSWAG"):
        AutoMultiSWAG([])
    with pytest.raises(ValueError, match=r"guides\[1\] has collected nothing"):
        AutoMultiSWAG([_latent5_swag(walks[2]), AutoSWAG(latent5)])()
    X = torch.randn(4, 2, dtype=torch.float64)
    other = AutoSWAG(other_model)
    other.collect({"a": torch.zeros(2, dtype=torch.float64), "b": torch.tensor(0.0, dtype=torch.float64)}, X, X[:, 0])
    with pytest.raises(ValueError, match=r"guides\[1\] tracks latent sites \{'a': \(2,\), 'b': \(\)\}"):
        AutoMultiSWAG([_latent5_swag(walks[2]), other])()  # members of another model


def test_multiswag_guide_predicts_at_new_inputs(float64):
    # the members were traced with the training data; Predictive's first call has no targets
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 2, generator=gen), torch.randn(6, generator=gen)
    members = [AutoSWAG(other_model) for _ in range(2)]
    for m, guide in enumerate(members):
        for t in range(3):
            guide.collect({"a": torch.full((2,), 0.1 * t + m), "b": torch.tensor(0.2 * t)}, X, y)
    X_new = torch.randn(4, 2, generator=gen)
    pyro.set_rng_seed(0)
    out = Predictive(other_model, guide=AutoMultiSWAG(members), num_samples=8)(X_new)
    assert out["y"].shape == (8, 4) and out["a"].shape == (8, 2)
    reloaded = AutoMultiSWAG([AutoSWAG(other_model) for _ in range(2)])
    reloaded.load_state_dict(AutoMultiSWAG(members).state_dict())
    with pytest.raises(ValueError, match=r"\['y'\] are latent in this call"):
        Predictive(other_model, guide=reloaded, num_samples=8)(X_new)  # untraced: needs the training data first
    reloaded(X, y)
    assert Predictive(other_model, guide=reloaded, num_samples=8)(X_new)["y"].shape == (8, 4)
    single = AutoSWAG(other_model)
    single.load_state_dict(members[0].state_dict())
    with pytest.raises(ValueError, match=r"\['y'\] are latent in this call"):
        Predictive(other_model, guide=single, num_samples=8)(X_new)
    single(X, y)  # traces again, with the training data
    assert Predictive(other_model, guide=single, num_samples=8)(X_new)["y"].shape == (8, 4)


def test_the_first_collect_leaves_the_random_stream_alone(float64):
    """The guide's prototype trace drew from the global RNG (init values, the random subsample), so a run that
    collected SWAG statistics took other minibatches than the same-seed run without (the SWA peer)."""
    X = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    y = X @ torch.tensor([1.0, -0.5]) + 0.1
    swag = AutoSWAG(regression)
    pyro.set_rng_seed(1)
    state = torch.get_rng_state()
    swag.collect({"w": torch.zeros(2), "sigma": torch.tensor(1.0)}, X, y, 10)
    assert torch.equal(torch.get_rng_state(), state)
