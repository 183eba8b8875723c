"""The collapsed BNN: the readout's marginal likelihood against dense Gaussians, the identity with the
repriorised density, exact readout draws for prediction, and NUTS on the marginal posterior."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import MCMC, NUTS, Predictive

from pyro_gpx.bnn import BayesianMLP, GaussianLinearMarginal, NoiseGrid
from pyro_gpx.bnn.marginal import _TrajectoryMarginal
from pyro_gpx.diagnostics import to_inference_data


@pytest.mark.parametrize("n, D", [(30, 4), (5, 12), (6, 6)], ids=["primal", "dual", "square"])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_marginal_equals_dense_gaussian_and_gradients_match(float64, n, D, out_dim):
    gen = torch.Generator().manual_seed(1)
    Phi = torch.randn(n, D, generator=gen)
    noise = torch.tensor(0.3)
    y = torch.randn((n,) if out_dim is None else (n, out_dim), generator=gen)
    exact = dist.MultivariateNormal(torch.zeros(n), Phi @ Phi.T + noise * torch.eye(n))
    expected = exact.log_prob(y if out_dim is None else y.T).sum()
    marginal = GaussianLinearMarginal(Phi, noise, out_dim)
    assert float(marginal.log_prob(y)) == pytest.approx(float(expected), rel=1e-12)
    inputs = (Phi.clone().requires_grad_(), noise.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda P, s: GaussianLinearMarginal(P, s, out_dim).log_prob(y), inputs)


def test_marginal_samples_have_the_marginal_covariance(float64):
    gen = torch.Generator().manual_seed(2)
    Phi = torch.randn(4, 3, generator=gen)
    torch.manual_seed(0)
    draws = GaussianLinearMarginal(Phi, 0.5).sample((40000,))
    cov = torch.cov(draws.T)
    target = Phi @ Phi.T + 0.5 * torch.eye(4)
    # entrywise Monte Carlo s.e. of a covariance is sqrt((S_ii S_jj + S_ij^2) / N)
    se = ((target.diagonal()[:, None] * target.diagonal()[None] + target**2) / 40000).sqrt()
    assert ((cov - target).abs() / se).max() < 4.5


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("out_dim", [1, 2])
def test_collapsed_density_is_the_repriorised_density_without_phi(data, parameterization, out_dim):
    # in repriorised coordinates the joint is p(W, noise | y) N(phi; 0, I): dropping phi's standard normal
    # density leaves exactly the collapsed model's density at the same hidden weights and noise
    X, y = data
    y = y if out_dim == 1 else torch.stack([y, y.square()], -1)
    bnn = BayesianMLP(3, [7], out_dim=out_dim, parameterization=parameterization, noise=None)
    pyro.set_rng_seed(3)
    rep_trace = poutine.trace(bnn.repriorised()).get_trace(X, y)
    values = {k: s["value"] for k, s in rep_trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and k != "data"}  # fmt: skip
    phi = values.pop("readout_whitened")
    collapsed_trace = poutine.trace(poutine.condition(bnn.collapsed(), data=values)).get_trace(X, y)
    expected = rep_trace.log_prob_sum() - dist.Normal(0.0, 1.0).log_prob(phi).sum()
    assert float(collapsed_trace.log_prob_sum()) == pytest.approx(float(expected), rel=1e-10)
    sampled = {k for k, s in collapsed_trace.nodes.items() if s["type"] == "sample" and k not in ("data", "y")}
    assert sampled == set(values)  # no readout site: the sampler sees the hidden weights and noise only


def test_prediction_draws_the_exact_conditional_readout(data):
    X, y = data
    bnn = BayesianMLP(3, [3], noise=0.1, parameterization="standard")
    model = bnn.collapsed()
    pyro.set_rng_seed(4)
    hidden = {k: s["value"] for k, s in poutine.trace(bnn).get_trace(X).nodes.items() if k.startswith("layers")}
    model.set_training_data(X, y)
    N = 4000
    samples = {k: v.expand((N,) + v.shape) for k, v in hidden.items()}
    readout = Predictive(model, samples, return_sites=["readout"])(X[:5])["readout"].reshape(N, -1)
    # closed form: theta = s * theta~, theta~ | W ~ N(G^{-1} Phi~^T y, noise G^{-1})
    s = bnn.readout_prior_scale()
    Phi = bnn.features(X, hidden) * s
    G = Phi.T @ Phi + 0.1 * torch.eye(4)
    mean = s * torch.linalg.solve(G, Phi.T @ y)
    cov = 0.1 * torch.linalg.inv(G) * s[:, None] * s[None]
    se = (cov.diagonal() / N).sqrt()
    assert ((readout.mean(0) - mean).abs() / se).max() < 4.5
    torch.testing.assert_close(torch.cov(readout.T), cov, rtol=0.1, atol=0.1 * float(cov.diagonal().min()))


def test_nuts_on_the_noise_of_a_linear_model_matches_quadrature(data):
    # no hidden layers: the only latent is the noise, whose exact posterior is p(noise) N(y; 0, Phi Phi^T + noise I)
    X, y = data
    bnn = BayesianMLP(3, [], noise=None)
    model = bnn.collapsed()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=1500, warmup_steps=300, disable_progbar=True)
    mcmc.run(X, y)
    draws = mcmc.get_samples()["noise"].log()
    grid = torch.linspace(math.log(1e-3), math.log(1.0), 3001)
    Phi = bnn.features(X, {})
    logp = torch.stack([bnn.noise_prior.log_prob(g.exp()) + g + GaussianLinearMarginal(Phi, g.exp()).log_prob(y)
                        for g in grid])  # fmt: skip  # density of log(noise): the prior's Jacobian is + g
    w = torch.softmax(logp, 0)
    mean = float((w * grid).sum())
    sd = float((w * (grid - mean) ** 2).sum().sqrt())
    ess = float(np.asarray(pyro.ops.stats.effective_sample_size(draws[None])))
    assert abs(float(draws.mean()) - mean) < 4 * sd / math.sqrt(ess)
    assert float(draws.std()) == pytest.approx(sd, rel=0.15)


def test_bad_input(data):
    X, y = data
    with pytest.raises(NotImplementedError, match="Gaussian likelihood"):
        BayesianMLP(3, [4], out_dim=3, likelihood="categorical").collapsed()
    with pytest.raises(ValueError, match=r"y must have shape \(40,\)"):
        poutine.trace(BayesianMLP(3, [4]).collapsed()).get_trace(X, y[:-1])
    with pytest.raises(ValueError, match="training targets"):
        poutine.trace(BayesianMLP(3, [4]).collapsed()).get_trace(X)
    with pytest.raises(ValueError, match="y contains NaN"):
        poutine.trace(BayesianMLP(3, [4]).collapsed()).get_trace(X, torch.full((40,), float("nan")))
    with pytest.raises(ValueError, match=r"value must have shape \(40,\)"):
        GaussianLinearMarginal(torch.randn(40, 3), 0.1).log_prob(torch.randn(39))
    with pytest.raises(ValueError, match="noise"):
        GaussianLinearMarginal(torch.randn(40, 3), -0.1, validate_args=True)


@pytest.mark.parametrize("integrate_noise", [False, True])
def test_posterior_predictive_export_is_refused(data, integrate_noise):
    # the observed site integrates the readout out: its draws would use the readout's prior
    X, y = data
    model = BayesianMLP(3, [4], noise=None).collapsed(integrate_noise=integrate_noise)
    trace = poutine.trace(model).get_trace(X, y)
    draws = {name: site["value"].detach()[None].expand(3, *site["value"].shape)
             for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]}  # fmt: skip
    to_inference_data(draws, model=model, model_args=(X, y))  # the log-likelihood export works
    with pytest.raises(ValueError, match=r"\['y'\] integrate latents out"):
        to_inference_data(draws, model=model, model_args=(X, y), posterior_predictive=True)


def test_readout_draws_are_the_exact_conditional_and_match_predictive(data):
    X, y = data
    bnn = BayesianMLP(3, [3], noise=None, parameterization="standard")
    model = bnn.collapsed()
    model.set_training_data(X, y)
    pyro.set_rng_seed(5)
    trace = poutine.trace(bnn).get_trace(X)
    hidden = {k: s["value"] for k, s in trace.nodes.items() if k.startswith("layers") or k == "noise"}
    N = 4000
    samples = {k: v.expand((2, N // 2) + v.shape) for k, v in hidden.items()}  # (chain, draw, ...)
    readout = model.readout_draws(samples, torch.Generator().manual_seed(0))
    assert readout.shape == (2, N // 2, 1, 4)
    s, noise = bnn.readout_prior_scale(), hidden["noise"]
    Phi = bnn.features(X, hidden) * s
    G = Phi.T @ Phi + noise * torch.eye(4)
    mean = s * torch.linalg.solve(G, Phi.T @ y)
    cov = noise * torch.linalg.inv(G) * s[:, None] * s[None]
    flat = readout.reshape(N, 4)
    assert ((flat.mean(0) - mean).abs() / (cov.diagonal() / N).sqrt()).max() < 4.5
    torch.testing.assert_close(torch.cov(flat.T), cov, rtol=0.1, atol=0.1 * float(cov.diagonal().min()))
    with pytest.raises(ValueError, match=r"samples lack the sites \['noise'\]"):
        model.readout_draws({k: v for k, v in samples.items() if k != "noise"})


def test_training_data_are_fixed_by_the_first_call_with_targets(data):
    # audit: every call with targets replaced the training data, so scoring test data re-conditioned
    # all later predictions on them
    X, y = data
    model = BayesianMLP(3, [4], noise=0.1).collapsed()
    poutine.trace(model).get_trace(X, y)
    poutine.trace(model).get_trace(X.clone(), y.clone())  # equal values are the training data
    with pytest.raises(ValueError, match="targets other than its training data.*set_training_data"):
        poutine.trace(model).get_trace(X[:10], y[:10])
    assert model.repriorised.reparam.training_data[0] is X
    model.set_training_data(X[:10], y[:10])  # sampling on new data: replace them first
    poutine.trace(model).get_trace(X[:10], y[:10])
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):
        model.set_training_data(X[:10], y[:10, None])


@pytest.mark.parametrize("kind", ["collapsed", "repriorised"])
def test_training_data_taken_from_an_evaluation_warn(data, kind):
    """A model rebuilt to score reloaded draws on held-out data took the held-out targets as its training
    data, silently (per-point log-likelihoods 0.9 nats off): a first call with targets and no gradients warns."""
    X, y = data
    bnn = BayesianMLP(3, [4], noise=0.1)
    model = bnn.collapsed() if kind == "collapsed" else bnn.repriorised()
    with torch.no_grad(), pytest.warns(UserWarning, match="takes its training data from this first call"):
        poutine.trace(model).get_trace(X[:10], y[:10])
    model.set_training_data(X, y)  # the documented fix: no warning, and the data are replaced
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        poutine.trace(model).get_trace(X, y)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: GaussianLinearMarginal(torch.full((4, 2), float("nan")), 0.1), ValueError, "features"),
        (lambda: GaussianLinearMarginal(torch.ones(4, 2, dtype=torch.int64), 0.1), TypeError, "features"),
        (lambda: GaussianLinearMarginal(torch.randn(4, 2), 0.1, out_dim=2.5), ValueError, "out_dim"),
        (lambda: GaussianLinearMarginal(torch.randn(4, 2), True), ValueError, "noise"),
        (lambda: NoiseGrid(torch.zeros(3), torch.zeros(3), float("nan")), ValueError, "spacing"),
        (lambda: NoiseGrid(torch.zeros(3), torch.zeros(3), -0.1), ValueError, "spacing"),
    ],
)
def test_marginal_and_grid_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_overflowing_features_in_a_sampler_have_zero_density():
    # the collapsed model's marginal: an unstable leapfrog trajectory is rejected, not an error
    marginal = _TrajectoryMarginal(torch.full((4, 2), float("inf")), torch.tensor(0.1))
    assert marginal.log_prob(torch.zeros(4)) == -math.inf
