"""Probe: which kernel family the exact likelihood picks, and how each family's exact GP covers.

The exact GP (dense float64 Cholesky, zero mean, ARD kernels initialised as ``gp_uci.make_kernel``)
is fitted by L-BFGS to convergence on a seeded random subset of one split's training points, once
per kernel family, with the noise variance allowed down to ``--noise-floor``; each fit is scored by
its exact log marginal likelihood per point and on the whole test set. It separates what the model
family does to the predictive intervals from what any approximation does (issue 3: bike's coverage).
About 4 minutes per family at 3 000 points on one core.

    python benchmarks/gp_kernel_family_probe.py --dataset bike --n 3000 --kernels matern1.5,matern2.5,rbf --out a.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gpytorch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gp_uci  # noqa: E402

from pyro_gpx.datasets import load_uci  # noqa: E402


def fit_family(split, X, y, family: str, noise_floor: float, max_evals: int) -> dict:
    """Type-II maximum likelihood for one family on ``X, y``; test metrics and interval scales."""
    kernel = gp_uci.make_kernel(split.dim, family, torch.float64)
    constraint = gpytorch.constraints.GreaterThan(noise_floor)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=constraint).double()
    likelihood.noise = 0.1
    params = [*kernel.parameters(), *likelihood.parameters()]
    start = time.perf_counter()
    evals, loss = gp_uci._converge_lbfgs(params, lambda: gp_uci._exact_loss(kernel, likelihood, X, y), max_evals,
                                         family)  # fmt: skip
    noise = float(likelihood.noise)
    with torch.no_grad():
        mean, var = gp_uci.exact_moments(gp_uci.KernelFn(kernel), X, y, split.X_test.double(), noise)
    var = var.clamp_min(0)
    return {"kernel": family, "n": len(y), "log_marginal_likelihood_per_point": -loss, "evaluations": evals,
            "seconds": time.perf_counter() - start, "noise": noise, **gp_uci._metrics(split, mean, var + noise),
            **gp_uci.interval_scales(split, mean, var), **gp_uci._kernel_hypers(kernel)}  # fmt: skip


def main(argv=None):
    parser = gp_uci.probe_parser(__doc__.splitlines()[0], "bike", "gp_kernel_family_probe.json")
    parser.add_argument("--n", type=int, default=3000, help="random training points used (seeded by the split)")
    parser.add_argument(
        "--kernels", default="matern1.5,matern2.5,rbf", help=f"from {', '.join(gp_uci.KERNEL_FAMILIES)}"
    )
    parser.add_argument("--noise-floor", type=float, default=1e-9)
    parser.add_argument("--max-evals", type=int, default=300)
    args = gp_uci.probe_args(parser, argv)
    if args.n < 2 or not args.noise_floor > 0:
        raise ValueError(f"--n must be >= 2 and --noise-floor positive, got {args.n} and {args.noise_floor}")
    split = load_uci(args.dataset, args.split, args.data_dir, dtype=torch.float64, seed=args.split)
    idx = torch.randperm(split.n_train, generator=torch.Generator().manual_seed(args.split))[: args.n]
    X, y = split.X_train[idx].double(), split.y_train[idx].double()
    out = []
    for family in args.kernels.split(","):
        out.append({"dataset": args.dataset, "split": args.split, **fit_family(split, X, y, family, args.noise_floor,
                                                                              args.max_evals)})  # fmt: skip
        print(json.dumps({k: v for k, v in out[-1].items() if k != "lengthscale"}), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
