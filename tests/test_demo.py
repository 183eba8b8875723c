"""The main job (``make demo``) end to end at a small size, on the installed ArviZ."""

import numpy as np
import pyro
import pyro.infer.mcmc.api
import torch

from pyro_gpx.demo import main
from pyro_gpx.diagnostics import from_netcdf, get_group, group_names


def test_demo_runs_and_saves(tmp_path, capsys, monkeypatch):
    # as on a machine with 8 cores, where Pyro's MCMC(num_chains=2) ran the chains in worker processes and the
    # sampler statistics stayed there (KeyError 'n_steps')
    monkeypatch.setattr(pyro.infer.mcmc.api.mp, "cpu_count", lambda: 8)
    pyro.param("callers_parameter", torch.tensor(1.5))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = tmp_path / "demo"
    result = main(["--out", str(out), "--num-samples", "30", "--svi-steps", "50", "--no-progress"])
    # the caller's parameters and random stream are left alone
    assert list(pyro.get_param_store().keys()) == ["callers_parameter"]
    assert torch.equal(torch.get_rng_state(), rng)
    printed = capsys.readouterr().out
    assert "PSIS-LOO elpd: NUTS" in printed and "reloaded identical: True" in printed
    assert "gradient evaluations after warm-up" in printed
    assert {p.name for p in out.iterdir()} == {"demo_nuts.nc", "demo_predictive.png", "demo_trace.png"}
    assert get_group(result["nuts"], "posterior").sizes["draw"] == 30
    back = from_netcdf(out / "demo_nuts.nc")
    assert group_names(back) == group_names(result["nuts"])
    np.testing.assert_array_equal(get_group(back, "posterior")["sigma"].values,
                                  get_group(result["nuts"], "posterior")["sigma"].values)  # fmt: skip
