"""ArviZ export of original-space weights and predictions at new inputs (plain, repriorised, collapsed)."""

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive

from pyro_gpx.bnn import BayesianMLP, ChainsResult, predictions_to_inference_data
from pyro_gpx.diagnostics import get_group, group_names


def _prior_draws(model, X, y, num: int) -> dict[str, torch.Tensor]:
    """``num`` draws of the model's latent sites (a stand-in for MCMC samples)."""
    traces = [poutine.trace(model).get_trace(X, y) for _ in range(num)]
    names = [k for k, s in traces[0].nodes.items() if s["type"] == "sample" and not s["is_observed"] and k != "data"]
    return {k: torch.stack([t.nodes[k]["value"] for t in traces]) for k in names}


def _f(bnn, samples, readout, X_new):
    """The network output of each draw, one at a time."""
    out = []
    for i in range(readout.shape[0]):
        params = {k: v[i] for k, v in samples.items() if k.startswith("layers.")}
        out.append(bnn.features(X_new, params) @ readout[i].T)
    return torch.stack(out)


def test_repriorised_readout_and_predictions_at_new_inputs(data):
    # audit: to_inference_data(samples, model=rep, model_args=(X_new,), posterior_predictive=True) raised
    # "latent site 'y' has no posterior samples"
    X, y = data
    bnn = BayesianMLP(3, [6], noise=0.1)
    rep = bnn.repriorised()
    samples = _prior_draws(rep, X, y, 4)
    X_new = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    idata = predictions_to_inference_data(rep, samples, X_new, generator=torch.Generator().manual_seed(2))
    assert {"posterior", "predictions", "predictions_constant_data"} <= set(group_names(idata))
    readout = torch.from_numpy(get_group(idata, "posterior")["readout"].values[0])
    expected = Predictive(rep, posterior_samples=samples, return_sites=["readout"])(X_new)["readout"]
    torch.testing.assert_close(readout, expected.reshape(4, 1, 7), rtol=0, atol=0)
    f = _f(bnn, samples, readout, X_new)
    pred = get_group(idata, "predictions")
    np.testing.assert_allclose(pred["f"].values[0], f.numpy(), rtol=1e-12)
    eps = torch.randn(4, 7, 1, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(pred["y"].values[0], (f + 0.1**0.5 * eps)[..., 0].numpy(), rtol=1e-12)
    assert pred["y"].dims == ("chain", "draw", "data") and pred["f"].dims == ("chain", "draw", "data", "output")
    np.testing.assert_array_equal(get_group(idata, "predictions_constant_data")["X"].values, X_new.numpy())
    # (chain, draw) samples: the same numbers
    grouped = {k: v.reshape((2, 2) + v.shape[1:]) for k, v in samples.items()}
    by_chain = predictions_to_inference_data(rep, grouped, X_new, group_by_chain=True)
    np.testing.assert_allclose(get_group(by_chain, "predictions")["f"].values.reshape(4, 7, 1), f.numpy())


def test_collapsed_readout_draws_and_predictions(data):
    X, y = data
    bnn = BayesianMLP(3, [4], noise=None, parameterization="standard")
    model = bnn.collapsed()
    samples = _prior_draws(bnn, X, None, 3)
    samples = {k: v for k, v in samples.items() if k != "readout" and k != "y"}
    model.set_training_data(X, y)
    X_new = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    result = ChainsResult({k: v[None] for k, v in samples.items()}, {"n_steps": np.ones((1, 3), dtype=int)})
    idata = predictions_to_inference_data(model, result, X_new, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the stream: the readout draws first, then the observations
    readout = model.readout_draws(samples, gen)
    eps = torch.randn(3, 5, 1, generator=gen)
    np.testing.assert_array_equal(get_group(idata, "posterior")["readout"].values[0], readout.numpy())
    f = _f(bnn, samples, readout, X_new)
    y_new = (f + samples["noise"].sqrt()[:, None, None] * eps)[..., 0]
    np.testing.assert_allclose(get_group(idata, "predictions")["y"].values[0], y_new.numpy(), rtol=1e-12)
    assert "n_steps" in get_group(idata, "sample_stats")


def test_plain_categorical_predictions(float64):
    gen = torch.Generator().manual_seed(0)
    X, X_new = torch.randn(10, 2, generator=gen), torch.randn(6, 2, generator=gen)
    bnn = BayesianMLP(2, [3], out_dim=4, likelihood="categorical")
    samples = _prior_draws(bnn, X, None, 5)
    samples.pop("y")
    idata = predictions_to_inference_data(bnn, samples, X_new, generator=torch.Generator().manual_seed(0))
    pred = get_group(idata, "predictions")
    np.testing.assert_allclose(pred["f"].values[0], _f(bnn, samples, samples["readout"], X_new).numpy(), rtol=1e-12)
    labels = pred["y"].values
    assert labels.shape == (1, 5, 6) and labels.dtype.kind == "i" and labels.min() >= 0 and labels.max() < 4


def test_bad_input(data):
    X, y = data
    bnn = BayesianMLP(3, [4])
    samples = _prior_draws(bnn, X, y, 2)
    with pytest.raises(TypeError, match="model must be a BayesianMLP"):
        predictions_to_inference_data(lambda X: X, samples, X)
    with pytest.raises(ValueError, match=r"X must be \(n, 3\)"):
        predictions_to_inference_data(bnn, samples, X[:, :2])
    with pytest.raises(ValueError, match="X_new contains NaN"):
        predictions_to_inference_data(bnn, samples, torch.full((2, 3), float("nan")))
    for bad in (0, -1):  # -1 skipped the loop and returned uninitialised memory as f
        with pytest.raises(ValueError, match="draw_batch must be a positive integer"):
            predictions_to_inference_data(bnn, samples, X, draw_batch=bad)
    with pytest.raises(ValueError, match="samples lack the site 'readout'"):
        predictions_to_inference_data(bnn, {k: v for k, v in samples.items() if k != "readout"}, X)
    latent_noise = BayesianMLP(3, [4], noise=None)
    noisy = _prior_draws(latent_noise, X, y, 2)
    for site in ("noise", "layers.0.weight"):  # a bare KeyError before
        with pytest.raises(ValueError, match=rf"samples lack the sites \['{site}'\]"):
            predictions_to_inference_data(latent_noise, {k: v for k, v in noisy.items() if k != site}, X)
    with pytest.raises(ValueError, match="training targets"):  # never ran, no set_training_data
        predictions_to_inference_data(bnn.repriorised(), {"readout_whitened": torch.zeros(2, 5, 1), **samples}, X)
    broken = {**samples, "readout": samples["readout"].clone()}
    broken["readout"][0, 0] = float("nan")  # NaN predictions, silently
    with pytest.raises(ValueError, match="the draws of 'readout' contains NaN"):
        predictions_to_inference_data(bnn, broken, X)
    negative = {**noisy, "noise": -noisy["noise"]}
    with pytest.raises(ValueError, match="the draws of 'noise' must be positive"):
        predictions_to_inference_data(latent_noise, negative, X)
