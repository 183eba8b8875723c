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
