"""Learned prior scale, Predictive, Trace_ELBO with the Gaussian guide and NUTS for classification."""

import math

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from torch import nn

from pyro_gpx.bll import (
    BayesianLastLayer,
    CategoricalHead,
    GaussianHead,
    GaussianWeightPrior,
    LastLayerELBO,
    LastLayerNormal,
    predict,
)

NOISE = 0.1


@pytest.fixture
def regression(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=gen)
    y = 2.5 * X[:, 0] - 2.0 * X[:, 1] + 1.5 + math.sqrt(NOISE) * torch.randn(30, generator=gen)
    return X, y, torch.cat([X, torch.ones(30, 1)], -1)


@pytest.fixture
def classification(float64):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(24, 3, generator=gen)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    return X, y


def _log_evidence(Phi, y, scale):
    """:math:`\\log N(y; 0, s^2\\Phi\\Phi^\\top + \\sigma^2 I)`."""
    K = scale**2 * Phi @ Phi.T + NOISE * torch.eye(len(y))
    return torch.distributions.MultivariateNormal(torch.zeros(len(y)), K).log_prob(y)


def test_learned_prior_scale_follows_the_evidence(regression):
    X, y, Phi = regression
    model = BayesianLastLayer(None, 2, GaussianHead(NOISE, learn_noise=False), GaussianWeightPrior(1.0, True))
    guide = LastLayerNormal(model, init_scale=0.5)
    # at the exact posterior for s = 1, d ELBO / d log s is d log p(y | s) / d log s (envelope theorem)
    cov = torch.linalg.inv(Phi.T @ Phi / NOISE + torch.eye(3))
    guide.loc = (cov @ Phi.T @ y / NOISE)[None].clone()
    guide.scale_tril = torch.linalg.cholesky(cov)[None].clone()
    elbo = LastLayerELBO().differentiable_elbo(model, guide, X, y)
    log_s = pyro.get_param_store().get_param("prior.scale").unconstrained()
    (grad,) = torch.autograd.grad(elbo, log_s)
    log_s0 = torch.zeros((), requires_grad=True)
    (expected,) = torch.autograd.grad(_log_evidence(Phi, y, log_s0.exp()), log_s0)
    torch.testing.assert_close(grad, expected)
    assert float(expected) > 0  # the data want a wider prior
    # and SVI moves s up the evidence, towards its maximum (s* = 2.04)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), LastLayerELBO())
    first = svi.evaluate_loss(X, y)
    for _ in range(40):
        svi.step(X, y)
    scale = float(pyro.param("prior.scale").detach())
    assert 1.5 < scale < 2.3
    assert svi.evaluate_loss(X, y) < first
    assert float(_log_evidence(Phi, y, scale)) > float(_log_evidence(Phi, y, 1.0))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("classes", [None, 3])
def test_predictive_shapes_and_values(regression, classes, parallel):
    X, y, Phi = regression
    head = CategoricalHead(classes) if classes else GaussianHead(NOISE)
    model = BayesianLastLayer(None, 2, head)
    guide = LastLayerNormal(model)
    # parallel: Predictive sizes its draw plate from the guide (no plates) and passes W as (S, C, D)
    out = Predictive(model, guide=guide, num_samples=6, parallel=parallel)(X[:5])
    C = classes or 1
    assert out["weights"].shape == (6, 1, C, 3)  # Predictive pads sites outside the data plate
    assert out["f"].shape == (6, 5, C)
    assert out["y"].shape == (6, 5)
    torch.testing.assert_close(out["f"], Phi[:5] @ out["weights"][:, 0].mT)
    if classes:
        torch.testing.assert_close(out["f"].softmax(-1).sum(-1), torch.ones(6, 5))
        assert ((out["y"] >= 0) & (out["y"] < classes)).all()


def test_last_layer_normal_with_trace_elbo_for_classification(classification):
    X, y = classification
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, CategoricalHead(3))
    guide = LastLayerNormal(model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step(X, y) for _ in range(60)]
    assert sum(losses[-10:]) < sum(losses[:10])
    out = predict(model, guide, X, num_samples=50)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(24))
    assert (out["probs"].argmax(-1) == y).double().mean() > 0.8


def test_last_layer_nuts_for_a_classification_head(classification):
    X, y = classification
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), 2, CategoricalHead(3))
    with torch.no_grad():
        design = model.design(X)
    mcmc = MCMC(NUTS(model, max_tree_depth=4), num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(X, y, design=design)
    W = mcmc.get_samples()["weights"]
    assert W.shape == (5, 3, 3)
    out = predict(model, {"weights": W}, X[:4])
    torch.testing.assert_close(out["f"], design[:4] @ W.mT)
    torch.testing.assert_close(out["probs"], out["f"].softmax(-1).mean(0))
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(4))
