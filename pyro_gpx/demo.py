"""End-to-end demo: a Pyro regression model, NUTS and SVI, diagnosed with ArviZ through pyro-gpx.

Run ``python -m pyro_gpx.demo --out demo_output`` (or ``make demo``). It fits a Bayesian
basis-function regression with unknown noise to 1-d data with a gap, with NUTS (two
chains) and with an ``AutoNormal`` guide, converts both with
:func:`pyro_gpx.diagnostics.to_inference_data`, prints ArviZ summaries and LOO, saves the NUTS
result as netCDF and writes plots of the predictive bands and the traces.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import arviz as az
import matplotlib
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

from ._random import seeded
from .bnn import run_chains
from .datasets import gap_regression
from .diagnostics import (
    from_netcdf,
    get_group,
    loo_elpd,
    plot_trace,
    to_inference_data,
    to_netcdf,
)
from .svi import fit_svi

CENTERS = torch.linspace(-2.5, 2.5, 12, dtype=torch.float64)
LENGTHSCALE = 0.5


def basis_regression(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Bayesian RBF-basis regression with unknown noise; shape-safe, so ArviZ conversion is batched."""
    weights = pyro.sample("weights", dist.Normal(torch.zeros(len(CENTERS), dtype=x.dtype), 1.0).to_event(1))
    bias = pyro.sample("bias", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(0.5, dtype=x.dtype)))
    # batch dims of latents sit left of the data plate: weights (..., 1, centers), bias (..., 1)
    features = torch.exp(-0.5 * ((x.unsqueeze(-1) - CENTERS) / LENGTHSCALE) ** 2)
    f = (features * weights).sum(-1) + bias
    with pyro.plate("data", x.shape[0]):
        pyro.deterministic("f", f, event_dim=0)
        pyro.sample("y", dist.Normal(f, sigma), obs=y)


def _bands(model, samples, x):
    f = Predictive(model, posterior_samples=samples, return_sites=["f"])(x)["f"]
    f = f.reshape(-1, x.shape[0])
    lo, hi = torch.quantile(f, torch.tensor([0.025, 0.975], dtype=f.dtype), dim=0)
    return f.mean(0), lo, hi


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def _loo(idata) -> tuple[tuple[float, float], bool]:
    """PSIS-LOO, and whether ArviZ warned about large Pareto k (its other warnings pass through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = loo_elpd(idata)
    flagged = False
    for w in caught:
        if "Pareto" in str(w.message):
            flagged = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, flagged


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the NUTS and SVI ``InferenceData`` and the divergence count. It runs in a
    param store scope of its own and gives the caller's random states back; plots use matplotlib's
    non-interactive ``Agg`` backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="directory for plots and the netCDF file")
    parser.add_argument(
        "--num-samples", type=_positive_int, default=300, help="NUTS draws (and warm-up steps) per chain"
    )
    parser.add_argument("--svi-steps", type=_positive_int, default=2000)
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (0 to 2**32 - 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    matplotlib.use("Agg")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with pyro.get_param_store().scope(), seeded(args.seed):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> dict:
    import matplotlib.pyplot as plt

    data = gap_regression(n=60, seed=args.seed)
    x, y = data.X[:, 0], data.y
    x_grid = data.X_grid[:, 0]

    print(f"data: {len(x)} points on [-2, 2] with no data in (-0.5, 0.8)")
    t0 = time.perf_counter()
    # two chains in this process, each recording its per-draw statistics (Pyro's MCMC(num_chains=2) runs them in
    # worker processes on machines with 3 or more cores, where a hook's records stay behind)
    nuts_options = {"full_mass": True, "jit_compile": True, "ignore_jit_warnings": True}
    chains = run_chains(basis_regression, (x, y), num_chains=2, num_samples=args.num_samples,
                        warmup_steps=args.num_samples, kernel_kwargs=nuts_options, seed=args.seed, processes=1,
                        progress=not args.no_progress)  # fmt: skip
    nuts_seconds = time.perf_counter() - t0
    idata_nuts = chains.to_inference_data(basis_regression, (x, y), posterior_predictive=True, constant_data={"x": x})

    t0 = time.perf_counter()
    guide = AutoNormal(basis_regression)
    optim = pyro.optim.Adam({"lr": 0.02})  # type: ignore[attr-defined]  # pyro.optim makes Adam at import time
    fit_svi(basis_regression, guide, x, y, num_steps=args.svi_steps, optim=optim, progress=not args.no_progress)
    svi_seconds = time.perf_counter() - t0
    idata_svi = to_inference_data(guide, model=basis_regression, model_args=(x, y), num_samples=1000)

    var_names = ["bias", "sigma", "weights"]
    print(f"\nNUTS ({nuts_seconds:.1f} s, 2 chains x {args.num_samples} draws):")
    print(az.summary(idata_nuts, var_names=var_names).to_string())
    divergences = int(get_group(idata_nuts, "sample_stats")["diverging"].sum())
    grads = int(get_group(idata_nuts, "sample_stats")["n_steps"].sum())
    print(f"divergences: {divergences}; gradient evaluations after warm-up: {grads}")
    print(f"\nAutoNormal ({svi_seconds:.1f} s, {args.svi_steps} steps):")
    print(az.summary(idata_svi, var_names=var_names, kind="stats").to_string())
    (elpd_nuts, se_nuts), flagged_nuts = _loo(idata_nuts)
    (elpd_svi, _), flagged_svi = _loo(idata_svi)
    print(f"\nPSIS-LOO elpd: NUTS {elpd_nuts:.2f} (se {se_nuts:.2f}), AutoNormal {elpd_svi:.2f}")
    for name, flagged in (("NUTS", flagged_nuts), ("AutoNormal", flagged_svi)):
        if flagged:  # ArviZ's own warning, in one line
            print(f"  {name}: ArviZ flags a Pareto k above its threshold (LOO is less reliable for those points)")

    nc_path = to_netcdf(idata_nuts, out / "demo_nuts.nc")
    reloaded = from_netcdf(nc_path)
    same = bool((get_group(reloaded, "log_likelihood")["y"] == get_group(idata_nuts, "log_likelihood")["y"]).all())
    print(f"saved {nc_path}; reloaded identical: {same}")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(-0.5, 0.8, color="0.93", label="no data")
    ax.plot(x_grid, data.f_grid, "k--", lw=1, label="truth")
    nuts_samples = chains.get_samples()
    svi_samples = {k: torch.as_tensor(get_group(idata_svi, "posterior")[k].values[0]) for k in nuts_samples}
    for label, samples, color in (("NUTS", nuts_samples, "C0"), ("AutoNormal", svi_samples, "C1")):
        mean, lo, hi = _bands(basis_regression, samples, x_grid)
        ax.plot(x_grid, mean, color=color, label=f"{label} mean")
        ax.fill_between(x_grid, lo, hi, color=color, alpha=0.2, label=f"{label} 95% band of f")
    ax.plot(x, y, "k.", ms=4, label="data")
    ax.set(xlabel="x", ylabel="y", title="Posterior of f: NUTS vs mean-field SVI")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "demo_predictive.png", dpi=120)
    plt.close(fig)
    plot_trace(idata_nuts, var_names=var_names)
    plt.gcf().savefig(out / "demo_trace.png", dpi=100)
    plt.close("all")
    print(f"plots: {out / 'demo_predictive.png'}, {out / 'demo_trace.png'}")
    return {"nuts": idata_nuts, "svi": idata_svi, "divergences": divergences}


def cli() -> None:
    """The ``pyro-gpx-demo`` command (exit status 0; ``main`` returns results for Python callers)."""
    main()


if __name__ == "__main__":
    cli()
