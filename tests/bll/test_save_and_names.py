"""Saving and reloading a trained last layer, and several named last layers in one Pyro model."""

import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
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
    predict,
)


@pytest.fixture
def data(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=gen)
    return X, X[:, 0].sin() + 0.1 * torch.randn(20, generator=gen)


def _gaussian(seed: int, name: str | None = None) -> tuple[BayesianLastLayer, LastLayerNormal]:
    torch.manual_seed(seed)  # a different seed: a different fresh initialisation
    prior = GaussianWeightPrior(1.0, learn_scale=True)
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.1), prior, name=name)
    return model, LastLayerNormal(model)


def _train(model, guide, X, y, steps: int = 5) -> None:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), LastLayerELBO())
    for _ in range(steps):
        svi.step(X, y)


def _predicted_mean(model, guide, X) -> torch.Tensor:
    pyro.set_rng_seed(1)
    return predict(model, guide, X, num_samples=20)["mean"]


def test_param_store_round_trip(data, tmp_path):
    X, y = data
    model, guide = _gaussian(0)
    _train(model, guide, X, y)
    loss, mean = LastLayerELBO().loss(model, guide, X, y), _predicted_mean(model, guide, X)
    pyro.get_param_store().save(tmp_path / "store.pt")
    sgd = SVI(model, guide, pyro.optim.SGD({"lr": 1e-3}), LastLayerELBO())  # stateless: comparable steps
    sgd.step(X, y)
    stepped = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    pyro.clear_param_store()
    model2, guide2 = _gaussian(1)
    pyro.get_param_store().load(tmp_path / "store.pt")
    assert LastLayerELBO().loss(model2, guide2, X, y) == loss
    torch.testing.assert_close(_predicted_mean(model2, guide2, X), mean, rtol=0, atol=0)
    # training resumes on the loaded values (the feature network's included)
    SVI(model2, guide2, pyro.optim.SGD({"lr": 1e-3}), LastLayerELBO()).step(X, y)
    for k, v in pyro.get_param_store().items():
        torch.testing.assert_close(v.detach(), stepped[k], rtol=0, atol=0)
    torch.testing.assert_close(model2.features[0].weight.detach(), stepped["features.0.weight"], rtol=0, atol=0)


def test_state_dict_round_trip(data, tmp_path):
    X, y = data
    model, guide = _gaussian(0)
    _train(model, guide, X, y)
    loss, mean = LastLayerELBO().loss(model, guide, X, y), _predicted_mean(model, guide, X)
    torch.save({"model": model.state_dict(), "guide": guide.state_dict()}, tmp_path / "state.pt")

    pyro.clear_param_store()
    model2, guide2 = _gaussian(1)
    state = torch.load(tmp_path / "state.pt")
    model2.load_state_dict(state["model"])
    guide2.load_state_dict(state["guide"])
    assert LastLayerELBO().loss(model2, guide2, X, y) == loss
    torch.testing.assert_close(_predicted_mean(model2, guide2, X), mean, rtol=0, atol=0)


def _implicit(seed: int) -> BayesianLastLayer:
    torch.manual_seed(seed)
    prior = ImplicitWeightPrior.mlp(5, latent_dim=2, hidden=8, learn_generator=False, learn_scale=True, center=True)
    return BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.1), prior)


def test_fixed_generator_is_saved_and_does_not_warn(data, tmp_path):
    X, y = data
    model = _implicit(0).train()
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # formerly one UserWarning per frozen parameter and trace
        for _ in range(3):
            svi.step(X, y)
    assert not any(k.startswith("prior.generator") for k in pyro.get_param_store().keys())
    z = {"weights_latent": torch.randn(6, 2, generator=torch.Generator().manual_seed(2))}
    mean = predict(model, z, X)["mean"]
    torch.save(model.state_dict(), tmp_path / "model.pt")

    pyro.clear_param_store()
    model2 = _implicit(1)  # another random generator until the state is loaded
    assert not torch.equal(model2.prior.generator[0].weight, model.prior.generator[0].weight)
    model2.load_state_dict(torch.load(tmp_path / "model.pt"))
    torch.testing.assert_close(predict(model2, z, X)["mean"], mean, rtol=0, atol=0)


class _TwoHeads(PyroModule):
    def __init__(self):
        super().__init__()
        self.reg = BayesianLastLayer(None, 3, GaussianHead(0.1), name="reg")
        self.cls = BayesianLastLayer(None, 3, CategoricalHead(2), name="cls")

    def forward(self, X, y_reg=None, y_cls=None):
        return self.reg(X, y_reg), self.cls(X, y_cls)


def test_two_named_last_layers_in_one_model(data):
    X, y = data
    labels = (y > 0).long()
    model = _TwoHeads()
    trace = poutine.trace(model).get_trace(X, y, labels)
    sites = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    assert sites == {f"{h}.{s}" for h in ("reg", "cls") for s in ("weights", "data", "f", "y")}
    assert trace.nodes["cls.y"]["fn"].logits.shape == (20, 2)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        assert torch.isfinite(torch.tensor(svi.step(X, y, labels)))
    draws = {"cls.weights": torch.randn(4, 2, 4)}
    out = predict(model.cls, draws, X[:5])
    torch.testing.assert_close(out["f"], torch.cat([X[:5], torch.ones(5, 1)], -1) @ draws["cls.weights"].mT)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(5))


def test_a_name_only_renames_the_sites(data):
    X, y = data
    losses = []
    for name in (None, "head"):
        pyro.clear_param_store()
        model, guide = _gaussian(0, name)
        assert guide.site == model.weight_site == ("weights" if name is None else "head.weights")
        losses.append(LastLayerELBO().loss(model, guide, X, y))
    assert losses[0] == losses[1]
    assert {"head.loc", "head.scale_tril", "head.features.0.weight", "head.head.noise"} <= set(
        pyro.get_param_store().keys()
    )
    with pytest.raises(ValueError, match="name"):
        BayesianLastLayer(None, 3, GaussianHead(), name="")


def test_named_models_do_not_share_parameters(data):
    X, y = data
    model_a, guide_a = _gaussian(0, "a")
    _train(model_a, guide_a, X, y)
    trained = model_a.features[0].weight.detach().clone()
    model_b, guide_b = _gaussian(0, "b")  # the same initial values as model_a had
    fresh = model_b.features[0].weight.detach().clone()
    _train(model_b, guide_b, X, y, steps=1)
    assert not torch.equal(model_b.features[0].weight, fresh)  # b trains its own features ...
    torch.testing.assert_close(model_a.features[0].weight.detach(), trained, rtol=0, atol=0)  # ... not a's


class _Wrapped(PyroModule):
    def __init__(self, name):
        super().__init__()
        self.layer = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.1), name=name)

    def forward(self, X, y=None):
        return self.layer(X, y)


def test_a_named_layer_keeps_its_prefix_under_a_parent_module(data):
    X, y = data
    first, second = _Wrapped("a"), _Wrapped("b")
    first(X, y)
    second(X, y)
    assert set(pyro.get_param_store().keys()) == {
        f"{n}.{p}" for n in "ab" for p in ("features.0.weight", "features.0.bias", "head.noise")
    }
    assert not torch.equal(first.layer.features[0].weight, second.layer.features[0].weight)


def test_frozen_feature_parameters_stay_fixed(data):
    X, y = data
    features = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    features[0].requires_grad_(False)
    frozen = features[0].weight.detach().clone()
    model = BayesianLastLayer(features, 4, GaussianHead(0.1))
    guide = LastLayerNormal(model)
    before = features[2].weight.detach().clone()
    _train(model, guide, X, y)
    torch.testing.assert_close(features[0].weight, frozen, rtol=0, atol=0)  # a buffer now, never in the store
    assert not features[0].weight.requires_grad and "features.0.weight" not in pyro.get_param_store()
    assert not torch.equal(features[2].weight.detach(), before)  # the trainable layer trains
    assert "0.weight" in features.state_dict()


def test_predict_refuses_samples_without_the_weight_site(data):
    X, _ = data
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.1), name="reg")
    with pytest.raises(ValueError, match="no draws of the site 'reg.weights'"):
        predict(model, {"weights": torch.zeros(10, 1, 5)}, X)
    implicit = BayesianLastLayer(None, 3, GaussianHead(0.1), ImplicitWeightPrior(nn.Linear(2, 4), latent_dim=2))
    with pytest.raises(ValueError, match="no draws of the site 'weights_latent'"):
        predict(implicit, {"weights": torch.zeros(10, 1, 4)}, X)  # W alone: z would come from the prior


def test_predict_refuses_another_layers_guide_and_takes_predictive_draws(data, float64):
    """Another layer's guide (same shapes) silently gave the prior predictive (variance 126 against 0.01);
    Predictive's draws of the weights, padded to (S, 1, C, D), failed with an expand error."""
    X = torch.linspace(-1, 1, 50)[:, None]
    y = 2 * X[:, 0] + 1
    a = BayesianLastLayer(None, 1, GaussianHead(0.01, learn_noise=False), GaussianWeightPrior(10.0), name="a")
    b = BayesianLastLayer(None, 1, GaussianHead(0.01, learn_noise=False), GaussianWeightPrior(10.0), name="b")
    guide_a = LastLayerNormal(a)
    guide_a(X, y)
    guide_a.set_posterior(exact_posterior(a, X, y))
    with pytest.raises(ValueError, match="guide of the site 'a.weights'; this model's weights are 'b.weights'"):
        predict(b, guide_a, X[:3])
    draws = Predictive(a, guide=guide_a, num_samples=400, return_sites=["a.weights"])(X, y)
    assert draws["a.weights"].shape == (400, 1, 1, 2)
    out = predict(a, draws, X[:3])
    torch.testing.assert_close(out["mean"], 2 * X[:3, 0] + 1, rtol=0, atol=0.02)
    with pytest.raises(ValueError, match="init_scale must be a finite positive number"):
        LastLayerNormal(a, init_scale=float("inf"))


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_positive_settings_must_be_finite(value):
    with pytest.raises(ValueError, match="noise must be a finite positive number"):
        GaussianHead(value)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        GaussianWeightPrior(value)
