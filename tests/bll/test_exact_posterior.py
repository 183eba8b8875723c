"""The exact last-layer posterior and evidence against dense Bayesian linear regression."""

import math
import warnings

import pyro
import pytest
import torch
from torch import nn

from pyro_gpx.bll import (
    BayesianLastLayer,
    CategoricalHead,
    GaussianHead,
    GaussianWeightPrior,
    ImplicitWeightPrior,
    LastLayerELBO,
    LastLayerNormal,
    exact_posterior,
    log_evidence,
    predict,
)


def _dense(Phi, y, noise, scale):
    """Posterior mean, covariance and log evidence from the n x n and D x D dense formulas."""
    precision = Phi.T @ Phi / noise + torch.eye(Phi.shape[1]) / scale**2
    cov = torch.linalg.inv(precision)
    K = scale**2 * Phi @ Phi.T + noise * torch.eye(len(y))
    log_z = torch.distributions.MultivariateNormal(torch.zeros(len(y)), K).log_prob(y)
    return cov @ Phi.T @ y / noise, cov, float(log_z)


@pytest.fixture
def network_model(float64):
    """A tanh feature network with learned noise and prior scale, set away from their starts in the store."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    model = BayesianLastLayer(net, 6, GaussianHead(0.1), GaussianWeightPrior(1.0, learn_scale=True), name="reg")
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(57, 3, generator=gen)
    y = torch.sin(X[:, 0]) + 0.3 * X[:, 1] + 0.2 * torch.randn(57, generator=gen)
    model(X[:2], y[:2])  # registers the parameters
    pyro.get_param_store()["reg.head.noise"] = torch.tensor(0.07)
    pyro.get_param_store()["reg.prior.scale"] = torch.tensor(1.7)
    return model, X, y


def test_posterior_and_evidence_match_the_dense_formulas(network_model):
    model, X, y = network_model
    with torch.no_grad():
        Phi = model.design(X)
    mean, cov, log_z = _dense(Phi, y, 0.07, 1.7)
    q = exact_posterior(model, X, y)
    assert q.batch_shape == (1,) and q.event_shape == (7,)
    torch.testing.assert_close(q.loc[0], mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.covariance_matrix[0], cov, rtol=1e-10, atol=1e-12)
    assert log_evidence(model, X, y) == pytest.approx(log_z, rel=1e-12)


def test_chunks_do_not_change_the_answer(network_model):
    model, X, y = network_model
    whole, chunked = exact_posterior(model, X, y), exact_posterior(model, X, y, chunk_size=5)
    torch.testing.assert_close(chunked.loc, whole.loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.scale_tril, whole.scale_tril, rtol=1e-12, atol=1e-12)
    assert log_evidence(model, X, y, chunk_size=5) == pytest.approx(log_evidence(model, X, y), rel=1e-13)


def test_batchnorm_features_are_read_in_eval_mode_and_left_as_they_were(float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh())
    model = BayesianLastLayer(net, 6, GaussianHead(0.1, learn_noise=False))
    X, y = torch.randn(40, 3), torch.randn(40)
    model(X, y)  # a training-mode run: the running statistics move away from their start
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert model.training
    # its ELBO in training mode sees other features (215 nats apart on a reviewer's example): a warning
    with pytest.warns(UserWarning, match="BatchNorm1d in the feature network is in training mode"):
        whole = log_evidence(model, X, y)
    warnings.simplefilter("ignore", UserWarning)
    assert log_evidence(model, X, y, chunk_size=7) == pytest.approx(whole, rel=1e-12)  # memory only
    q = exact_posterior(model, X, y, chunk_size=3)
    guide = LastLayerNormal(model)
    guide.set_posterior(q)
    predict(model, guide, X, num_samples=4)
    assert model.training and net[1].training  # the mode is given back
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    net.eval()  # the same as evaluating the features in eval mode by hand
    Phi = torch.cat([net(X), torch.ones(40, 1)], -1)
    assert whole == pytest.approx(_dense(Phi.detach(), y, 0.1, 1.0)[2], rel=1e-10)


def test_a_float64_model_keeps_its_fixed_noise_and_prior_scale_exact():
    # torch's default dtype float32, a float64 network: the noise and scale were made in float32 and converted,
    # so noise 0.1 was 0.10000000149 and the evidence was off the dense value by 3e-6 nats
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh()).double()
    model = BayesianLastLayer(net, 6, GaussianHead(0.1, learn_noise=False), GaussianWeightPrior(0.7))
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(40, dtype=torch.float64)
    assert model.head.noise.item() == 0.1 and model.prior.scale.item() == 0.7
    with torch.no_grad():
        Phi = model.design(X)
    K = 0.7**2 * Phi @ Phi.T + 0.1 * torch.eye(40, dtype=torch.float64)
    log_z = torch.distributions.MultivariateNormal(torch.zeros(40, dtype=torch.float64), K).log_prob(y)
    assert log_evidence(model, X, y) == pytest.approx(float(log_z), rel=1e-13)


def test_a_float32_guide_trains_with_the_deterministic_elbo():
    # torch's default dtype: the guide takes the feature network's dtype
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    model = BayesianLastLayer(net, 6, GaussianHead(0.1, learn_noise=False))
    X, y = torch.randn(30, 3), torch.randn(30)
    guide = LastLayerNormal(model)
    assert guide.distribution().mean.dtype == torch.float32
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), LastLayerELBO())
    assert math.isfinite(svi.step(X, y))
    guide.set_posterior(exact_posterior(model, X, y))
    assert guide.distribution().mean.dtype == torch.float32
    assert -LastLayerELBO().loss(model, guide, X, y) == pytest.approx(log_evidence(model, X, y), abs=1e-3)


def test_the_guide_set_to_the_posterior_attains_the_evidence(network_model):
    model, X, y = network_model
    guide = LastLayerNormal(model, init_scale=0.3)
    loss = LastLayerELBO()
    before = -loss.loss(model, guide, X, y)
    guide.set_posterior(exact_posterior(model, X, y))
    after = -loss.loss(model, guide, X, y)
    evidence = log_evidence(model, X, y)
    assert before < evidence - 1.0  # a lower bound, and this start is far below it
    assert after == pytest.approx(evidence, rel=1e-10)
    with guide._pyro_context:  # written to the store under the model's name
        torch.testing.assert_close(guide.loc, pyro.param("reg.loc").detach())


def test_a_float32_model_is_accumulated_in_float64(network_model):
    model, X, y = network_model
    q64 = exact_posterior(model, X, y)
    model.features.float()
    for name in ("reg.features.0.weight", "reg.features.0.bias"):
        pyro.get_param_store()[name] = pyro.param(name).detach().float()
    q32 = exact_posterior(model, X.float(), y.float())
    assert q32.loc.dtype == torch.float32 and q32.scale_tril.dtype == torch.float32
    torch.testing.assert_close(q32.loc.double(), q64.loc, rtol=0, atol=1e-4)
    torch.testing.assert_close(q32.covariance_matrix.double(), q64.covariance_matrix, rtol=0, atol=1e-5)


def test_the_gaussian_fixture_of_the_closed_form_tests(float64):
    # no features: the design is [X, 1], as in the deterministic-ELBO tests
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=gen)
    y = 0.7 * X[:, 0] - 0.3 * X[:, 1] + 0.2 + 0.3 * torch.randn(40, generator=gen)
    model = BayesianLastLayer(None, 2, GaussianHead(0.09, learn_noise=False), GaussianWeightPrior(0.8))
    mean, cov, log_z = _dense(torch.cat([X, torch.ones(40, 1)], -1), y, 0.09, 0.8)
    q = exact_posterior(model, X, y)
    torch.testing.assert_close(q.loc[0], mean, rtol=1e-10, atol=1e-12)
    assert log_evidence(model, X, y) == pytest.approx(log_z, rel=1e-12)
    assert math.isfinite(log_z)


def test_bad_input_is_named(network_model, float64):
    model, X, y = network_model
    with pytest.raises(ValueError, match="y must be a vector"):
        exact_posterior(model, X, y[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        log_evidence(model, X, y, chunk_size=0)
    with pytest.raises(ValueError, match="X must be"):
        exact_posterior(model, X[:, 0], y)
    classifier = BayesianLastLayer(None, 3, CategoricalHead(3))
    with pytest.raises(ValueError, match="GaussianHead"):
        exact_posterior(classifier, X, torch.zeros(57, dtype=torch.long))
    implicit = BayesianLastLayer(None, 3, GaussianHead(0.1), ImplicitWeightPrior.mlp(4, latent_dim=2))
    with pytest.raises(ValueError, match="GaussianWeightPrior"):
        log_evidence(implicit, X, y)
    with pytest.raises(TypeError, match="model must be"):
        exact_posterior(nn.Linear(3, 1), X, y)
    guide = LastLayerNormal(model)
    q = exact_posterior(model, X, y)
    with pytest.raises(ValueError, match="loc shape"):
        guide.set_posterior(torch.distributions.MultivariateNormal(q.loc[0, :3], scale_tril=q.scale_tril[0, :3, :3]))
    with pytest.raises(TypeError, match="MultivariateNormal"):
        guide.set_posterior(q.loc)
    x = 100 * torch.randn(50, 1, generator=torch.Generator().manual_seed(0))
    collinear = BayesianLastLayer(None, 3, GaussianHead(1e-10, learn_noise=False), GaussianWeightPrior(100.0))
    for f in (exact_posterior, log_evidence):  # torch's LinAlgError named neither the cause nor the way out
        with pytest.raises(ValueError, match="precision .* is numerically singular in float64 .*raise the noise"):
            f(collinear, torch.cat([x, x, 2 * x], 1), x[:, 0])


def test_the_evidence_of_targets_far_from_zero_at_a_tiny_noise(float64):
    """y'y / s2 - b'P^-1 b / s2^2 cancelled: with a target offset of 1e4 at noise 1e-6 the evidence was a nat
    below the dense n x n value (computed with 40 digits: in float64 it is itself ill-conditioned), and below
    the ELBO of the guide set to the exact posterior (impossible)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 1e4 + 0.1 * torch.randn(30, generator=gen)
    model = BayesianLastLayer(None, 3, GaussianHead(1e-6, learn_noise=False), GaussianWeightPrior(1e4))
    noise, scale = float(model.head.noise), float(model.prior.scale)
    Phi = mpmath.matrix(torch.cat([X, torch.ones(30, 1)], 1).tolist())
    Y = mpmath.matrix(y.tolist())
    C = mpmath.mpf(scale) ** 2 * Phi * Phi.T + mpmath.mpf(noise) * mpmath.eye(30)
    dense = -0.5 * (30 * mpmath.log(2 * mpmath.pi) + mpmath.log(mpmath.det(C)) + (Y.T * mpmath.lu_solve(C, Y))[0])
    assert log_evidence(model, X, y) == pytest.approx(float(dense), abs=1e-3)
