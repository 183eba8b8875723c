"""Chains in separate processes, merged and exported to ArviZ."""

import sys
import time

import pyro
import pytest
import torch
from pyro.infer import Predictive

from pyro_gpx.bnn import BayesianMLP, run_chains
from pyro_gpx.diagnostics import get_group

from ..arviz_api import max_rhat


def test_parallel_chains_merge_and_export(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=gen)
    y = X[:, 0] - X[:, 1] + 0.1 * torch.randn(30, generator=gen)
    model = BayesianMLP(2, [], noise=0.05).repriorised()
    result = run_chains(model, (X, y), num_chains=2, num_samples=60, warmup_steps=60, processes=2, progress=False)
    # the model here never ran in the chains' processes: run_chains gave it the training data to predict with
    assert Predictive(model, result.get_samples())(X[:3])["y"].shape == (120, 3)
    assert result.samples["readout_whitened"].shape == (2, 60, 3, 1)
    assert result.sample_stats["n_steps"].shape == (2, 60) and result.num_gradients > 0
    # different seeds: the chains differ
    assert not torch.equal(result.samples["readout_whitened"][0], result.samples["readout_whitened"][1])
    idata = result.to_inference_data(model, (X, y))
    assert get_group(idata, "posterior")["readout"].shape == (2, 60, 1, 3)  # mapped back to the original weights
    assert {"n_steps", "step_size", "diverging"} <= set(get_group(idata, "sample_stats").data_vars)
    assert max_rhat(idata, ["readout_whitened"]) < 1.1
    sequential = run_chains(model, (X, y), num_chains=2, num_samples=60, warmup_steps=60, processes=1, progress=False)
    torch.testing.assert_close(sequential.samples["readout_whitened"], result.samples["readout_whitened"])


@pytest.mark.parametrize("kind", ["repriorised", "collapsed"])
def test_run_chains_sets_the_training_data_and_labels_progress(float64, kind, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # progress bars are off in CI, as Pyro's
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=gen)
    y = X[:, 0] + 0.1 * torch.randn(20, generator=gen)
    bnn = BayesianMLP(2, [], noise=None)
    model = bnn.repriorised() if kind == "repriorised" else bnn.collapsed()
    model.set_training_data(X[:5], y[:5])  # left over from an earlier run on other data
    run_chains(model, (), {"X": X, "y": y}, num_chains=1, num_samples=2, warmup_steps=2, processes=1, progress=False)
    reparam = model.reparam if kind == "repriorised" else model.repriorised.reparam
    assert reparam.training_data[0] is X  # keyword data too (they were skipped)
    model.set_training_data(X[:5], y[:5])
    threads = torch.get_num_threads()
    pyro.set_rng_seed(11)
    result = run_chains(model, (X, y), num_chains=2, num_samples=5, warmup_steps=5, processes=1, progress=True)
    # in-process chains leave the caller's threads and random state alone
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == torch.float64
    after = torch.rand(3)
    pyro.set_rng_seed(11)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)
    reparam = model.reparam if kind == "repriorised" else model.repriorised.reparam
    assert reparam.training_data[0] is X and reparam.training_data[1] is y
    assert Predictive(model, result.get_samples())(X[:3])["y"].shape == (10, 3)
    err = capsys.readouterr().err
    assert "chain 1/2 sample" in err and "chain 2/2 sample" in err and "acc. prob" in err


def test_a_failing_chain_is_named():
    def broken():
        pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
        raise ValueError("model broke")

    with pytest.raises(ValueError, match="model broke") as info:  # the type and message are kept
        run_chains(broken, num_chains=2, num_samples=2, warmup_steps=2, processes=1, progress=False, seed=5)
    if sys.version_info >= (3, 11):  # exception notes
        assert info.value.__notes__ == ["in chain 1 of 2 (seed 5)"]


def _fails_in_chain_0():
    """Chain 0 (seed 5) fails at once; chain 1 (seed 6) would take minutes."""
    pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
    if torch.initial_seed() == 5:  # run_chains seeds chain c with seed + c
        raise ValueError("model broke")
    time.sleep(0.05)


def test_a_failing_chain_stops_the_others():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="model broke") as info:
        run_chains(_fails_in_chain_0, num_chains=2, num_samples=1000, warmup_steps=1000, processes=2,
                   progress=False, seed=5)  # fmt: skip
    assert time.perf_counter() - start < 60  # chain 1 alone: > 2000 model calls x 0.05 s
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["in chain 1 of 2 (seed 5)"]
