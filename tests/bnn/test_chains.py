"""Chains in separate processes, merged and exported to ArviZ."""

import arviz as az
import torch

from pyro_gpx.bnn import BayesianMLP, run_chains
from pyro_gpx.diagnostics import get_group


def test_parallel_chains_merge_and_export(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=gen)
    y = X[:, 0] - X[:, 1] + 0.1 * torch.randn(30, generator=gen)
    model = BayesianMLP(2, [], noise=0.05).repriorised()
    result = run_chains(model, (X, y), num_chains=2, num_samples=60, warmup_steps=60, processes=2, progress=False)
    assert result.samples["readout_whitened"].shape == (2, 60, 3, 1)
    assert result.sample_stats["n_steps"].shape == (2, 60) and result.num_gradients > 0
    # different seeds: the chains differ
    assert not torch.equal(result.samples["readout_whitened"][0], result.samples["readout_whitened"][1])
    idata = result.to_inference_data(model, (X, y))
    assert get_group(idata, "posterior")["readout"].shape == (2, 60, 1, 3)  # mapped back to the original weights
    assert {"n_steps", "step_size", "diverging"} <= set(get_group(idata, "sample_stats").data_vars)
    assert float(az.rhat(idata, var_names=["readout_whitened"]).to_array().max()) < 1.1
    sequential = run_chains(model, (X, y), num_chains=2, num_samples=60, warmup_steps=60, processes=1, progress=False)
    torch.testing.assert_close(sequential.samples["readout_whitened"], result.samples["readout_whitened"])
