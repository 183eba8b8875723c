"""Classification head shapes and probabilities, minibatch scaling, and bad input."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_gpx.bll import (
    BayesianLastLayer,
    CategoricalHead,
    GaussianHead,
    ImplicitWeightPrior,
    LastLayerNormal,
    generator_mlp,
    predict,
    predictive_entropy,
)


@pytest.fixture
def digits_like(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 5, generator=gen)
    y = torch.randint(0, 3, (24,), generator=gen)
    features = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    return BayesianLastLayer(features, 6, CategoricalHead(3)), X, y


def test_classification_shapes_probabilities_and_vectorised_particles(digits_like):
    model, X, y = digits_like
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for _ in range(3):
        assert torch.isfinite(torch.tensor(svi.step(X, y)))
    with pyro.plate("particles", 4, dim=-2):
        trace = poutine.trace(poutine.replay(model, poutine.trace(guide).get_trace(X, y))).get_trace(X, y)
    assert trace.nodes["f"]["value"].shape == (4, 24, 3)
    out = predict(model, guide, X[:7], num_samples=50, train=(X, y))
    assert out["f"].shape == (50, 7, 3)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(7))
    assert ((out["entropy"] >= 0) & (out["entropy"] <= torch.log(torch.tensor(3.0)) + 1e-12)).all()
    torch.testing.assert_close(out["max_prob"], out["probs"].max(-1).values)


def test_minibatch_likelihood_is_scaled(digits_like):
    model, X, y = digits_like
    trace = poutine.trace(model).get_trace(X[:6], y[:6], num_data=24)
    site = trace.nodes["y"]
    assert site["scale"] == pytest.approx(4.0)
    trace.compute_log_prob()
    expected = 4.0 * site["fn"].log_prob(y[:6]).sum()
    assert float(site["log_prob_sum"].detach()) == pytest.approx(float(expected.detach()))


def test_predictive_entropy_of_uniform_and_certain():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(predictive_entropy(probs), torch.tensor([torch.log(torch.tensor(4.0)), 0.0]))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: predictive_entropy(torch.tensor([[-0.5, 1.5]])), ValueError, "probs"),
        (lambda: predictive_entropy(torch.tensor([[0.2, 0.2]])), ValueError, "probs"),
        (lambda: predictive_entropy(torch.tensor([[float("nan"), 1.0]])), ValueError, "probs"),
        (lambda: predictive_entropy(torch.tensor([[0, 1]])), TypeError, "probs"),
        (lambda: generator_mlp(2, 3, hidden=0), ValueError, "hidden"),
        (lambda: generator_mlp(2, 3, depth=2.5), ValueError, "depth"),
        (lambda: generator_mlp(True, 3), ValueError, "latent_dim"),
        (lambda: generator_mlp(2, -1), ValueError, "num_weights"),
    ],
)
def test_entropy_and_generator_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
    predictive_entropy(torch.tensor([[0.3, 0.7]], dtype=torch.float32).softmax(-1))  # round-off is accepted


def test_bad_input(digits_like):
    model, X, y = digits_like
    with pytest.raises(ValueError, match="labels must lie"):
        model(X, torch.full((24,), 3))
    with pytest.raises(ValueError, match="integer class labels"):
        model(X, y.double())
    with pytest.raises(ValueError, match="vector of 24"):
        model(X, y[:5])
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((24, 5), float("nan")), y)
    with pytest.raises(ValueError, match="num_data"):
        model(X, y, num_data=3)
    regression = BayesianLastLayer(None, 5, GaussianHead())
    with pytest.raises(ValueError, match="floating point"):
        regression(X, y)
    with pytest.raises(ValueError, match="NaN"):
        regression(X, torch.full((24,), float("nan")))
    with pytest.raises(ValueError, match=r"features have shape"):
        BayesianLastLayer(None, 4, GaussianHead())(X, X[:, 0])
    with pytest.raises(ValueError, match="noise must be a finite positive number"):
        GaussianHead(noise=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        CategoricalHead(1)
    implicit = BayesianLastLayer(None, 5, GaussianHead(), ImplicitWeightPrior.mlp(4, latent_dim=2))
    with pytest.raises(ValueError, match="generator returns 4 weights"):
        implicit(X, X[:, 0])
    with pytest.raises(ValueError, match="implicit priors"):
        LastLayerNormal(implicit)
    with pytest.raises(ValueError, match="train="):
        predict(model, AutoNormal(model), X)
    guide = LastLayerNormal(regression)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        predict(regression, guide, X, num_samples=0)
    with pytest.raises(ValueError, match="draw_batch must be a positive integer"):
        predict(regression, guide, X, draw_batch=0)
    with pytest.raises(ValueError, match="at least 2 for a regression head"):  # one draw has no variance
        predict(regression, guide, X, num_samples=1)
    with pytest.raises(ValueError, match="at least 2 draws"):
        predict(regression, {"weights": torch.zeros(1, 1, 6)}, X)
    float32_generator = ImplicitWeightPrior(nn.Linear(2, 6).float(), latent_dim=2)
    with pytest.raises(ValueError, match="generator's parameters are torch.float32"):
        BayesianLastLayer(None, 5, GaussianHead(), float32_generator)(X, X[:, 0])


def test_bad_batch_size_dtype_and_design(digits_like):
    model, X, y = digits_like
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        model(X, y, num_data=30.7)
    with pytest.raises(ValueError, match="X has no rows"):
        model(X[:0], y[:0])
    with pytest.raises(ValueError, match="X has dtype torch.float32"):
        model(X.float(), y)
    with pytest.raises(ValueError, match="X must be floating point"):
        BayesianLastLayer(None, 5, CategoricalHead(3))(X.long(), y)
    with pytest.raises(ValueError, match="design contains NaN"):
        model(X, y, design=torch.full((24, 7), float("nan")))
    with pytest.raises(ValueError, match=r"design must be a \(n, 7\)"):
        model(X, y, design=torch.ones(24, 6))
    with pytest.raises(ValueError, match="design has no rows"):
        model(X, y, design=torch.ones(0, 7))
    with pytest.raises(ValueError, match="feature_dim"):
        BayesianLastLayer(None, 2.5, GaussianHead())
    assert model(X[:6], y[:6], num_data=torch.tensor(24)).shape == (6, 3)  # an integer tensor is fine


def test_predict_takes_predictives_whole_dict_and_checks_the_draws(float64):
    """Predictive(model, guide) also returns f, weights and y at the training inputs: they conditioned the
    model at the new inputs (an expand error); draws of another shape broadcast (uniform probabilities)."""
    from pyro.infer import Predictive

    from pyro_gpx.bll import LastLayerNormal, exact_posterior, predict

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=gen)
    model = BayesianLastLayer(None, 2, GaussianHead(0.1, learn_noise=False))
    guide = LastLayerNormal(model)
    guide.set_posterior(exact_posterior(model, X, X[:, 0]))
    draws = Predictive(model, guide=guide, num_samples=50)(X, X[:, 0])
    X_new = torch.randn(7, 2, generator=gen)
    out = predict(model, draws, X_new)
    W = draws["weights"].reshape(50, 3)  # (2 features and the bias)
    torch.testing.assert_close(out["f"][..., 0], W @ torch.cat([X_new, torch.ones(7, 1)], 1).T)
    classifier = BayesianLastLayer(None, 2, CategoricalHead(3))
    for bad in (torch.randn(100, 1, 2), torch.randn(10, 3, 5)):
        with pytest.raises(ValueError, match=r"posterior\['weights'\] has shape"):
            predict(classifier, {"weights": bad}, X_new)


def test_a_feature_network_given_twice_reloads(float64):
    """A second layer on the same module wrapped its PyroParams' storage again: load_state_dict failed on
    'features.0.weight_unconstrained_unconstrained'."""
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).double()
    first = BayesianLastLayer(net, 2, GaussianHead(0.2))
    state = first.state_dict()
    pyro.clear_param_store()
    second = BayesianLastLayer(net, 2, GaussianHead(0.2))
    second.load_state_dict(state)
    assert set(second.state_dict()) == set(state)


def test_constructor_counts_are_checked_and_a_fixed_generator_stays_in_eval_mode(float64):
    for bad in (2.5, "3"):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            CategoricalHead(bad)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        ImplicitWeightPrior.mlp(6, latent_dim=0)  # was a prior of latent_dim 6
    generator = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    model = BayesianLastLayer(None, 2, GaussianHead(0.1), ImplicitWeightPrior(generator, 2, learn_generator=False))
    model.train()
    z = torch.ones(2)
    assert not generator.training
    torch.testing.assert_close(generator(z), generator(z), rtol=0, atol=0)
