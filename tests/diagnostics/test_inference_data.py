"""to_inference_data on MCMC runs, trained guides and sample dicts; ArviZ functions and netCDF."""

import random

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_gpx.diagnostics import (
    SampleStatsRecorder,
    from_netcdf,
    get_group,
    group_names,
    loo_elpd,
    plot_posterior,
    plot_trace,
    to_inference_data,
    to_netcdf,
)

from .. import arviz_api
from . import models


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(30, generator=gen, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 + 0.3 * noise
    return X, y


@pytest.fixture(scope="module")
def nuts_run(data):
    pyro.set_rng_seed(1)
    X, y = data
    recorder = SampleStatsRecorder()
    mcmc = MCMC(NUTS(models.linreg), num_samples=150, warmup_steps=150, num_chains=2, hook_fn=recorder,
                disable_progbar=True)  # fmt: skip
    mcmc.run(X, y)
    return mcmc


def test_mcmc_groups_and_values(nuts_run, data):
    X, y = data
    idata = to_inference_data(nuts_run, posterior_predictive=True)
    assert set(group_names(idata)) >= {"posterior", "log_likelihood", "sample_stats", "observed_data",
                                       "posterior_predictive"}  # fmt: skip
    post = get_group(idata, "posterior")
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 150
    samples = nuts_run.get_samples(group_by_chain=True)
    np.testing.assert_array_equal(post["w"].values, samples["w"].numpy())
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
    expected = models.linreg_log_lik(flat, X, y).reshape(2, 150, -1).numpy()
    np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values, expected, rtol=1e-10)
    stats = get_group(idata, "sample_stats")
    assert {"diverging", "step_size", "acceptance_rate", "lp", "n_steps"} <= set(stats.data_vars)
    assert stats["diverging"].dtype == bool
    assert (stats["n_steps"].values >= 1).all()
    # posterior predictive: drawn from the model, centred on the posterior mean function
    pp = get_group(idata, "posterior_predictive")["y"].values
    assert pp.shape == (2, 150, 30)
    mean_fn = post["mean"].values
    sd = np.sqrt(post["sigma"].values.mean() ** 2 / 300)
    assert np.abs(pp.mean((0, 1)) - mean_fn.mean((0, 1))).max() < 6 * sd


def test_mcmc_summary_loo_and_plot(nuts_run):
    idata = to_inference_data(nuts_run)
    summary = az.summary(idata, var_names=["w", "b", "sigma"])
    assert summary.shape[0] == 4
    assert summary["r_hat"].max() < 1.1
    elpd, se = loo_elpd(idata)
    assert np.isfinite(elpd) and se > 0 and elpd == arviz_api.loo(idata)[0]
    plot_trace(idata, var_names=["b", "sigma"])
    plot_posterior(idata, var_names=["w"], coords={"w_dim_0": [1]})


def test_netcdf_round_trip(nuts_run, tmp_path):
    idata = to_inference_data(nuts_run, posterior_predictive=True, constant_data={"X": nuts_run._args[0]})
    path = to_netcdf(idata, tmp_path / "run.nc")
    back = from_netcdf(path)
    assert group_names(back) == group_names(idata)
    for group in group_names(idata):
        a, b = get_group(idata, group), get_group(back, group)
        assert set(a.data_vars) == set(b.data_vars)
        for name in a.data_vars:
            assert a[name].dims == b[name].dims
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name].values, b[name].values)


def test_user_dims_and_coords(nuts_run):
    labels = [f"obs{i}" for i in range(30)]
    idata = to_inference_data(nuts_run, dims={"y": ["obs_id"]}, coords={"obs_id": labels})
    ll = get_group(idata, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "obs_id")
    assert list(ll["obs_id"].values) == labels


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_svi_guide(data, guide_cls):
    X, y = data
    guide = guide_cls(models.linreg)
    svi = SVI(models.linreg, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(600):
        svi.step(X, y)
    idata = to_inference_data(guide, model=models.linreg, model_args=(X, y), num_samples=300, seed=0)
    post = get_group(idata, "posterior")
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 300
    np.testing.assert_allclose(post["w"].values.mean((0, 1)), [1.0, -2.0], atol=0.3)
    flat = {k: torch.as_tensor(post[k].values[0], dtype=X.dtype) for k in ("w", "b", "sigma")}
    expected = models.linreg_log_lik(flat, X, y).numpy()
    np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values[0], expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(arviz_api.loo(idata)[0])
    # the same seed gives the same draws
    again = to_inference_data(guide, model=models.linreg, model_args=(X, y), num_samples=300, seed=0)
    np.testing.assert_array_equal(get_group(again, "posterior")["w"].values, post["w"].values)


def test_subsampled_svi_model_full_log_likelihood(float64):
    y = torch.randn(50, generator=torch.Generator().manual_seed(2)) + 1.0
    guide = AutoNormal(models.subsampled)
    svi = SVI(models.subsampled, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(y, 8)
    idata = to_inference_data(guide, model=models.subsampled, model_args=(y, 8), num_samples=100)
    ll = get_group(idata, "log_likelihood")["y"]
    assert ll.shape == (1, 100, 50)
    post = get_group(idata, "posterior")
    mu, sigma = (torch.as_tensor(post[k].values[0]) for k in ("mu", "sigma"))
    expected = torch.distributions.Normal(mu[:, None], sigma[:, None]).log_prob(y)
    np.testing.assert_allclose(ll.values[0], expected.numpy(), rtol=1e-10)


def test_dict_with_chains(float64):
    y = torch.linspace(-1, 1, 7)
    samples = {"mu": torch.randn(3, 20), "sigma": torch.rand(3, 20) + 0.5}
    idata = to_inference_data(samples, model=models.subsampled, model_args=(y, 7), group_by_chain=True)
    assert get_group(idata, "log_likelihood")["y"].shape == (3, 20, 7)
    assert get_group(idata, "posterior").sizes["chain"] == 3


def test_an_observed_site_outside_any_plate(float64):
    y = torch.randn(6)

    def model(y):
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 10.0))
        pyro.sample("y", pyro.distributions.Normal(mu, 1.0), obs=y)  # its batch shape comes from y

    samples = {"mu": torch.randn(50)}
    for vectorize in (None, False):  # batched draws failed to score it; the per-draw loop copied one value
        idata = to_inference_data(samples, model=model, model_args=(y,), posterior_predictive=True, seed=1,
                                  vectorize=vectorize)  # fmt: skip
        expected = pyro.distributions.Normal(samples["mu"][:, None], 1.0).log_prob(y)
        np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values[0], expected.numpy(), rtol=1e-12)
        replicated = get_group(idata, "posterior_predictive")["y"].values[0]
        assert replicated.shape == (50, 6) and replicated.std(axis=1).mean() > 0.5  # one draw per point


def test_samples_holding_observed_or_unknown_sites_are_refused(float64):
    y = torch.linspace(-1, 1, 7)
    samples = {"mu": torch.randn(10), "sigma": torch.rand(10) + 0.5}
    with pytest.raises(ValueError, match=r"observed site\(s\) \['y'\]"):  # e.g. Predictive's output
        to_inference_data({**samples, "y": torch.randn(10, 7)}, model=models.subsampled, model_args=(y, 7))
    with pytest.raises(ValueError, match=r"not sample sites of the model"):
        to_inference_data({**samples, "_aux": torch.randn(10)}, model=models.subsampled, model_args=(y, 7))


def test_user_dims_on_masked_and_event_sites(float64):
    y = torch.tensor([0.3, -0.2, 1.0, 2.0])
    mask = torch.tensor([True, False, True, True])

    def masked(y):
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 10.0))
        with pyro.plate("data", 4):
            pyro.sample("y", pyro.distributions.Normal(mu, 1.0).mask(mask), obs=y)

    samples = {"mu": torch.randn(6)}
    idata = to_inference_data(samples, model=masked, model_args=(y,), dims={"y": ["obs_id"]},
                              coords={"obs_id": ["a", "b", "c", "d"]})  # fmt: skip
    ll = get_group(idata, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "y_observed_id")  # the kept points, not relabelled 0, 1, 2
    assert ll["y_observed_id"].values.tolist() == [0, 2, 3]
    expected = pyro.distributions.Normal(samples["mu"][:, None], 1.0).log_prob(y)[:, [0, 2, 3]]
    np.testing.assert_allclose(ll.values[0], expected.numpy(), rtol=1e-12)
    assert get_group(idata, "observed_data")["y"].dims == ("y_observed_id",)  # lined up with log_likelihood

    def events(y):
        mu = pyro.sample("mu", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 5):
            pyro.sample("y", pyro.distributions.MultivariateNormal(mu, torch.eye(2)), obs=y)

    idata = to_inference_data({"mu": torch.randn(6, 2)}, model=events, model_args=(torch.randn(5, 2),),
                              dims={"y": ["obs", "coord"]})  # fmt: skip
    assert get_group(idata, "log_likelihood")["y"].dims == ("chain", "draw", "obs")  # batch dims only
    assert get_group(idata, "observed_data")["y"].dims == ("obs", "coord")


@pytest.mark.parametrize("vectorize", [None, False])
def test_masked_site_groups_line_up_for_loo_pit(float64, vectorize):
    y = torch.linspace(-2, 2, 9)
    mask = torch.tensor([True, False, True, True, False, True, True, True, False])
    keep = mask.numpy()
    samples = {"mu": 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(1))}
    idata = to_inference_data(samples, model=models.dist_masked, model_args=(y, mask), posterior_predictive=True,
                              vectorize=vectorize, seed=3)  # fmt: skip
    full = to_inference_data(samples, model=models.dist_masked, model_args=(y, torch.ones(9, dtype=torch.bool)),
                             posterior_predictive=True, vectorize=vectorize, seed=3)  # fmt: skip
    pp, full_pp = get_group(idata, "posterior_predictive"), get_group(full, "posterior_predictive")
    for group in ("log_likelihood", "observed_data", "posterior_predictive"):
        assert get_group(idata, group)["y"].dims[-1] == "y_observed_id"
        assert get_group(idata, group)["y_observed_id"].values.tolist() == np.flatnonzero(keep).tolist()
    assert "y_unobserved" not in get_group(idata, "observed_data")
    # the same draws as the unmasked model's, split into the kept and the masked-out points
    np.testing.assert_array_equal(pp["y"].values, full_pp["y"].values[..., keep])
    np.testing.assert_array_equal(pp["y_unobserved"].values, full_pp["y"].values[..., ~keep])
    assert pp["y_unobserved_id"].values.tolist() == np.flatnonzero(~keep).tolist()
    # LOO-PIT on the masked conversion equals ArviZ's on its own container of the kept points
    reference = arviz_api.from_dict({
        "posterior": {"mu": samples["mu"].numpy()[None]},
        "log_likelihood": {"y": get_group(full, "log_likelihood")["y"].values[..., keep]},
        "posterior_predictive": {"y": full_pp["y"].values[..., keep]},
        "observed_data": {"y": y.numpy()[keep]},
    })  # fmt: skip
    np.testing.assert_allclose(arviz_api.loo_pit(idata, "y"), arviz_api.loo_pit(reference, "y"), rtol=1e-12)


def test_posterior_only_without_model():
    idata = to_inference_data({"a": torch.randn(10)}, log_likelihood=False, observed_data=False)
    assert group_names(idata) == ["posterior"]


def test_mcmc_with_potential_fn_needs_model():
    from pyro.infer import HMC

    mcmc = MCMC(HMC(potential_fn=lambda z: 0.5 * (z["x"] ** 2).sum(), num_steps=3, step_size=0.5),
                num_samples=5, warmup_steps=5, initial_params={"x": torch.zeros(2)}, disable_progbar=True)  # fmt: skip
    mcmc.run()
    with pytest.raises(ValueError, match="model is required"):
        to_inference_data(mcmc)
    idata = to_inference_data(mcmc, log_likelihood=False, observed_data=False)
    assert get_group(idata, "posterior")["x"].shape == (1, 5, 2)


@pytest.mark.parametrize("bad", [0, 2.5, float("nan"), True])
def test_draw_counts_must_be_positive_integers(float64, bad):
    y = torch.linspace(-1, 1, 4)
    guide = AutoNormal(models.dist_masked)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        to_inference_data(guide, model=models.dist_masked, model_args=(y, torch.ones(4, dtype=torch.bool)),
                          num_samples=bad)  # fmt: skip
    with pytest.raises(ValueError, match="draw_batch must be a positive integer"):
        to_inference_data({"mu": torch.randn(3)}, model=models.dist_masked, model_args=(y, y > 0), draw_batch=bad)


def _tau_model(y):
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    tau = pyro.sample("tau", dist.Normal(0.0, 1.0))
    with pyro.plate("d", len(y)):
        pyro.sample("y", dist.Normal(z[..., :1] + tau, 1.0), obs=y)


def test_batched_guide_draws_are_checked(float64, caplog):
    y = torch.randn(8, generator=torch.Generator().manual_seed(0))

    def reducing(y):  # tau's guide mean is z.sum(): batched, it summed every draw's z
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("tau", dist.Normal(z.sum(), 0.01))

    post = get_group(to_inference_data(reducing, model=_tau_model, model_args=(y,), num_samples=200, seed=0),
                     "posterior")  # fmt: skip
    assert np.abs(post["tau"].values - post["z"].values.sum(-1)).max() < 0.06  # 6 sd

    def implicit(y, mask):  # torch's own sampler, emitted as a Delta: batched, one value for every draw
        pyro.sample("mu", dist.Delta(torch.distributions.Normal(0.3, 0.2).sample()))

    mu = get_group(to_inference_data(implicit, model=models.dist_masked, model_args=(y, y > 0), num_samples=200,
                                     seed=0), "posterior")["mu"].values  # fmt: skip
    assert len(np.unique(mu)) == 200 and abs(mu.std() - 0.2) < 0.04
    with pytest.raises(ValueError, match="cannot be sampled batched"):
        to_inference_data(implicit, model=models.dist_masked, model_args=(y, y > 0), num_samples=20, vectorize=True)
    with caplog.at_level("INFO", logger="pyro_gpx.diagnostics.guide_samples"):  # autoguides stay batched
        to_inference_data(AutoMultivariateNormal(_tau_model), model=_tau_model, model_args=(y,), num_samples=50)
        # AutoDiffusion's latents are Deltas of a simulated path: conditioned on batched values they were -inf
        # a rounding away, and the check fell back to one path at a time (8 s instead of 0.1 s for 500 draws)
        from pyro_gpx.diffusion import AutoDiffusion

        def scaled(y):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            scale = pyro.sample("scale", dist.HalfNormal(1.0).expand([4]).to_event(1))  # exp: the Deltas round
            with pyro.plate("d", len(y)):
                pyro.sample("y", dist.Normal(z[..., :1], scale[..., :1]), obs=y)

        pyro.set_rng_seed(0)
        guide = AutoDiffusion(scaled, num_steps=8, hidden=32)
        svi = pyro.infer.SVI(scaled, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
        for _ in range(3):  # a non-zero drift (it starts at zero, where both runs are exact)
            svi.step(y)
        to_inference_data(guide, model=scaled, model_args=(y,), num_samples=100, log_likelihood=False,
                          posterior_predictive=False)  # fmt: skip
    assert not caplog.records


def test_samples_are_checked_against_the_prior_shapes(float64):
    y = torch.randn(6, generator=torch.Generator().manual_seed(0))
    chains = {"mu": torch.randn(2, 100), "sigma": torch.rand(2, 100) + 0.5}  # (chain, draw)

    def total(y, _):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y.sum())

    # without group_by_chain=True these were (1, 2, 100) posteriors, or a plate's shape error
    for model, samples in ((models.subsampled, chains), (total, {"mu": chains["mu"]})):
        with pytest.raises(ValueError, match=r"samples of 'mu' have shape \(100,\).*group_by_chain=True"):
            to_inference_data(samples, model=model, model_args=(y, 6))
    # Predictive's draws carry leading singleton dims: (draw, 1, 1) for a scalar site
    theta = torch.randn(10, 3, 1)
    idata = to_inference_data({"mu": torch.randn(10, 1, 1), "theta": theta}, model=models.two_plates,
                              model_args=(y.reshape(3, 2),))  # fmt: skip
    assert get_group(idata, "posterior")["mu"].dims == ("chain", "draw")
    expected = dist.Normal(theta, 0.5).log_prob(y.reshape(3, 2))
    np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values[0], expected.numpy(), rtol=1e-12)


def test_numpy_samples_take_the_models_dtype():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 2, generator=gen), torch.randn(6, generator=gen)  # float32
    rng = np.random.default_rng(0)
    samples = {"w": rng.normal(size=(10, 2)), "b": rng.normal(size=10), "sigma": rng.uniform(0.5, 1, 10)}  # float64
    idata = to_inference_data(samples, model=models.linreg_matmul, model_args=(X, y))  # X @ w failed
    ll = get_group(idata, "log_likelihood")["y"].values[0]
    expected = models.linreg_log_lik({k: torch.as_tensor(v, dtype=torch.float32) for k, v in samples.items()}, X, y)
    assert ll.dtype == np.float32
    np.testing.assert_allclose(ll, expected.numpy(), rtol=1e-6)


def test_sample_stats_and_recorders_with_sample_dicts(float64):
    y = torch.randn(5, generator=torch.Generator().manual_seed(0))
    model = models.dist_masked
    samples = {"mu": torch.randn(2, 10)}
    args = (y, y > -10)
    with pytest.raises(ValueError, match=r"sample_stats\['lp'\] has shape \(10, 2\)"):  # transposed
        to_inference_data(
            samples, model=model, model_args=args, group_by_chain=True, sample_stats={"lp": np.ones((10, 2))}
        )
    recorder = SampleStatsRecorder()
    mcmc = MCMC(NUTS(model), num_samples=10, warmup_steps=5, hook_fn=recorder, disable_progbar=True)
    mcmc.run(*args)
    idata = to_inference_data(mcmc.get_samples(group_by_chain=True), model=model, model_args=args,
                              group_by_chain=True, sample_stats=recorder)  # was silently dropped  # fmt: skip
    stats = get_group(idata, "sample_stats")
    for name, value in recorder.as_arrays(1, 10).items():
        np.testing.assert_array_equal(stats[name].values, value)
    with pytest.raises(ValueError, match="sample_stats: the SampleStatsRecorder holds no complete record"):
        to_inference_data(samples, model=model, model_args=args, group_by_chain=True, sample_stats=recorder)


def test_bad_arguments_are_named(float64):
    y = torch.randn(5)
    args = (y, y > -10)
    cases = [
        (MCMC(NUTS(models.dist_masked), num_samples=5, warmup_steps=5), {}, "call its run"),
        ({"mu": torch.randn(10)}, {"group_by_chain": True}, r"leading \('chain', 'draw'\)"),
        ({"mu": torch.tensor(1.0)}, {}, r"samples of 'mu' have shape \(\); expected leading \('draw',\)"),
        ({"mu": torch.randn(0)}, {}, r"shape \(0,\); expected leading \('draw',\) dimensions of size >= 1"),
        ({"mu": torch.randn(10)}, {"coords": {"data": 3}}, r"coords\['data'\] has shape \(\); 'y' needs 5"),
    ]
    for posterior, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            to_inference_data(posterior, model=models.dist_masked, model_args=args, **kwargs)


@pytest.mark.parametrize("batch_size, seed", [(None, 5), (3, None), (3, 5)])
def test_random_states_are_left_alone(float64, batch_size, seed):
    # seed= reseeded every stream for good; a subsampled plate's structural run drew from torch's
    y = torch.randn(10, generator=torch.Generator().manual_seed(1))
    samples = {"mu": torch.randn(20), "sigma": torch.rand(20) + 0.5}

    def convert():  # without a seed, the posterior predictive draws from the caller's stream
        return to_inference_data(samples, model=models.subsampled, model_args=(y, batch_size or 10),
                                 posterior_predictive=seed is not None, seed=seed)  # fmt: skip

    pyro.set_rng_seed(123)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    pyro.set_rng_seed(123)
    idata = convert()
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    if seed is not None:  # and reproducible
        pp = get_group(idata, "posterior_predictive")["y"].values
        np.testing.assert_array_equal(get_group(convert(), "posterior_predictive")["y"].values, pp)


def _mean_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    pyro.deterministic("prec", s**-2)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


def test_a_size_one_deterministic_along_a_plate_is_broadcast_as_pyro_does():
    """(A, 1) in plates of A and B: read with the value's size, the 'items' coordinate became 1 long and the
    observed site was refused ("coords['items'] has shape (1,)")."""
    A, B = 3, 4
    y = torch.randn(A, B)

    def nested(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", A, dim=-2):
            g = pyro.sample("g", dist.Normal(mu, 1.0))
            with pyro.plate("items", B, dim=-1):
                pyro.deterministic("centered", g - mu, event_dim=0)
                pyro.sample("y", dist.Normal(g, 0.5), obs=y)

    samples = {"mu": torch.randn(5), "g": torch.randn(5, A, 1)}
    centered = to_inference_data(samples, model=nested, model_args=(y,)).posterior["centered"]
    assert centered.dims == ("chain", "draw", "groups", "items")
    np.testing.assert_array_equal(centered.values[0], (samples["g"] - samples["mu"][:, None, None]).expand(5, A, B))


def test_deterministic_samples_are_recomputed_and_must_agree():
    """Predictive's deterministic sites were conditioned into the model (an edited value replaced what the
    model computes) and kept Predictive's singleton dim ('prec_dim_0') where the latents lost theirs."""
    y = torch.randn(6, generator=torch.Generator().manual_seed(0))
    guide = AutoNormal(_mean_model)
    guide(y)
    draws = {k: v.detach() for k, v in Predictive(_mean_model, guide=guide, num_samples=20)(y).items() if k != "y"}
    assert draws["prec"].shape == (20, 1)
    data = to_inference_data(draws, model=_mean_model, model_args=(y,))
    assert data.posterior["prec"].dims == data.posterior["mu"].dims == ("chain", "draw")
    np.testing.assert_allclose(data.posterior["prec"].values[0], draws["s"][:, 0].numpy() ** -2, rtol=1e-6)
    with pytest.raises(ValueError, match="deterministic site 'prec' disagree"):
        to_inference_data({**draws, "prec": draws["prec"] + 1.0}, model=_mean_model, model_args=(y,))


def test_a_saved_posterior_dataset_is_rescored():
    y = torch.randn(6, generator=torch.Generator().manual_seed(0))
    samples = {
        "mu": np.random.default_rng(0).normal(size=(2, 5)),
        "s": np.random.default_rng(1).uniform(0.5, 1, (2, 5)),
    }
    first = to_inference_data(samples, model=_mean_model, model_args=(y,), group_by_chain=True)
    again = to_inference_data(first.posterior, model=_mean_model, model_args=(y,), group_by_chain=True)  # TypeError
    np.testing.assert_array_equal(again.log_likelihood["y"].values, first.log_likelihood["y"].values)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model_args": torch.randn(6)}, TypeError, "model_args must be a tuple or list"),
        ({"seed": "a"}, ValueError, "seed must be a non-negative integer"),
        ({"seed": 1.5}, ValueError, "seed must be a non-negative integer"),
        ({"coords": [1, 2]}, TypeError, "coords must be a dict"),
        ({"constant_data": [1, 2]}, TypeError, "constant_data must be a dict"),
        ({"dims": {"y": "obs"}}, TypeError, r"dims\['y'\] must be a list"),
        ({"log_likelihood": "no"}, TypeError, "log_likelihood must be a bool"),
    ],
)
def test_malformed_arguments_are_named(kwargs, error, match):
    y = torch.randn(6)
    with pytest.raises(error, match=match):
        to_inference_data(
            {"mu": torch.randn(5), "s": torch.rand(5) + 0.5}, model=_mean_model, **{"model_args": (y,), **kwargs}
        )


def test_nan_observed_values_are_named_unless_masked_out():
    y = torch.randn(6)
    y[2] = float("nan")
    samples = {"mu": torch.randn(5), "s": torch.rand(5) + 0.5}
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="observed values of site 'y' contain NaN"):  # was a NaN log-likelihood
            to_inference_data(samples, model=_mean_model, model_args=(y,))

        def masked(y):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", 6), pyro.poutine.mask(mask=~torch.isnan(y)):
                pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        data = to_inference_data({"mu": samples["mu"]}, model=masked, model_args=(y,))
    assert data.log_likelihood["y"].dims == ("chain", "draw", "y_observed_id")
    assert np.isfinite(data.log_likelihood["y"].values).all()


def test_loo_refuses_a_joint_log_likelihood():
    # a multivariate observation (a GP's marginal likelihood): one value per draw, which az.loo would
    # take as a single observation and return an elpd with Pareto k > 1, silently
    def model(y):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(5), s * torch.eye(5)), obs=y)

    samples = {"s": dist.LogNormal(0.0, 0.3).sample((40,))}
    idata = to_inference_data(samples, model=model, model_args=(torch.randn(5),))
    assert get_group(idata, "log_likelihood")["y"].dims == ("chain", "draw")
    with pytest.raises(ValueError, match=r"log-likelihood of \['y'\] is one joint value per draw"):
        loo_elpd(idata)


@pytest.mark.parametrize("with_size", [False, True])
def test_a_plate_with_indices_given_by_the_model_is_refused(with_size):
    # the minibatch idiom pyro.plate(..., subsample=idx): walking the plate replaced idx but not the
    # batch's data, so the 10 points were scored four times and labelled as 40 (silently)
    X, Y = torch.randn(40), torch.randn(40)
    x, y, idx = X[:10], Y[:10], torch.arange(10)

    def model(x, y, idx):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 40, subsample=idx, subsample_size=len(idx) if with_size else None):
            pyro.sample("y", dist.Normal(w * x, 0.3), obs=y)

    with pytest.raises(ValueError, match=r"plate 'data' runs on 10 of its 40 indices given by the model"):
        to_inference_data({"w": torch.tensor([1.9, 2.0])}, model=model, model_args=(x, y, idx))
    w = torch.tensor([1.9, 2.0])
    full = to_inference_data({"w": w}, model=model, model_args=(X, Y, torch.arange(40)))  # all indices: fine
    expected = dist.Normal(w[:, None] * X, 0.3).log_prob(Y).numpy()
    np.testing.assert_allclose(get_group(full, "log_likelihood")["y"].values[0], expected, rtol=1e-6)


def test_a_saved_posterior_is_read_by_dimension_name(float64):
    """A posterior Dataset whose dims are (draw, chain) was read by position: its chains became draws."""
    y = torch.linspace(-1, 1, 7)
    samples = {"mu": torch.randn(3, 20), "sigma": torch.rand(3, 20) + 0.5}
    idata = to_inference_data(samples, model=models.subsampled, model_args=(y, 7), group_by_chain=True)
    post = get_group(idata, "posterior")
    transposed = post.transpose("draw", "chain")
    for saved in (transposed, xr.DataTree(transposed)):  # ArviZ 1.x's idata.posterior is a DataTree node
        again = to_inference_data(saved, model=models.subsampled, model_args=(y, 7), group_by_chain=True)
        assert get_group(again, "posterior")["mu"].dims == ("chain", "draw")
        np.testing.assert_array_equal(get_group(again, "posterior")["mu"].values, post["mu"].values)
        np.testing.assert_array_equal(
            get_group(again, "log_likelihood")["y"].values, get_group(idata, "log_likelihood")["y"].values
        )
