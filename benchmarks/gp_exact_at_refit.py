"""Probe: CaGP-Opt's refined prediction against the exact GP at the same re-selected hyperparameters.

Trains CaGP-Opt as ``gp_uci.py`` does (``--refit-mll``, 30% reserve, 100 CG iterations, pivot
actions), then conditions the exact GP on all training points with the hyperparameters the refit
chose (dense float64 Cholesky: about 40 s and 4 GB at n = 15 600 on two cores) and scores both on
the test set. What is left between the two is the computational uncertainty of the refined
actions; what the exact GP itself misses (e.g. coverage) is the model's, not the computation's.

    python benchmarks/gp_exact_at_refit.py --dataset bike --split 0 --refit-mll subset-kernel --out a.json

``--lower-noises 1e-8,1e-10`` conditions the exact GP at those noise variances as well (same kernel),
and scores it also at the full-data likelihood's choice of a common multiplier of kernel and noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gp_uci  # noqa: E402


def _condition(gp, kernel, residual, split, noise: float):
    """The exact GP's test mean (prior mean added), latent variance (clipped at 0) and
    :math:`r^\\top (K + \\sigma^2 I)^{-1} r` at noise variance ``noise``."""
    with torch.no_grad():
        mean, var, quad = gp_uci.exact_moments_and_quadratic(kernel, gp.X, residual, split.X_test, noise)
    return mean + gp._prior_mean(split.X_test).double(), var.clamp_min(0), quad


def main(argv=None):
    parser = gp_uci.probe_parser(__doc__.splitlines()[0], "bike", "gp_exact_at_refit.json")
    parser.add_argument("--refit-mll", default="subset-kernel", choices=["subset", "subset-kernel"])
    parser.add_argument("--pivots", type=int, default=1000)
    help_ = "comma-separated noise variances below the refit's at which to condition the exact GP as well"
    parser.add_argument("--lower-noises", default="", help=help_)
    args = gp_uci.probe_args(parser, argv)
    refine = gp_uci._refine_policy(argparse.Namespace(refine_iters=100, refit_mll=args.refit_mll, pivots=args.pivots))
    split, res, gp = gp_uci.probe_fit(args, refine, refit_mll=args.refit_mll, refine_fraction=0.3)
    fit = gp.last_mll_refit
    kept = ("rmse", "nll", "coverage95", "train_seconds", "mll_noise", "mll_outputscale", "mll_lengthscale")
    out = {"dataset": args.dataset, "split": args.split, "refit_mll": args.refit_mll, "pivots": args.pivots,
           "cagp": {k: res[k] for k in kept if k in res}}  # fmt: skip
    kernel = (gp.marginal().kernel if fit.kernel is None else fit.kernel).scaled(fit.multiplier)
    residual = gp.y - gp._prior_mean(gp.X)
    # the refit's own noise first, then the lower ones
    for i, noise in enumerate([fit.noise] + [float(v) for v in args.lower_noises.split(",") if v]):
        key = "exact_at_refit" if i == 0 else f"exact_noise_{noise:g}"
        start = time.perf_counter()
        try:
            mean, var, quad = _condition(gp, kernel, residual, split, noise)
        except torch.linalg.LinAlgError as err:  # the kernel matrix is too ill-conditioned at a lower noise
            if i == 0:
                raise
            out[key] = {"noise": noise, "error": str(err).splitlines()[0]}
            continue
        out[key] = {**gp_uci._metrics(split, mean, var + noise), "seconds": time.perf_counter() - start,
                    **gp_uci.interval_scales(split, mean, var), "noise": noise}  # fmt: skip
        if i > 0:
            # the full-data likelihood's choice of a common multiplier c of kernel and noise: c = r^T (K + s I)^-1 r / n
            c = quad / len(residual)
            out[key].update(mll_multiplier=c, at_mll_multiplier=gp_uci._metrics(split, mean, c * (var + noise)))
    for key, value in out.items():
        print(key, value, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
