"""Probe: the exact GP's test NLL at CaGP-Opt's trained lengthscales, for three choices of (outputscale, noise).

Trains CaGP-Opt as ``gp_uci.py`` does (90 s by default, ELBO noise refit), then forms the whole
training kernel matrix in float64 and eigendecomposes it (about 9 minutes at n = 15 000 on two
cores, 3.6 GB). With K = Q diag(lam) Q^T every (a, noise) costs O(n): the exact posterior of
a K + noise I at the test points and the exact log marginal likelihood. Records the test metrics at
the trained and the ELBO-refit noise (a = 1), at the exact likelihood's maximiser, and the best
point of a grid scored on the test set (an oracle, for reference only).

    python benchmarks/gp_mll_probe.py --dataset elevators --split 0 --out a.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gp_uci  # noqa: E402


def main(argv=None):
    parser = gp_uci.probe_parser(__doc__.splitlines()[0], "elevators", "gp_mll_probe.json")
    args = gp_uci.probe_args(parser, argv)
    refine = gp_uci._refine_policy(argparse.Namespace(refine_iters=20))
    split, res, gp = gp_uci.probe_fit(args, refine, refit_noise=True)
    kept = ("nll", "rmse", "coverage95", "noise", "noise_refit", "outputscale")
    out = {"dataset": args.dataset, "split": args.split, "cagp": {k: res[k] for k in kept}}
    with torch.no_grad():
        kernel, X = gp.marginal().kernel, gp.X
        r = gp.y.double() - gp._prior_mean(X).double()
        evals, Q = torch.linalg.eigh(kernel(X, X).double())
        evals = evals.clamp_min(0)
        rho = Q.T @ r
        KsQ = kernel(split.X_test, X).double() @ Q
        del Q
        kss = kernel.diag(split.X_test).double()
        mean_s = gp._prior_mean(split.X_test).double()
    n = len(r)

    def profile(tau):  # the log likelihood maximised over a at tau = noise / a, and that a
        a = float((rho**2 / (evals + tau)).sum()) / n
        return -0.5 * (n + n * math.log(a) + float(torch.log(evals + tau).sum()) + n * math.log(2 * math.pi)), a

    def predict(a, noise):
        tau = noise / a
        mean = mean_s + KsQ @ (rho / (evals + tau))
        var = a * (kss - (KsQ**2 / (evals + tau)).sum(1)).clamp_min(0) + noise
        return gp_uci._metrics(split, mean, var)

    taus = torch.logspace(-5, 1, 241, dtype=torch.float64).tolist()
    values = [profile(t) for t in taus]
    best = max(range(len(taus)), key=lambda i: values[i][0])
    tau, (log_lik, a) = taus[best], values[best]
    out["mll_choice"] = dict(a=a, noise=a * tau, log_lik_per_point=log_lik / n, **predict(a, a * tau))
    out["at_trained"] = dict(a=1.0, noise=res["noise"], **predict(1.0, res["noise"]))
    out["at_elbo_refit"] = dict(a=1.0, noise=res["noise_refit"], **predict(1.0, res["noise_refit"]))
    grid = [dict(a=a_, noise=s, **predict(a_, s)) for a_ in (0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0, 8.0)
            for s in torch.logspace(-3, 0, 16, dtype=torch.float64).tolist()]  # fmt: skip
    out["test_oracle"] = min(grid, key=lambda g: g["nll"])
    for key, value in out.items():
        print(key, value, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
