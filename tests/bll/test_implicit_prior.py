"""Implicit prior W = A z with the diffusion guide: the Gaussian prior N(0, A A^T) in disguise."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_gpx.bll import BayesianLastLayer, GaussianHead, ImplicitWeightPrior, predict
from pyro_gpx.diffusion import AutoDiffusion, PathELBO

NOISE = 0.1


@pytest.fixture
def problem(float64):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 2, generator=gen)
    y = 0.8 * X[:, 0] - 0.5 * X[:, 1] + 0.3 + math.sqrt(NOISE) * torch.randn(30, generator=gen)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.0, 0.3, 0.6]])
    generator = nn.Linear(3, 3, bias=False)
    generator.weight.data.copy_(A)
    prior = ImplicitWeightPrior(generator, latent_dim=3, learn_generator=False)
    model = BayesianLastLayer(None, 2, GaussianHead(NOISE, learn_noise=False), prior)
    Phi = torch.cat([X, torch.ones(30, 1)], -1)
    prior_cov = A @ A.T
    cov = torch.linalg.inv(Phi.T @ Phi / NOISE + torch.linalg.inv(prior_cov))
    mean = cov @ Phi.T @ y / NOISE
    log_z = torch.distributions.MultivariateNormal(torch.zeros(30), Phi @ prior_cov @ Phi.T + NOISE * torch.eye(30))
    return model, X, y, mean, cov, float(log_z.log_prob(y))


def test_weights_are_generated_and_recorded(problem):
    model, X, y, *_ = problem
    trace = pyro.poutine.trace(model).get_trace(X, y)
    z = trace.nodes["weights_latent"]["value"]
    W = trace.nodes["weights"]["value"]
    assert W.shape == (1, 3)
    torch.testing.assert_close(W[0], model.prior.generator(z))


def test_parallel_predictive_with_the_diffusion_guide(problem):
    model, X, y, *_ = problem
    guide = AutoDiffusion(model, num_steps=4, hidden=8, use_score=False)
    guide(X, y)
    out = pyro.infer.Predictive(model, guide=guide, num_samples=5, parallel=True)(X[:4])
    assert out["weights"].shape == (5, 1, 1, 3) and out["f"].shape == (5, 4, 1) and out["y"].shape == (5, 4)
    Phi = torch.cat([X[:4], torch.ones(4, 1)], -1)
    torch.testing.assert_close(out["f"], Phi @ out["weights"][:, 0].mT)


def test_diffusion_posterior_matches_the_closed_form(problem):
    model, X, y, mean, cov, log_z = problem
    # the posterior is ~10x narrower than the prior: start the affine frame narrow
    guide = AutoDiffusion(model, process="dds", num_steps=16, hidden=32, sigma=1.0, init_scale=0.1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), PathELBO(num_paths=64))
    for _ in range(300):
        svi.step(X, y)
    with torch.no_grad():
        estimate = guide.log_normalizer(4000, X, y)
    assert estimate["elbo"] <= log_z + 0.02
    assert estimate["log_z"] == pytest.approx(log_z, abs=0.05)
    X_new = torch.randn(6, 2, generator=torch.Generator().manual_seed(9))
    Phi_new = torch.cat([X_new, torch.ones(6, 1)], -1)
    out = predict(model, guide, X_new, num_samples=4000, train=(X, y))
    exact_mean = Phi_new @ mean
    exact_sd = (Phi_new @ cov * Phi_new).sum(-1).sqrt()
    # within Monte Carlo error plus a small training bias, relative to the posterior spread
    assert ((out["mean"] - exact_mean).abs() < 0.25 * exact_sd + 4 * exact_sd / math.sqrt(4000)).all()
    f_sd = out["f"][..., 0].std(0)
    assert ((f_sd / exact_sd - 1).abs() < 0.25).all()


def test_model_parameters_learn_through_the_path_elbo(float64):
    X, y = torch.randn(20, 3), torch.randn(20)
    features = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    model = BayesianLastLayer(features, 4, GaussianHead(0.5), ImplicitWeightPrior.mlp(5, latent_dim=2, hidden=8))
    guide = AutoDiffusion(model, num_steps=4, hidden=8)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), PathELBO(num_paths=8))
    svi.step(X, y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    svi.step(X, y)
    for name in ("features.0.weight", "prior.generator.0.weight", "head.noise"):
        assert not torch.equal(pyro.param(name).detach(), before[name]), name


def test_generator_mlp_starts_centred_at_unit_scale(float64):
    from pyro_gpx.bll import generator_mlp

    torch.manual_seed(0)
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        centred, raw = generator_mlp(16, 51, center=True)(z), generator_mlp(16, 51)(z)
    # each weight's prior mean is ~0 (Monte Carlo error of the 256 probe draws), not ~0.5
    assert centred.mean(0).abs().max() < 0.25 < raw.mean(0).abs().mean()
    assert centred.std() == pytest.approx(1.0, abs=0.1)


def test_fixed_generator_with_learned_scale(float64):
    X, y = torch.randn(20, 3), torch.randn(20)
    prior = ImplicitWeightPrior.mlp(5, latent_dim=2, hidden=8, learn_generator=False, scale=0.5, learn_scale=True)
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.5), prior)
    trace = pyro.poutine.trace(model).get_trace(X, y)
    z, W = trace.nodes["weights_latent"]["value"], trace.nodes["weights"]["value"]
    torch.testing.assert_close(W[0], 0.5 * model.prior.generator(z))
    guide = AutoDiffusion(model, num_steps=4, hidden=8)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), PathELBO(num_paths=8))
    svi.step(X, y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    svi.step(X, y)
    assert not torch.equal(pyro.param("prior.scale").detach(), before["prior.scale"])
    assert not any(k.startswith("prior.generator") for k in before)  # the generator is not a Pyro parameter
    with pytest.raises(ValueError, match="scale"):
        ImplicitWeightPrior.mlp(5, latent_dim=2, scale=0.0)
