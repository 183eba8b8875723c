"""Differential GPs (point and fully Bayesian flow hyperparameters) vs GPyTorch SVGP and a 2-layer deep GP.

Methods, one run, same split, same inducing-point initialisation (k-means, M = 100 per GP), same
optimiser (Adam), minibatch size and number of passes over the data (``--steps`` rounded up to whole
passes of ceil(n / batch) minibatches), float32:

* ``GPyTorch SVGP`` and ``GPyTorch DGP-2`` (doubly stochastic, Salimbeni & Deisenroth 2017; see
  ``deep_gp_peers.py``);
* ``DiffGP`` (ours): flow GP (ARD RBF per dimension; ``--flow-kernel shared`` for one kernel, as in
  Hegde et al.'s public code) integrated with torchsde (5 Euler-Maruyama steps to T = 1, 3 paths),
  SVGP output layer, ``InducingNormal`` guide, ``TraceMeanField_ELBO`` (closed-form KL terms);
* ``DiffGP-FB`` (ours): the same with log-normal priors on the flow lengthscales and output scales;
  the guide is ``AutoDiffusion`` (PIS, no score input) over those hyperparameters beside
  ``InducingNormal`` over the inducing outputs, ``TraceMeanField_ELBO`` (closed-form KL for the
  inducing outputs, Monte Carlo for the hyperparameters).

Test NLL is in original target units; DiffGP predictions average over guide draws and flow paths
(a Gaussian mixture, log-mean-exp).

    python benchmarks/diffgp.py --out benchmarks/results/diffgp.json [--quick] [--datasets yacht --splits 0]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deep_gp_peers  # noqa: E402
import harness  # noqa: E402

from pyro_gpx.datasets import load_uci  # noqa: E402
from pyro_gpx.diffgp import (  # noqa: E402
    DifferentialGP,
    DiffGPPrediction,
    FlowKernel,
    InducingNormal,
    default_flow_kernel,
    predict,
)
from pyro_gpx.diffusion import AutoDiffusion  # noqa: E402
from pyro_gpx.metrics import gaussian_coverage, mixture_gaussian_nll, rmse  # noqa: E402

GAL = ["bostonHousing", "concrete", "energy", "naval-propulsion-plant", "power-plant", "protein-tertiary-structure",
       "wine-quality-red", "yacht"]  # fmt: skip
DTYPE = torch.float32
HYPER = ["flow.lengthscale", "flow.outputscale"]
INDUCING = ["flow_inducing", "output_inducing"]


def _config(n: int, args) -> dict:
    steps = 150 if args.quick else args.steps
    batch = min(args.batch, n)
    # whole passes for every method: the last minibatch of a pass is short, so a pass is ceil(n / batch)
    # steps (counting n / batch made the peers' epochs 1.85x the DiffGP steps on yacht)
    epochs = max(1, math.ceil(steps / math.ceil(n / batch)))
    return {"steps": steps, "batch": batch, "epochs": epochs, "lr": args.lr, "inducing": args.inducing,
            "paths": args.paths, "flow_steps": args.flow_steps, "horizon": args.horizon,
            "flow_kernel": args.flow_kernel}  # fmt: skip


def _diffgp(split, cfg, seed: int, bayesian: bool) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    X, y = split.X_train.to(DTYPE), split.y_train.to(DTYPE)
    n = len(y)
    priors = {}
    if bayesian:  # centred on the point model's initial values (lengthscale sqrt(D), output scale 0.1)
        priors = {"lengthscale_prior": dist.LogNormal(0.5 * math.log(split.dim), 1.0),
                  "outputscale_prior": dist.LogNormal(math.log(0.1), 1.0)}  # fmt: skip
    kernel = default_flow_kernel(split.dim, shared=cfg["flow_kernel"] == "shared", dtype=DTYPE)
    flow = FlowKernel(split.dim, kernel, dtype=DTYPE, **priors)
    model = DifferentialGP(X, num_inducing=cfg["inducing"], flow=flow, noise=0.01, num_paths=cfg["paths"],
                           num_steps=cfg["flow_steps"], horizon=cfg["horizon"], seed=seed)  # fmt: skip
    if bayesian:
        guide = AutoGuideList(model)
        guide.append(AutoDiffusion(poutine.block(model, expose=HYPER), num_steps=8, hidden=64, use_score=False,
                                   init_scale=0.1, drift_clip=5.0))  # fmt: skip
        guide.append(InducingNormal(poutine.block(model, expose=INDUCING)))
    else:
        guide = InducingNormal(model)
    # closed-form KL terms for the inducing outputs (a Monte Carlo KL over ~10^3 dimensions is far noisier)
    loss = TraceMeanField_ELBO(max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": cfg["lr"]}), loss)
    gen = torch.Generator().manual_seed(seed)
    done, start = 0, time.perf_counter()
    for _ in range(cfg["epochs"]):  # the peers' passes (deep_gp_peers._train)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg["batch"]):
            idx = perm[i : i + cfg["batch"]]
            value = svi.step(X[idx], y[idx], num_data=n)
            if not math.isfinite(value):
                raise FloatingPointError(f"DiffGP{'-FB' if bayesian else ''}: non-finite loss at step {done}")
            done += 1
    seconds = time.perf_counter() - start
    locs, vars_ = [], []
    for chunk in split.X_test.to(DTYPE).split(2048):
        pred = predict(model, guide, chunk, num_samples=10)
        locs.append(pred.loc)
        vars_.append(pred.var)
    original = DiffGPPrediction(loc=split.y_scaler.inverse(torch.cat(locs, -1).double()),
                                var=split.y_scaler.inverse_variance(torch.cat(vars_, -1).double()))  # fmt: skip
    y_test = split.y_test_original.double()
    loc, var, mean, total_var = original.loc, original.var, original.mean, original.variance
    epochs = cfg["epochs"]
    return {"rmse": rmse(mean, y_test), "nll": mixture_gaussian_nll(loc, var, y_test),
            "coverage95": gaussian_coverage(mean, total_var, y_test), "train_seconds": seconds,
            "seconds_per_epoch": seconds / epochs, "epochs": epochs, "optimisation_steps": done}  # fmt: skip


def run_split(split, cfg, seed: int):
    peer = {"epochs": cfg["epochs"], "batch": cfg["batch"], "lr": cfg["lr"], "num_inducing": cfg["inducing"],
            "seed": seed, "dtype": DTYPE}  # fmt: skip
    steps = {"optimisation_steps": cfg["epochs"] * math.ceil(split.n_train / cfg["batch"])}
    yield "GPyTorch SVGP", "peer", {**deep_gp_peers.run_svgp(split, **peer), **steps}
    yield "GPyTorch DGP-2", "peer", {**deep_gp_peers.run_dgp(split, num_samples=cfg["paths"], **peer), **steps}
    yield "DiffGP", "ours", _diffgp(split, cfg, seed, bayesian=False)
    yield "DiffGP-FB", "ours", _diffgp(split, cfg, seed, bayesian=True)


def main(argv=None):
    def extra(parser):
        parser.add_argument("--steps", type=int, default=1500,
                            help="optimisation steps per method, rounded up to whole passes")  # fmt: skip
        parser.add_argument("--batch", type=int, default=256)
        parser.add_argument("--lr", type=float, default=0.01)
        parser.add_argument("--inducing", type=int, default=100)
        parser.add_argument("--paths", type=int, default=3, help="flow paths (DiffGP) / samples (DGP) per input")
        parser.add_argument("--flow-steps", type=int, default=5, help="Euler-Maruyama steps of the flow")
        parser.add_argument("--horizon", type=float, default=1.0, help="flow time T")
        parser.add_argument("--flow-kernel", choices=["shared", "per-dim"], default="per-dim",
                            help="one ARD RBF for all flow outputs, or one per input dimension")  # fmt: skip

    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=GAL, default_splits=[0, 1, 2],
                              quick_datasets=["yacht"], quick_splits=[0], argv=argv, extra=extra)  # fmt: skip
    records = []
    for dataset in args.datasets:
        for split_id in args.splits:
            split = load_uci(dataset, split_id, args.data_dir)
            cfg = _config(split.n_train, args)
            for method, role, metrics in run_split(split, cfg, args.seed + split_id):
                metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
                records.append(harness.record("diffgp", dataset, split_id, method, role, n_train=split.n_train,
                                              steps=cfg["steps"], flow_steps=cfg["flow_steps"],
                                              flow_kernel=cfg["flow_kernel"], **metrics))  # fmt: skip
                shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                print(f"{dataset:>28} {split_id} {method:>16}: {shown}", flush=True)
                harness.write_json(records, args.out)
    harness.report(records, ["rmse", "nll", "coverage95", "seconds_per_epoch", "train_seconds"], args.markdown)
    return records


if __name__ == "__main__":
    main()
