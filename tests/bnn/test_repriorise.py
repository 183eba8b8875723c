"""Repriorisation: Jacobian against autograd, the change-of-variables identity, exact N(0, I)."""

import math
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import HMC, MCMC, NUTS, Predictive
from scipy import stats

from pyro_gpx.bnn import BayesianMLP, RepriorisedReadout, readout_map
from pyro_gpx.diagnostics import get_group, to_inference_data


@pytest.mark.parametrize("n, D", [(30, 4), (5, 12)], ids=["primal", "dual"])
def test_readout_map_is_the_conditional_posterior(float64, n, D):
    gen = torch.Generator().manual_seed(1)
    Phi = torch.randn(n, D, generator=gen)
    y = torch.randn(n, 2, generator=gen)
    phi = torch.randn(D, 2, generator=gen)
    noise = torch.tensor(0.3)

    def f(flat):
        return readout_map(Phi, y, noise, flat.reshape(D, 2))[0].reshape(-1)

    J = torch.autograd.functional.jacobian(f, phi.reshape(-1))
    theta, logdet = readout_map(Phi, y, noise, phi)
    assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(J)[1]), rel=1e-10)
    # theta = mean + M phi with M M^T = noise G^{-1}: the exact conditional posterior
    G = Phi.T @ Phi + noise * torch.eye(D)
    M = J[::2, ::2]
    torch.testing.assert_close(M @ M.T, noise * torch.linalg.inv(G))
    torch.testing.assert_close(theta - (M @ phi), torch.linalg.solve(G, Phi.T @ y))


@pytest.mark.parametrize("kind", ["full rank", "repeated rows"])
def test_wide_readout_map_gradients_match_finite_differences(float64, kind):
    # 2n < D: the symmetric root from an n x n eigendecomposition; with three equal rows of features K has
    # a double zero eigenvalue, where eigh's own backward divides by zero
    gen = torch.Generator().manual_seed(3)
    Phi = torch.randn(4, 9, generator=gen)
    if kind == "repeated rows":
        Phi[1:3] = Phi[0]
    y, phi = torch.randn(4, 1, generator=gen), torch.randn(9, 1, generator=gen)

    def f(Phi, noise, phi):
        theta, logdet = readout_map(Phi, y, noise, phi)
        return theta.square().sum() + logdet

    inputs = (Phi.requires_grad_(), torch.tensor(0.3, requires_grad=True), phi.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("latent_noise", [False, True])
@pytest.mark.parametrize("widths", [[5, 4], [100]], ids=["narrow", "wide"])
def test_density_is_original_plus_log_jacobian(data, parameterization, latent_noise, widths):
    X, y = data
    bnn = BayesianMLP(3, widths, parameterization=parameterization, noise=None if latent_noise else 0.2)
    rep = bnn.repriorised()
    pyro.set_rng_seed(2)
    rep_trace = poutine.trace(rep).get_trace(X, y)
    values = {name: site["value"] for name, site in rep_trace.nodes.items() if site["type"] == "sample"}
    theta = values["readout"]
    # the same point in the original coordinates
    original = {k: v for k, v in values.items() if k not in ("readout_whitened", "y")}
    orig_trace = poutine.trace(poutine.condition(bnn, data=original)).get_trace(X, y)
    torch.testing.assert_close(orig_trace.nodes["readout"]["value"], theta)
    # log|det J| recomputed independently with autograd
    Phi = bnn.features(X, {k: v for k, v in original.items() if k.startswith("layers")})
    s = bnn.readout_prior_scale()
    noise = original.get("noise", torch.tensor(0.2))

    def to_theta(flat):
        return (readout_map(Phi * s, y[:, None], noise, flat.reshape(-1, 1))[0] * s[:, None]).T.reshape(-1)

    J = torch.autograd.functional.jacobian(to_theta, values["readout_whitened"].reshape(-1))
    logdet = torch.linalg.slogdet(J)[1]
    assert float(rep_trace.log_prob_sum()) == pytest.approx(float(orig_trace.log_prob_sum() + logdet), rel=1e-10)


def test_linear_model_posterior_is_exactly_standard_normal(data):
    X, y = data
    bnn = BayesianMLP(3, [], noise=0.05)  # Bayesian linear regression
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(bnn.repriorised()), num_samples=600, warmup_steps=300, disable_progbar=True)
    mcmc.run(X, y)
    phi = mcmc.get_samples()["readout_whitened"].reshape(600, -1).numpy()
    assert np.abs(phi.mean(0)).max() < 0.25
    assert np.abs(phi.std(0) - 1).max() < 0.15
    for column in phi.T:
        assert stats.kstest(column, "norm").pvalue > 0.001


def test_predictive_on_new_inputs_maps_back_with_training_data(data):
    X, y = data
    bnn = BayesianMLP(3, [6], noise=0.1)
    rep = bnn.repriorised()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(rep), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run(X, y)
    X_new = torch.randn(7, 3, dtype=torch.float64)
    pred = Predictive(rep, posterior_samples=mcmc.get_samples(), return_sites=["readout", "y", "_RETURN"])(X_new)
    assert pred["y"].shape == (20, 7) and pred["_RETURN"].shape == (20, 7, 1)
    # the readout used for the new inputs is the one implied by the training data
    draw = {k: v[3] for k, v in mcmc.get_samples().items()}
    train_trace = poutine.trace(poutine.condition(rep, data=draw)).get_trace(X, y)
    torch.testing.assert_close(pred["readout"][3].reshape(1, 7), train_trace.nodes["readout"]["value"])


def test_overflowing_proposal_has_zero_density_instead_of_raising(data):
    # an unstable leapfrog trajectory can carry the hidden weights to where the features overflow; the
    # repriorised model must then give a non-finite energy (rejected by HMC/NUTS), not raise
    X, y = data
    rep = BayesianMLP(3, [5, 4], noise=0.2).repriorised()
    pyro.set_rng_seed(0)
    values = {name: site["value"] for name, site in poutine.trace(rep).get_trace(X, y).nodes.items()
              if site["type"] == "sample" and name.startswith("layers")}  # fmt: skip
    huge = {name: value * 1e160 for name, value in values.items()}
    with pyro.validation_enabled(False):  # as Pyro's HMC runs its warm-up
        trace = poutine.trace(poutine.condition(rep, data=huge)).get_trace(X, y)
    assert trace.nodes["readout"]["fn"].log_density == -float("inf")
    assert not torch.isfinite(trace.log_prob_sum())
    with pytest.raises(ValueError, match="X contains NaN"):
        poutine.trace(rep).get_trace(torch.where(X > 2, float("nan"), X), y)


def test_bad_input(data):
    X, y = data
    with pytest.raises(NotImplementedError, match="Gaussian likelihood"):
        BayesianMLP(3, [4], out_dim=3, likelihood="categorical").repriorised()
    with pytest.raises(ValueError, match="training targets"):
        poutine.trace(BayesianMLP(3, [4]).repriorised()).get_trace(X)
    with pytest.raises(ValueError, match=r"X must be \(n, 3\)"):
        poutine.trace(BayesianMLP(3, [4])).get_trace(X[:, :2], y)
    with pytest.raises(ValueError, match=r"y must have shape \(40,\) \(one per row of X\), got \(39,\)"):
        poutine.trace(BayesianMLP(3, [4])).get_trace(X, y[:-1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        poutine.trace(BayesianMLP(3, [4], out_dim=3, likelihood="categorical")).get_trace(X, torch.full((40,), 5))
    with pytest.raises(ValueError, match="widths must be a positive integer"):
        BayesianMLP(3, [0])
    for name, value in (("noise", float("inf")), ("noise", float("nan")), ("weight_scale", 0.0),
                        ("bias_scale", float("nan"))):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
            BayesianMLP(3, [4], **{name: value})
    bnn = BayesianMLP(3, [5], noise=0.1)
    draws = Predictive(bnn, num_samples=3)(X)  # prior draws carry a size-1 dim for the data plate
    draws.pop("y")
    assert Predictive(bnn, draws)(X)["y"].shape == (3, 40)
    with pytest.raises(NotImplementedError, match="parallel=False"):  # was a cryptic reshape error
        Predictive(bnn, draws, parallel=True)(X)


def _prior_draws(model, X, y, num: int) -> dict[str, torch.Tensor]:
    """``num`` draws of the model's latent sites (a stand-in for MCMC samples)."""
    traces = [poutine.trace(model).get_trace(X, y) for _ in range(num)]
    names = [k for k, s in traces[0].nodes.items() if s["type"] == "sample" and not s["is_observed"] and k != "data"]
    return {k: torch.stack([t.nodes[k]["value"] for t in traces]) for k in names}


def test_held_out_targets_are_scored_with_the_training_map(data):
    # audit: Predictive(rep, samples)(X_test, y_test) mapped the readout with the TEST targets and left
    # them as the training data of every later prediction
    X, y = data
    bnn = BayesianMLP(3, [6], noise=0.1)
    rep = bnn.repriorised()
    samples = _prior_draws(rep, X, y, 4)
    X_test = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    y_test = torch.sin(X_test[:, 0])
    sites = ["readout", "y", "_RETURN"]
    new = Predictive(rep, posterior_samples=samples, return_sites=sites)(X_test)
    held_out = Predictive(rep, posterior_samples=samples, return_sites=sites)(X_test, y_test)
    again = Predictive(rep, posterior_samples=samples, return_sites=sites)(X_test)
    assert rep.reparam.training_data[0] is X and rep.reparam.training_data[1] is y
    for i in range(4):  # the readout implied by the training data, whatever the call's data
        draw = {k: v[i] for k, v in samples.items()}
        train = poutine.trace(poutine.condition(rep, data=draw)).get_trace(X, y).nodes["readout"]["value"]
        for pred in (new, held_out, again):
            torch.testing.assert_close(pred["readout"][i].reshape(1, 7), train, rtol=0, atol=0)
        torch.testing.assert_close(held_out["_RETURN"][i].reshape(10, 1), bnn.features(X_test, draw) @ train.T)
    # the held-out log-likelihood per draw and point: N(y_test; f(X_test), 0.1) under the training readout
    idata = to_inference_data(samples, model=rep, model_args=(X_test, y_test))
    expected = dist.Normal(held_out["_RETURN"][..., 0], 0.1**0.5).log_prob(y_test)
    np.testing.assert_allclose(get_group(idata, "log_likelihood")["y"].values[0], expected.numpy(), rtol=1e-10)
    # set_training_data replaces the map's data; equal copies count as the training data
    assert rep.reparam.is_training_data(X.clone(), y.clone()) and not rep.reparam.is_training_data(X, y + 1)
    rep.set_training_data(X_test, y_test)
    moved = Predictive(rep, posterior_samples=samples, return_sites=["readout"])(X)
    assert not torch.allclose(moved["readout"], new["readout"])


@pytest.mark.parametrize("out_dim", [1, 2])
def test_target_shape_is_checked(data, out_dim):
    # audit: y of shape (n, 1) with one output broadcast against the (n,) means into an (n, n) likelihood
    X, y = data
    bnn = BayesianMLP(3, [4], out_dim=out_dim)
    bad = y[:, None] if out_dim == 1 else y
    expected = (40,) if out_dim == 1 else (40, out_dim)
    message = re.escape(f"y must have shape {expected}") + ".*" + re.escape(f"got {tuple(bad.shape)}")
    for model in (bnn, bnn.repriorised()):
        with pytest.raises(ValueError, match=message):
            poutine.trace(model).get_trace(X, bad)
    with pytest.raises(ValueError, match="y must have shape"):
        bnn.repriorised().set_training_data(X, bad)
    with pytest.raises(ValueError, match="integer class labels"):
        poutine.trace(BayesianMLP(3, [4], out_dim=3, likelihood="categorical")).get_trace(X, torch.full((40,), 0.5))


def test_plain_hmc_on_the_repriorised_model(data):
    X, y = data
    rep = BayesianMLP(3, [5], noise=None, parameterization="standard").repriorised()
    # a fixed step size: Pyro's HMC keeps the trajectory length, so adapted small steps would multiply num_steps
    kernel = HMC(rep, step_size=0.05, num_steps=4, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=8, warmup_steps=4, disable_progbar=True)
    mcmc.run(X, y)
    samples = mcmc.get_samples()
    assert samples["readout_whitened"].shape == (8, 6, 1) and samples["layers.0.weight"].shape == (8, 5, 3)
    assert all(torch.isfinite(v).all() for v in samples.values())
    assert len({float(v) for v in samples["noise"]}) > 1  # it moved


def _linear(readout_prior=None, observed=False, likelihood="normal"):
    def model(X, y=None):
        prior = readout_prior or dist.Normal(torch.zeros(1, 4), 1.0).to_event(2)
        theta = pyro.sample("readout", prior, obs=torch.zeros(1, 4) if observed else None)
        f = (torch.cat([X, torch.ones(X.shape[0], 1)], -1) @ theta.T)[:, 0]
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(f, 0.1), obs=y)

    return model


def _features(X):
    return torch.cat([X, torch.ones(X.shape[0], 1)], -1)


def test_reparam_errors(data):
    X, y = data

    def run(model, features=_features, y=y):
        poutine.trace(poutine.reparam(model, {"readout": RepriorisedReadout(features, 0.01)})).get_trace(X, y)

    with pytest.raises(ValueError, match="features have 3 columns; the readout 'readout' expects 4"):
        run(_linear(), features=lambda X: X)
    with pytest.raises(ValueError, match="targets have 2 outputs; the readout 'readout' has 1"):
        run(_linear(), y=torch.stack([y, y], -1))
    with pytest.raises(ValueError, match="needs a zero-mean Normal prior, got Laplace"):
        run(_linear(dist.Laplace(torch.zeros(1, 4), 1.0).to_event(2)))
    with pytest.raises(ValueError, match="needs a zero-mean Normal prior"):
        run(_linear(dist.Normal(torch.ones(1, 4), 1.0).to_event(2)))
    with pytest.raises(ValueError, match="event_dim 2"):
        run(_linear(dist.Normal(torch.zeros(1, 4), 1.0).to_event(1)))
    with pytest.raises(ValueError, match="site 'readout' is observed"):
        run(_linear(observed=True))
    with pytest.raises(ValueError, match="y has shape \\(39,\\)"):
        run(_linear(), y=y[:-1])
    with pytest.raises(ValueError, match="y has dtype torch.int64"):  # class labels: not a Gaussian likelihood
        run(_linear(), y=(y > 0).long())
    with pytest.raises(ValueError, match="contain NaN"):
        RepriorisedReadout(_features, 0.01).set_training_data(X, torch.full_like(y, float("nan")))
    # a categorical BayesianMLP: refused when the reparam is built, not with a shape message
    classifier = BayesianMLP(3, [4], out_dim=2, likelihood="categorical")
    with pytest.raises(NotImplementedError, match="likelihood is 'categorical'"):
        RepriorisedReadout(classifier.current_features, classifier.current_noise)


def test_a_non_positive_noise_is_refused_and_an_underflowing_one_has_zero_density(data):
    """A fixed noise of -0.1 gave a finite map (dual form) or NaN (primal form); a latent noise that over-
    or underflows at an extreme proposal must be rejected by the sampler, not raise."""
    X, y = data
    Phi = torch.randn(5, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise variance must be positive and finite"):
        readout_map(Phi, y[:5, None], torch.tensor(-0.1), torch.zeros(11, 1))
    bnn = BayesianMLP(3, [4], noise=0.2)
    for bad in (-0.1, 0.0, float("inf")):
        with pytest.raises(ValueError, match="noise variance must be positive and finite"):
            RepriorisedReadout(bnn.features, noise=bad)
    latent = BayesianMLP(3, [4], noise=None).repriorised()
    pyro.set_rng_seed(0)
    values = {name: site["value"] for name, site in poutine.trace(latent).get_trace(X, y).nodes.items()
              if site["type"] == "sample" and not site["is_observed"]}  # fmt: skip
    for extreme in (0.0, float("inf")):
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(latent, data={**values, "noise": torch.tensor(extreme)})).get_trace(
                X, y
            )
        assert trace.nodes["readout"]["fn"].log_density == -float("inf")


@pytest.mark.parametrize("n", [3, 8], ids=["dual", "primal"])
def test_readout_map_names_mismatched_shapes(float64, n):
    """y with 2 columns and whitened with 1 gave a (D, 2) theta and a log-determinant for one output."""
    Phi, lam = torch.randn(n, 5), torch.tensor(0.5)
    y, phi = torch.randn(n, 1), torch.randn(5, 1)
    with pytest.raises(ValueError, match=rf"y must have shape \({n}, 1\)"):
        readout_map(Phi, torch.randn(n, 2), lam, phi)
    with pytest.raises(ValueError, match=r"y must have shape"):
        readout_map(Phi, torch.randn(n + 1, 1), lam, phi)
    with pytest.raises(ValueError, match=r"whitened must have shape \(5, d_out\)"):
        readout_map(Phi, y, lam, torch.randn(4, 1))
    with pytest.raises(ValueError, match="y contains NaN"):
        readout_map(Phi, torch.full((n, 1), math.nan), lam, phi)
