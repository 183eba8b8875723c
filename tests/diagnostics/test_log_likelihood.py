"""The log_likelihood group against hand-written pointwise log-densities."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_gpx.diagnostics import get_group, to_inference_data

from .. import arviz_api
from . import models


def _ll(idata, name="y"):
    return get_group(idata, "log_likelihood")[name].values


def _attr(idata, key):
    return get_group(idata, "posterior").attrs[key]


@pytest.fixture
def regression_data(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(25, 3, generator=gen)
    y = X @ torch.tensor([1.0, -0.5, 0.2]) + 0.3 + 0.4 * torch.randn(25, generator=gen)
    return X, y


def test_vectorized_matches_hand_computation(regression_data):
    X, y = regression_data
    samples = models.draws(40, w=(3,), b=(), sigma=())
    idata = to_inference_data(samples, model=models.linreg, model_args=(X, y))
    assert _attr(idata, "log_likelihood_vectorized") == 1
    expected = models.linreg_log_lik(samples, X, y).numpy()
    np.testing.assert_allclose(_ll(idata)[0], expected, rtol=1e-10)
    assert get_group(idata, "log_likelihood")["y"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose(get_group(idata, "observed_data")["y"].values, y.numpy())
    # the deterministic site joins the posterior
    mean = (samples["w"] @ X.T + samples["b"][:, None]).numpy()
    np.testing.assert_allclose(get_group(idata, "posterior")["mean"].values[0], mean, rtol=1e-10)


def test_not_shape_safe_model_falls_back_to_loop(regression_data):
    X, y = regression_data
    samples = models.draws(10, w=(3,), b=(), sigma=())
    idata = to_inference_data(samples, model=models.linreg_matmul, model_args=(X, y))
    assert _attr(idata, "log_likelihood_vectorized") == 0
    np.testing.assert_allclose(_ll(idata)[0], models.linreg_log_lik(samples, X, y).numpy(), rtol=1e-10)


def test_item_branching_model(float64):
    y = torch.linspace(-2, 2, 9)
    samples = {"mu": torch.tensor([-1.0, 0.5, 2.0, -0.1])}
    idata = to_inference_data(samples, model=models.branching, model_args=(y,))
    assert _attr(idata, "log_likelihood_vectorized") == 0
    scale = torch.where(samples["mu"] > 0, 1.0, 2.0)
    expected = torch.distributions.Normal(samples["mu"][:, None], scale[:, None]).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


def test_silently_wrong_vectorization_is_detected(float64):
    y = torch.linspace(-1, 1, 5)
    samples = models.draws(6, mu=(2,))
    idata = to_inference_data(samples, model=models.reducing, model_args=(y,))
    assert _attr(idata, "log_likelihood_vectorized") == 0
    expected = torch.distributions.Normal(samples["mu"].sum(-1, keepdim=True), 1.0).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


def test_a_branch_on_a_latent_value_is_found_at_the_extremes(float64):
    # the first four draws are positive, so a check on them alone batched this model wrongly
    y = torch.linspace(-1, 1, 5)
    mu = torch.tensor([0.5, 0.6, 0.7, 0.8, -1.0, 0.9])
    idata = to_inference_data({"mu": mu}, model=models.sign_branching, model_args=(y,))
    assert _attr(idata, "log_likelihood_vectorized") == 0
    scale = torch.where(mu > 0, 2.0, 1.0)[:, None]
    expected = torch.distributions.Normal(mu[:, None], scale).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


def test_vectorize_true_raises_for_unsafe_model(float64):
    y = torch.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="batched over draws"):
        to_inference_data({"mu": torch.randn(4)}, model=models.branching, model_args=(y,), vectorize=True)


@pytest.mark.parametrize("model", [models.masked_with_factor, models.dist_masked])
def test_masked_points_dropped_and_factor_excluded(float64, model):
    y = torch.linspace(-2, 2, 8)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    samples = {"mu": torch.randn(5), "sigma": torch.rand(5) + 0.5}
    if model is models.dist_masked:
        samples.pop("sigma")
    idata = to_inference_data(samples, model=model, model_args=(y, mask))
    ll = get_group(idata, "log_likelihood")
    assert list(ll.data_vars) == ["y"]  # the factor is not an observation
    assert ll["y"].dims == ("chain", "draw", "y_observed_id")
    np.testing.assert_array_equal(ll["y_observed_id"].values, np.flatnonzero(mask.numpy()))
    sigma = samples.get("sigma", torch.ones(5))
    expected = torch.distributions.Normal(samples["mu"][:, None], sigma[:, None]).log_prob(y[mask])
    np.testing.assert_allclose(ll["y"].values[0], expected.numpy(), rtol=1e-12)


def test_poutine_scale_is_honoured(float64):
    y = torch.linspace(-1, 1, 6)
    scale = torch.linspace(0.1, 1.0, 6)
    samples = {"mu": torch.randn(3)}
    idata = to_inference_data(samples, model=models.scaled, model_args=(y, scale))
    expected = scale * torch.distributions.Normal(samples["mu"][:, None], 1.0).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize("vectorize", [None, False])
def test_subsampled_plate_covers_every_point_once_unscaled(float64, vectorize):
    y = torch.randn(23, generator=torch.Generator().manual_seed(3))
    samples = {"mu": torch.randn(6), "sigma": torch.rand(6) + 0.5}
    idata = to_inference_data(samples, model=models.subsampled, model_args=(y, 7), vectorize=vectorize)
    expected = torch.distributions.Normal(samples["mu"][:, None], samples["sigma"][:, None]).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(get_group(idata, "observed_data")["y"].values, y.numpy())
    assert get_group(idata, "log_likelihood")["y"].dims == ("chain", "draw", "data")


def test_nested_plates_and_local_latents(float64):
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    samples = {"mu": torch.randn(5), "theta": torch.randn(5, 4, 1)}
    idata = to_inference_data(samples, model=models.two_plates, model_args=(y,))
    assert _attr(idata, "log_likelihood_vectorized") == 1
    ll = get_group(idata, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "groups", "members")
    expected = torch.distributions.Normal(samples["theta"], 0.5).log_prob(y)
    np.testing.assert_allclose(ll.values[0], expected.numpy(), rtol=1e-12)
    assert get_group(idata, "posterior")["theta"].dims == ("chain", "draw", "groups", "theta_dim_1")


def test_loo_equals_loo_of_hand_computed_log_likelihood(regression_data):
    X, y = regression_data
    samples = models.draws(400, w=(3,), b=(), sigma=())
    samples = {k: v * 0.05 + t for (k, v), t in zip(samples.items(), [torch.tensor([1.0, -0.5, 0.2]), 0.3, 0.4])}
    idata = to_inference_data(samples, model=models.linreg, model_args=(X, y))
    hand = arviz_api.from_dict({
        "posterior": {k: v.numpy()[None] for k, v in samples.items()},
        "log_likelihood": {"y": models.linreg_log_lik(samples, X, y).numpy()[None]},
    })  # fmt: skip
    (ours, ours_i), (ref, ref_i) = arviz_api.loo(idata), arviz_api.loo(hand)
    assert ours == pytest.approx(ref, rel=1e-10)
    np.testing.assert_allclose(ours_i, ref_i, rtol=1e-10)
    if arviz_api.HAS_WAIC:  # ArviZ 0.x only
        assert az.waic(idata)["elpd_waic"] == pytest.approx(az.waic(hand)["elpd_waic"], rel=1e-10)


def test_missing_latent_raises_naming_site(regression_data):
    X, y = regression_data
    with pytest.raises(ValueError, match="'sigma'"):
        to_inference_data({"w": torch.randn(4, 3), "b": torch.randn(4)}, model=models.linreg, model_args=(X, y))


def test_wrong_sample_shape_raises(regression_data):
    X, y = regression_data
    bad = {"w": torch.randn(4, 2), "b": torch.randn(4), "sigma": torch.rand(4)}
    with pytest.raises((ValueError, RuntimeError)):
        to_inference_data(bad, model=models.linreg, model_args=(X, y))


def test_bad_posterior_type():
    with pytest.raises(TypeError, match="posterior must be"):
        to_inference_data(42)


def _det_model(x, y, sub):
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x), subsample_size=sub) as i:
        mean = pyro.deterministic("mean", b * x[i])  # Pyro's default event_dim: the value's ndim
        pyro.sample("y", dist.Normal(mean, 1.0), obs=y[i])


@pytest.mark.parametrize("sub, vectorize", [(None, None), (None, True), (4, None), (4, False)])
def test_default_event_dim_deterministic_in_a_plate(float64, sub, vectorize):
    # in a subsampled plate only the (padded) last chunk was kept: shape (1, 3, 4); in a plain plate the
    # draws were looped (vectorize=True failed)
    x = torch.arange(6.0)
    y = 2 * x + torch.randn(6, generator=torch.Generator().manual_seed(0))
    b = torch.tensor([1.0, 2.0, 3.0])
    idata = to_inference_data({"b": b}, model=_det_model, model_args=(x, y, sub), vectorize=vectorize)
    mean = get_group(idata, "posterior")["mean"]
    assert mean.dims == ("chain", "draw", "data")
    np.testing.assert_array_equal(mean.values[0], (b[:, None] * x).numpy())
    assert _attr(idata, "log_likelihood_vectorized") == (vectorize is not False)
    expected = dist.Normal(b[:, None] * x, 1.0).log_prob(y)
    np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


def test_deterministic_without_its_subsampled_plate_dim_is_refused(float64):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=2) as i:
            pyro.deterministic("chunk_mean", y[i].mean())  # one value per chunk
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[i])

    with pytest.raises(ValueError, match=r"'chunk_mean'.*\['data'\]"):
        to_inference_data({"mu": torch.randn(3)}, model=model, model_args=(torch.randn(5),))


def test_posterior_predictive_batching_is_checked_against_the_loop(float64):
    # an observation used downstream: batched, y.sum() summed every draw's replicate (total ~ 800 for 4)
    y = torch.tensor([0.9, 1.1, 1.0, 1.2])

    def model(y, total):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("d", 4):
            yy = pyro.sample("y", dist.Normal(mu, 0.1), obs=y)
        pyro.sample("total", dist.Normal(yy.sum(), 0.01), obs=total)

    samples = {"mu": torch.linspace(0.9, 1.1, 50)}
    runs = [
        get_group(to_inference_data(samples, model=model, model_args=(y, y.sum()), posterior_predictive=True,
                                    vectorize=vectorize, seed=0), "posterior_predictive")
        for vectorize in (None, False)
    ]  # fmt: skip
    for name in ("y", "total"):  # the batched path falls back to the loop: the same draws
        np.testing.assert_array_equal(runs[0][name].values, runs[1][name].values)
    assert np.abs(runs[0]["total"].values - runs[0]["y"].values.sum(-1)).max() < 0.06  # 6 sd
    with pytest.raises(ValueError, match="posterior predictive draws: site 'total' differs"):
        to_inference_data(samples, model=model, model_args=(y, y.sum()), posterior_predictive=True, vectorize=True)


def test_a_sequential_subsampled_plate_is_refused_by_name(float64):
    y = torch.tensor([0.5, 0.1, 1.5, -0.3, 2.0, 0.7])

    def seq_sub(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        for i in pyro.plate("d", len(y), subsample_size=2):
            pyro.sample(f"y_{i}", dist.Normal(mu, 1.0), obs=y[i])

    for vectorize in (None, False):  # the private _NotVectorizable escaped, even from the loop
        with pytest.raises(ValueError, match=r"sequential \(iterated\) plate\(s\) \['d'\]"):
            to_inference_data({"mu": torch.randn(5)}, model=seq_sub, model_args=(y,), vectorize=vectorize)


class _Surrogate(dist.Normal):
    """``log_prob`` is a surrogate; the pointwise log-likelihood is ``log_prob + 100`` (a marker)."""

    def pointwise_log_likelihood(self, value):
        return super().log_prob(value) + 100.0


def test_pointwise_log_likelihood_hook_through_to_event(float64):
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("d", 4):
            pyro.sample("y", _Surrogate(mu * torch.ones(4, 3), 1.0).to_event(1), obs=y)

    mu = torch.tensor([-0.5, 0.0, 0.7])
    expected = dist.Normal(mu[:, None, None], 1.0).log_prob(y).sum(-1) + 300.0
    for vectorize in (None, False):
        idata = to_inference_data({"mu": mu}, model=model, model_args=(y,), vectorize=vectorize)
        np.testing.assert_allclose(_ll(idata)[0], expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "site, value, why",
    [("sigma", -1.0, "values outside"), ("mu", float("nan"), "non-finite"), ("sigma", float("inf"), "non-finite")],
)
def test_bad_samples_are_named(float64, site, value, why):
    samples = {"mu": torch.zeros(4), "sigma": torch.ones(4)}
    samples[site][2] = value  # sigma=inf gave a -inf log-likelihood silently; the others torch's error
    with pytest.raises(ValueError, match=rf"samples of '{site}' have {why}.*chain 0, draw 2"):
        to_inference_data(samples, model=models.subsampled, model_args=(torch.randn(5), 5))


def test_a_large_float32_simplex_from_pyros_transform_is_in_its_support():
    """Pyro's simplex check allows a sum 1e-6 off 1; draws of a 20 000-entry float32 simplex through Pyro's own
    transform (as NUTS and autoguides give them) are rounded by up to 4e-6, and were refused as outside it."""
    size = 20_000

    def model(y):
        p = pyro.sample("p", dist.Dirichlet(torch.ones(size)))
        with pyro.plate("d", len(y)):
            pyro.sample("y", dist.Categorical(p), obs=y)

    gen = torch.Generator().manual_seed(0)
    p = torch.distributions.biject_to(dist.constraints.simplex)(torch.randn(8, size - 1, generator=gen))
    assert not dist.constraints.simplex.check(p).all()  # Pyro's own check refuses some of them
    y = torch.randint(0, size, (5,), generator=gen)
    idata = to_inference_data({"p": p}, model=model, model_args=(y,))
    np.testing.assert_allclose(_ll(idata)[0], p[:, y].log().numpy(), rtol=1e-6)
    p[3] *= 1.01  # a sum 0.01 off 1 is still refused
    with pytest.raises(ValueError, match=r"samples of 'p' have values outside Simplex\(\).*draw 3"):
        to_inference_data({"p": p}, model=model, model_args=(y,))
