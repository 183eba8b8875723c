"""Gaussian-prior last layer: the deterministic ELBO against closed-form Bayesian linear regression."""

import math

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI
from pyro.poutine.messenger import Messenger

from pyro_gpx.bll import BayesianLastLayer, GaussianHead, GaussianWeightPrior, LastLayerELBO, LastLayerNormal, predict

NOISE, PRIOR = 0.09, 0.8


@pytest.fixture
def problem(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=gen)
    y = 0.7 * X[:, 0] - 0.3 * X[:, 1] + 0.2 + math.sqrt(NOISE) * torch.randn(40, generator=gen)
    model = BayesianLastLayer(None, 2, GaussianHead(NOISE, learn_noise=False), GaussianWeightPrior(PRIOR))
    Phi = torch.cat([X, torch.ones(40, 1)], -1)
    precision = Phi.T @ Phi / NOISE + torch.eye(3) / PRIOR**2
    cov = torch.linalg.inv(precision)
    mean = cov @ Phi.T @ y / NOISE
    K = PRIOR**2 * Phi @ Phi.T + NOISE * torch.eye(40)
    log_z = torch.distributions.MultivariateNormal(torch.zeros(40), K).log_prob(y)
    return model, X, y, mean, cov, log_z


def test_elbo_equals_log_evidence_at_the_exact_posterior(problem):
    model, X, y, mean, cov, log_z = problem
    guide = LastLayerNormal(model)
    guide.loc = mean[None].clone()
    guide.scale_tril = torch.linalg.cholesky(cov)[None].clone()
    elbo = LastLayerELBO().differentiable_elbo(model, guide, X, y)
    assert float(elbo.detach()) == pytest.approx(float(log_z), rel=1e-10)
    # and the exact posterior is a stationary point (gradients in the unconstrained parameters)
    grads = torch.autograd.grad(elbo, [p for _, p in pyro.get_param_store().named_parameters()])
    assert max(float(g.abs().max()) for g in grads) < 1e-8


def test_elbo_is_a_lower_bound_and_svi_reaches_the_posterior(problem):
    model, X, y, mean, cov, log_z = problem
    guide = LastLayerNormal(model, init_scale=0.5)
    loss = LastLayerELBO()
    assert -loss.loss(model, guide, X, y) < float(log_z)
    svi = SVI(
        model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), loss
    )  # deterministic: decay to converge
    for _ in range(1000):
        svi.step(X, y)
    torch.testing.assert_close(pyro.param("loc")[0].detach(), mean, atol=1e-3, rtol=0)
    S = pyro.param("scale_tril")[0].detach()
    torch.testing.assert_close(S @ S.T, cov, atol=1e-4, rtol=0)
    assert -loss.loss(model, guide, X, y) == pytest.approx(float(log_z), abs=1e-4)


def test_minibatch_scaling(problem):
    model, X, y, *_ = problem
    guide = LastLayerNormal(model, init_scale=0.3)
    loss = LastLayerELBO()
    full = loss.differentiable_elbo(model, guide, X, y)
    halves = [loss.differentiable_elbo(model, guide, X[i : i + 20], y[i : i + 20], num_data=40) for i in (0, 20)]
    # each half scales its likelihood by 2: the average of the two is the full-data ELBO
    assert float(sum(halves).detach() / 2) == pytest.approx(float(full.detach()), rel=1e-12)


def test_tempering_and_masks_weigh_the_terms_as_trace_elbo_does(problem):
    model, X, y, mean, cov, log_z = problem
    guide = LastLayerNormal(model, init_scale=0.3)
    loss = LastLayerELBO()
    plain = loss.differentiable_elbo(model, guide, X, y)
    entropy = guide.distribution().entropy().sum()
    # poutine.scale(model, s): s E[log p(y, w)] + H(q), whose optimum is the tempered posterior
    tempered = loss.differentiable_elbo(pyro.poutine.scale(model, scale=0.5), guide, X, y)
    torch.testing.assert_close(tempered, 0.5 * (plain - entropy) + entropy, rtol=1e-12, atol=1e-12)
    # everything of the model masked out: only the guide's entropy is left
    nothing = loss.differentiable_elbo(pyro.poutine.mask(model, mask=torch.tensor(False)), guide, X, y)
    torch.testing.assert_close(nothing, entropy, rtol=1e-12, atol=1e-12)
    # masked observations (a mask on site "y" only): the ELBO of the kept points alone
    keep = torch.arange(40) % 3 != 0

    class MaskObservations(Messenger):
        def _pyro_sample(self, msg):
            if msg["name"] == "y":
                msg["mask"] = keep

    def masked(X, y):
        with MaskObservations():
            return model(X, y)

    kept = loss.differentiable_elbo(model, guide, X[keep], y[keep])
    torch.testing.assert_close(loss.differentiable_elbo(masked, guide, X, y), kept, rtol=1e-12, atol=1e-12)


def test_nuts_over_the_last_layer_matches_the_closed_form(problem):
    model, X, y, mean, cov, _ = problem
    mcmc = MCMC(NUTS(model), num_samples=400, warmup_steps=200, disable_progbar=True)
    mcmc.run(X, y)
    W = mcmc.get_samples()["weights"].reshape(400, 3)
    se = cov.diagonal().sqrt() / math.sqrt(400)
    assert ((W.mean(0) - mean).abs() < 5 * se).all()
    out = predict(model, mcmc.get_samples(), X[:5])
    Phi = torch.cat([X[:5], torch.ones(5, 1)], -1)
    exact_var = (Phi @ cov * Phi).sum(-1) + NOISE
    torch.testing.assert_close(out["var"], exact_var, rtol=0.25, atol=0)


def test_predict_from_the_gaussian_guide(problem):
    model, X, y, mean, cov, _ = problem
    guide = LastLayerNormal(model)
    guide.loc = mean[None].clone()
    guide.scale_tril = torch.linalg.cholesky(cov)[None].clone()
    out = predict(model, guide, X[:5], num_samples=20000)
    Phi = torch.cat([X[:5], torch.ones(5, 1)], -1)
    torch.testing.assert_close(out["mean"], Phi @ mean, atol=0.01, rtol=0)
    torch.testing.assert_close(out["var"], (Phi @ cov * Phi).sum(-1) + NOISE, rtol=0.05, atol=0)
