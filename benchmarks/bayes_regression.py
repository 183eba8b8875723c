"""Bayesian linear regression on UCI sets: Pyro's AutoNormal and AutoMultivariateNormal vs NUTS.

The harness's proof benchmark. Every method fits the same Pyro model on the same standardised
split; test metrics are in original target units. NUTS's convergence diagnostics (bulk ESS, R-hat,
ESS per gradient evaluation) come from ``pyro_gpx.diagnostics.to_inference_data`` with the
``SampleStatsRecorder`` statistics of ``pyro_gpx.bnn.run_chains``.

    python benchmarks/bayes_regression.py --out benchmarks/results/bayes_regression.json [--quick]
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import arviz as az
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from pyro_gpx.bnn import run_chains  # noqa: E402
from pyro_gpx.datasets import load_uci  # noqa: E402
from pyro_gpx.diagnostics import get_group, to_inference_data  # noqa: E402
from pyro_gpx.metrics import mixture_gaussian_nll, rmse, sample_coverage  # noqa: E402
from pyro_gpx.svi import fit_svi  # noqa: E402

BENCHMARK = "bayes_regression"


def linear_model(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """w ~ N(0, I), b ~ N(0, 1), sigma ~ HalfNormal(1), y ~ N(Xw + b, sigma^2); shape-safe."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=X.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1) + b, sigma), obs=y)


def _test_metrics(split, samples: dict[str, torch.Tensor]) -> dict[str, float]:
    w, b, sigma = samples["w"], samples["b"], samples["sigma"]
    mean = w @ split.X_test.T + b[:, None]  # (S, n_test), standardised units
    scale = split.y_scaler.std
    means = split.y_scaler.inverse(mean)
    variances = (sigma[:, None] * scale) ** 2
    y = split.y_test_original
    gen = torch.Generator().manual_seed(0)
    predictive = means + variances.sqrt() * torch.randn(means.shape, generator=gen, dtype=means.dtype)
    return {
        "rmse": rmse(means.mean(0), y),
        "nll": mixture_gaussian_nll(means, variances, y),
        "coverage95": sample_coverage(predictive, y, 0.95),
    }


def run_nuts(split, num_samples: int, seed: int) -> dict:
    # two chains in this process, each recording its statistics (Pyro's MCMC(num_chains=2) would run them in
    # worker processes on a machine with 3 or more cores, where the recorder sees nothing)
    options = {"full_mass": True, "jit_compile": True, "ignore_jit_warnings": True}
    with harness.measure() as m:
        chains = run_chains(linear_model, (split.X_train, split.y_train), num_chains=2, num_samples=num_samples,
                            warmup_steps=num_samples, kernel_kwargs=options, seed=seed, processes=1,
                            progress=False)  # fmt: skip
    idata = chains.to_inference_data(linear_model, (split.X_train, split.y_train), log_likelihood=False)
    summary = az.summary(idata, var_names=["w", "b", "sigma"], kind="diagnostics")
    grads = float(get_group(idata, "sample_stats")["n_steps"].sum())
    ess_min = float(summary["ess_bulk"].min())
    return {
        **_test_metrics(split, chains.get_samples()),
        "train_seconds": m.seconds,
        "peak_rss_mb": m.peak_rss_mb,
        "ess_bulk_min": ess_min,
        "rhat_max": float(summary["r_hat"].max()),
        "num_grads": grads,
        "ess_per_grad_min": ess_min / grads,
        "ess_per_second_min": ess_min / m.seconds,
        "divergences": int(get_group(idata, "sample_stats")["diverging"].sum()),
    }


def run_svi(split, guide_cls, num_steps: int, num_samples: int, seed: int) -> dict:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = guide_cls(linear_model)
    optim = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / num_steps)})
    with harness.measure() as m:
        fit_svi(linear_model, guide, split.X_train, split.y_train, num_steps=num_steps, optim=optim, progress=False)
    idata = to_inference_data(guide, model=linear_model, model_args=(split.X_train, split.y_train),
                              num_samples=num_samples, log_likelihood=False, observed_data=False)  # fmt: skip
    post = get_group(idata, "posterior")
    samples = {k: torch.as_tensor(post[k].values[0]) for k in ("w", "b", "sigma")}
    return {**_test_metrics(split, samples), "train_seconds": m.seconds, "peak_rss_mb": m.peak_rss_mb}


def main(argv=None) -> list[dict]:
    args = harness.parse_args(
        __doc__.splitlines()[0],
        default_datasets=["concrete", "energy", "yacht", "bostonHousing", "wine-quality-red"],
        default_splits=list(range(20)),
        quick_datasets=["concrete", "yacht"],
        quick_splits=[0, 1],
        argv=argv,
    )
    torch.set_default_dtype(torch.float64)
    num_samples = 300 if args.quick else 1000
    num_steps = 1500 if args.quick else 2500
    methods = {
        "NUTS": lambda s: run_nuts(s, num_samples, args.seed),
        "AutoNormal": lambda s: run_svi(s, AutoNormal, num_steps, 1000, args.seed),
        "AutoMultivariateNormal": lambda s: run_svi(s, AutoMultivariateNormal, num_steps, 1000, args.seed),
    }
    records = []
    for dataset in args.datasets:
        for split_id in args.splits:
            split = load_uci(dataset, split_id, args.data_dir)
            for method, run in methods.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run(split)
                records.append(harness.record(BENCHMARK, dataset, split_id, method, "peer", n_train=split.n_train,
                                              **result))  # fmt: skip
                print(f"{dataset:>18} split {split_id:2d} {method:>22}: RMSE {result['rmse']:.3f} "
                      f"NLL {result['nll']:.3f} cov {result['coverage95']:.2f} "
                      f"{result['train_seconds']:.1f}s", flush=True)  # fmt: skip
            harness.write_json(records, args.out)
    table = harness.markdown_table(
        records, ["rmse", "nll", "coverage95", "train_seconds", "ess_per_grad_min", "rhat_max"]
    )
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    assert all(math.isfinite(r["nll"]) for r in records)
    return records


if __name__ == "__main__":
    main()
