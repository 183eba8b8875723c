"""The noise-integrated readout marginal: the trapezoid grid against adaptive quadrature, closed-form
gradients against autograd of a dense implementation (also at repeated eigenvalues), exact noise draws,
and the collapsed model without a noise coordinate against the one with it."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from scipy import integrate

from pyro_gpx.bnn import BayesianMLP, NoiseGrid, NoiseIntegratedMarginal, run_chains
from pyro_gpx.bnn.marginal import GaussianLinearMarginal

PRIOR = dist.LogNormal(torch.tensor(math.log(0.3), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))


def _problem(n, D, out_dim, seed=1):
    gen = torch.Generator().manual_seed(seed)
    Phi = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = torch.randn((n,) if out_dim is None else (n, out_dim), generator=gen, dtype=torch.float64)
    return Phi, y


def _joint(Phi, y, out_dim, lam):
    """log p(lambda) + log prod_j N(y_j; 0, Phi Phi^T + lambda I), dense."""
    lam = torch.tensor(lam)
    return float(PRIOR.log_prob(lam) + GaussianLinearMarginal(Phi, lam, out_dim).log_prob(y))


@pytest.mark.parametrize("n, D", [(12, 4), (5, 9)], ids=["n>D", "n<D"])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_log_prob_equals_adaptive_quadrature(float64, n, D, out_dim):
    Phi, y = _problem(n, D, out_dim)
    d = 1 if out_dim is None else out_dim
    grid = NoiseGrid.from_prior(PRIOR, n * d)
    value = float(NoiseIntegratedMarginal(Phi, grid, out_dim).log_prob(y))
    # scipy's adaptive quadrature over u = log(lambda), scaled by the density at the mode
    us = torch.linspace(-12, 6, 2001).tolist()
    peak = max(_joint(Phi, y, out_dim, math.exp(u)) + u for u in us)
    f = lambda u: math.exp(_joint(Phi, y, out_dim, math.exp(u)) + u - peak)  # noqa: E731
    area, err = integrate.quad(f, -30, 15, limit=500, epsabs=0, epsrel=1e-13)
    assert value == pytest.approx(peak + math.log(area), abs=1e-8)  # the grid leaves 1e-9 of prior mass per tail


@pytest.mark.parametrize("n, D", [(12, 4), (5, 9), (8, 8)], ids=["n>D", "n<D", "square"])
@pytest.mark.parametrize("out_dim", [None, 2])
def test_gradients_match_autograd_of_the_dense_sum(float64, n, D, out_dim):
    # the closed-form gradient (from resolvents) against autograd through dense Cholesky log-densities at
    # every node; n > D gives K n - D repeated zero eigenvalues, where eigenvector derivatives blow up
    Phi, y = _problem(n, D, out_dim, seed=2)
    d = 1 if out_dim is None else out_dim
    grid = NoiseGrid.from_prior(PRIOR, n * d, spacing=0.05)

    def dense(P):
        ell = torch.stack([GaussianLinearMarginal(P, lam, out_dim).log_prob(y) for lam in grid.nodes.exp()])
        return torch.logsumexp(ell + grid.log_weights, 0)

    P1 = Phi.clone().requires_grad_()
    P2 = Phi.clone().requires_grad_()
    ours = NoiseIntegratedMarginal(P1, grid, out_dim).log_prob(y)
    ref = dense(P2)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-11)
    (g1,) = torch.autograd.grad(ours, P1)
    (g2,) = torch.autograd.grad(ref, P2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    Y = y.clone().requires_grad_()
    small = NoiseGrid.from_prior(PRIOR, n * d, spacing=0.2)  # gradcheck: few nodes, Phi and y together
    assert torch.autograd.gradcheck(lambda P, t: NoiseIntegratedMarginal(P, small, out_dim).log_prob(t), (P1, Y))


def test_grid_covers_the_prior_and_other_priors(float64):
    grid = NoiseGrid.from_prior(PRIOR, 100)
    assert float(grid.log_weights.exp().sum()) == pytest.approx(1.0, abs=1e-8)  # trapezoid of the prior itself
    assert grid.spacing == pytest.approx(0.25 * math.sqrt(2 / 100))
    gamma = NoiseGrid.from_prior(dist.InverseGamma(torch.tensor(2.0), torch.tensor(1.0)), 50)  # no icdf: draws
    assert float(gamma.log_weights.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_obs"):
        NoiseGrid.from_prior(PRIOR, 0)
    with pytest.raises(ValueError, match="spacing"):
        NoiseGrid.from_prior(PRIOR, 10, spacing=-1.0)


def test_noise_draws_have_the_conditional_moments(float64):
    Phi, y = _problem(30, 5, None, seed=3)
    y = Phi @ torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5 * y
    grid = NoiseGrid.from_prior(PRIOR, 30)
    gen = torch.Generator().manual_seed(0)
    u = grid.sample(Phi, y[:, None], gen, sample_shape=(20000,)).log()
    p = grid.log_posterior(Phi, y[:, None]).exp()
    mean = float((p * grid.nodes).sum())
    sd = float((p * (grid.nodes - mean) ** 2).sum().sqrt())
    assert abs(float(u.mean()) - mean) < 4 * sd / math.sqrt(20000)
    assert float(u.std()) == pytest.approx(sd, rel=0.025)  # s.e. of an sd from 20 000 draws: 0.5%


def test_collapsed_model_without_noise_coordinate_is_the_integral_of_the_one_with_it(data):
    X, y = data
    bnn = BayesianMLP(3, [6], noise=None, noise_prior=PRIOR)
    integrated, latent = bnn.collapsed(integrate_noise=True), bnn.collapsed()
    pyro.set_rng_seed(0)
    trace = poutine.trace(integrated).get_trace(X, y)
    hidden = {k: s["value"] for k, s in trace.nodes.items() if s["type"] == "sample" and k.startswith("layers")}
    assert {k for k, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]} == set(hidden)

    def latent_log_density(u):  # log p(W, noise = e^u, y) + u, from the model with the noise coordinate
        model = poutine.condition(latent, data={**hidden, "noise": torch.tensor(math.exp(u))})
        return float(poutine.trace(model).get_trace(X, y).log_prob_sum()) + u

    peak = max(latent_log_density(u) for u in torch.linspace(-10, 3, 131).tolist())
    area, _ = integrate.quad(lambda u: math.exp(latent_log_density(u) - peak), -25, 10, limit=400, epsrel=1e-12)
    assert float(trace.log_prob_sum()) == pytest.approx(peak + math.log(area), abs=1e-8)


def test_a_float32_collapsed_model_integrates_the_noise_in_float32(data):
    X, y = (t.float() for t in data)
    bnn = BayesianMLP(3, [6], noise=None, noise_prior=dist.LogNormal(math.log(0.1), 1.0), dtype=torch.float32)
    model = bnn.collapsed(integrate_noise=True)
    with torch.random.fork_rng():
        trace = poutine.trace(model).get_trace(X, y)
    trace.compute_log_prob()
    assert trace.nodes["y"]["log_prob_sum"].dtype == torch.float32  # it was float64, then NUTS failed
    hidden = {k: s["value"].detach().requires_grad_(True) for k, s in trace.nodes.items() if k.startswith("layers")}
    log_prob = poutine.trace(poutine.condition(model, data=hidden)).get_trace(X, y).log_prob_sum()
    grads = torch.autograd.grad(log_prob, list(hidden.values()))  # the backward pass mixed float32 and float64
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_split_hmc_run_then_noise_and_readout_draws(data):
    X, y = data
    bnn = BayesianMLP(3, [8], noise=None)
    model = bnn.collapsed(integrate_noise=True)
    result = run_chains(model, (X, y), num_chains=2, num_samples=10, warmup_steps=20, kernel="split_hmc",
                        kernel_kwargs={"trajectory_length": 1.5}, processes=1, progress=False)  # fmt: skip
    samples = dict(result.samples)
    assert "noise" not in samples
    with pytest.raises(ValueError, match="noise_draws"):
        model.readout_draws(samples)
    samples["noise"] = model.noise_draws(samples, torch.Generator().manual_seed(0))
    assert samples["noise"].shape == (2, 10) and bool((samples["noise"] > 0).all())
    readout = model.readout_draws(samples, torch.Generator().manual_seed(1))
    assert readout.shape == (2, 10, 1, 9) and bool(torch.isfinite(readout).all())
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
    without_noise = {k: v for k, v in flat.items() if k != "noise"}
    with pytest.raises(ValueError, match="not 'noise'"):  # else the noise would come from its prior
        pyro.infer.Predictive(model, without_noise, return_sites=["y"])(X[:5])
    f = pyro.infer.Predictive(model, flat, return_sites=["y"])(X[:5])["y"]
    assert f.shape == (20, 5) and bool(torch.isfinite(f).all())


def test_bad_input(data):
    X, y = data
    with pytest.raises(ValueError, match="latent noise"):
        BayesianMLP(3, [4], noise=0.1).collapsed(integrate_noise=True)
    with pytest.raises(ValueError, match="nothing to sample"):
        BayesianMLP(3, [], noise=None).collapsed(integrate_noise=True)
    with pytest.raises(ValueError, match="coordinate of the chains"):
        BayesianMLP(3, [4], noise=None).collapsed().noise_draws({})
    Phi, _ = _problem(5, 3, None)
    marginal = NoiseIntegratedMarginal(Phi, NoiseGrid.from_prior(PRIOR, 5))
    with pytest.raises(ValueError, match="shape"):
        marginal.log_prob(torch.zeros(4, dtype=torch.float64))


def test_a_prior_narrower_than_the_data_spacing_gets_its_own_nodes(float64):
    """The default spacing follows the data alone: a prior with sd 0.01 in log noise got 4 nodes, and
    log p(y | W) was 0.07 off adaptive quadrature (the noise draws' sd 0.77 times the exact one)."""
    prior = dist.LogNormal(torch.tensor(math.log(0.1)), torch.tensor(0.01))
    Phi, _ = _problem(50, 4, None)
    gen = torch.Generator().manual_seed(2)  # targets from the model at noise 0.1: inside the prior's range
    y = Phi @ torch.randn(4, generator=gen, dtype=torch.float64) + 0.1**0.5 * torch.randn(50, generator=gen)
    grid = NoiseGrid.from_prior(prior, 50)
    assert len(grid.nodes) >= 64
    value = float(NoiseIntegratedMarginal(Phi, grid, None).log_prob(y))

    def log_joint(u):
        lam = torch.tensor(math.exp(u))
        return float(prior.log_prob(lam) + GaussianLinearMarginal(Phi, lam, None).log_prob(y)) + u

    centre = math.log(0.1)
    peak = max(log_joint(centre + 0.001 * k) for k in range(-100, 101))
    area, _ = integrate.quad(lambda u: math.exp(log_joint(u) - peak), centre - 0.2, centre + 0.2, epsrel=1e-12)
    assert value == pytest.approx(peak + math.log(area), abs=1e-8)
    with pytest.raises(ValueError, match="noise prior must be a distribution on \\(0, inf\\)"):
        NoiseGrid.from_prior(dist.Normal(torch.tensor(0.0), torch.tensor(1.0)), 10)  # was 'cannot convert NaN'


def test_direct_use_refuses_a_coarse_grid_nan_targets_and_no_data(float64):
    """A grid built for 20 targets on 2000 was 1e-2 off quadrature, one for 1 target 0.36 nats off,
    silently; NaN targets gave a NaN density; no data a reshape error."""
    Phi, y = _problem(2000, 3, None)
    with pytest.raises(ValueError, match="too coarse for 2000 targets"):
        NoiseIntegratedMarginal(Phi, NoiseGrid.from_prior(PRIOR, 20))
    marginal = NoiseIntegratedMarginal(Phi[:20], NoiseGrid.from_prior(PRIOR, 20))
    for d in (marginal, GaussianLinearMarginal(Phi[:20], torch.tensor(0.3))):
        with pytest.raises(ValueError, match="targets.*NaN"):
            d.log_prob(torch.full((20,), math.nan))
        with pytest.raises(ValueError, match="at least one row"):
            type(d)(Phi[:0], *((NoiseGrid.from_prior(PRIOR, 1),) if d is marginal else (torch.tensor(0.3),)))
    with pytest.raises(ValueError, match="noise must be positive"), pyro.validation_enabled(False):
        GaussianLinearMarginal(Phi[:20], torch.tensor(-0.3))
