"""The BNN model builder."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_gpx.bnn import BayesianMLP


def test_ntk_and_standard_parameterisations_give_the_same_function(float64):
    X = torch.randn(10, 3)
    ntk, std = BayesianMLP(3, [8, 8], parameterization="ntk"), BayesianMLP(3, [8, 8], parameterization="standard")
    trace = poutine.trace(ntk).get_trace(X)
    values = {k: s["value"] for k, s in trace.nodes.items() if s["type"] == "sample" and k != "y"}
    scaled = {}
    for k, fan_in in enumerate([3, 8]):
        scaled[f"layers.{k}.weight"] = values[f"layers.{k}.weight"] / math.sqrt(fan_in)  # sigma_w = 1
        scaled[f"layers.{k}.bias"] = values[f"layers.{k}.bias"] * 0.1
    scaled["readout"] = values["readout"] * std.readout_prior_scale()
    f_ntk = poutine.condition(ntk, values)(X)
    f_std = poutine.condition(std, scaled)(X)
    torch.testing.assert_close(f_ntk, f_std)


@pytest.mark.parametrize("likelihood, out_dim", [("gaussian", 1), ("gaussian", 2), ("categorical", 4)])
def test_shapes_and_plate(float64, likelihood, out_dim):
    X = torch.randn(12, 2)
    bnn = BayesianMLP(2, [5], out_dim=out_dim, likelihood=likelihood, residual=True, noise=None)
    trace = poutine.trace(bnn).get_trace(X)
    assert trace.nodes["y"]["cond_indep_stack"][0].name == "data"
    assert trace.nodes["readout"]["value"].shape == (out_dim, 6)
    assert ("noise" in trace.nodes) == (likelihood == "gaussian")
    pyro.clear_param_store()


@pytest.mark.parametrize("repriorised", [False, True])
def test_pickles_after_a_gradient_evaluation(float64, repriorised):
    """The last run's draws and features (autograd graph) are not pickled: chains in other processes
    may start after the model was evaluated here."""
    import pickle

    from pyro.infer.mcmc.util import initialize_model

    X, y = torch.randn(10, 1), torch.randn(10)
    bnn = BayesianMLP(1, [8], noise=None)
    model = bnn.repriorised() if repriorised else bnn
    init, potential_fn, _, _ = initialize_model(model, (X, y))
    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    potential_fn(params).backward()
    copy = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(potential_fn(params), initialize_model(copy, (X, y))[1](params))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_residual_skip_connection_against_a_hand_computed_forward(float64, parameterization):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 2, generator=gen)
    W0, b0, W1, b1 = (torch.randn(*shape, generator=gen) for shape in [(5, 2), (5,), (5, 5), (5,)])
    params = {"layers.0.weight": W0, "layers.0.bias": b0, "layers.1.weight": W1, "layers.1.bias": b1}
    bnn = BayesianMLP(2, [5, 5], residual=True, parameterization=parameterization, weight_scale=1.5, bias_scale=0.2)
    if parameterization == "ntk":
        h1 = torch.relu(1.5 / math.sqrt(2) * X @ W0.T + 0.2 * b0)  # 2 -> 5: no skip
        h2 = h1 + torch.relu(1.5 / math.sqrt(5) * h1 @ W1.T + 0.2 * b1)  # 5 -> 5: skip
        expected = torch.cat([1.5 / math.sqrt(5) * h2, torch.full((6, 1), 0.2)], -1)
    else:
        h1 = torch.relu(X @ W0.T + b0)
        h2 = h1 + torch.relu(h1 @ W1.T + b1)
        expected = torch.cat([h2, torch.ones(6, 1)], -1)
    torch.testing.assert_close(bnn.features(X, params), expected)
    plain = BayesianMLP(2, [5, 5], parameterization=parameterization, weight_scale=1.5, bias_scale=0.2)
    assert not torch.allclose(plain.features(X, params), expected)
    # the model's output is these features times the readout
    readout = torch.randn(1, 6, generator=gen)
    f = poutine.condition(bnn, {**params, "readout": readout})(X)
    torch.testing.assert_close(f, expected @ readout.T)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "erf"])
def test_activations_against_a_hand_computed_forward(float64, activation):
    # GELU(a) = a Phi(a); relu's weight gradient jumps where a pre-activation crosses zero, GELU's does not
    elementwise = {"relu": torch.relu, "gelu": lambda a: a * torch.distributions.Normal(0.0, 1.0).cdf(a),
                   "tanh": torch.tanh, "erf": torch.erf}[activation]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 2, generator=gen)
    W0, b0 = torch.randn(4, 2, generator=gen), torch.randn(4, generator=gen)
    bnn = BayesianMLP(2, [4], activation=activation)
    h = elementwise(X @ W0.T / math.sqrt(2) + 0.1 * b0)
    expected = torch.cat([h / 2.0, torch.full((6, 1), 0.1)], -1)
    torch.testing.assert_close(bnn.features(X, {"layers.0.weight": W0, "layers.0.bias": b0}), expected)
    with pytest.raises(ValueError, match="activation"):
        BayesianMLP(2, [4], activation="softsign")


def test_layer_sizes_are_integers_and_a_categorical_net_has_two_classes():
    for kwargs, name in (({"widths": [4.7]}, "widths"), ({"out_dim": 2.5}, "out_dim"), ({"in_dim": 2.5}, "in_dim")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            BayesianMLP(**{"in_dim": 2, "widths": [4], **kwargs})  # 4.7 became 4; 2.5 failed in torch.zeros
    with pytest.raises(ValueError, match="out_dim >= 2"):  # one class: log p(y) = 0 whatever the data
        BayesianMLP(2, [4], 1, likelihood="categorical")


def test_a_float32_net_samples_under_a_float64_default():
    """Pyro's plates score in the default dtype, so the potential (and the momenta) were float64 and the first
    leapfrog step failed on a float32 product."""
    from pyro.infer import MCMC, NUTS

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        X = torch.randn(15, 2, dtype=torch.float32)
        y = torch.sin(X[:, 0])
        for model in (BayesianMLP(2, [4], dtype=torch.float32), BayesianMLP(2, [4], dtype=torch.float32).repriorised()):
            mcmc = MCMC(NUTS(model, max_tree_depth=3), num_samples=3, warmup_steps=3, disable_progbar=True)
            mcmc.run(X, y)
            assert all(torch.isfinite(v).all() for v in mcmc.get_samples().values())
    finally:
        torch.set_default_dtype(previous)


def test_model_relations_for_render_model():
    # pyro.render_model traces with ProvenanceTensors, whose .shape is a plain tuple (no .numel())
    from pyro.infer.inspect import get_model_relations

    X = torch.randn(12, 2, dtype=torch.float64)
    y = X.sum(-1)
    net = BayesianMLP(2, [4], noise=None)
    for model in (net, net.repriorised()):
        relations = get_model_relations(model, model_args=(X, y))
        assert set(relations["sample_sample"]["y"]) >= {"noise", "layers.0.weight", "layers.0.bias"}
