"""Plain vs repriorised NUTS (and HMC) on Bayesian MLPs: ESS per gradient evaluation and per second.

Same model, seeds, chains and number of draws for every method, float64, 4 chains in separate
processes. "collapsed" samplers run on the readout's marginal likelihood (hidden weights and noise
only) and draw the readout exactly at each kept draw. Effective sample sizes are measured in the
*original* weight space (hidden weights and readout; the repriorised readout is mapped back) and on
100 random projections of the test predictions; R-hat over the 4 chains; test RMSE/NLL of the
posterior predictive (original units).

    python benchmarks/bnn_mcmc.py --out benchmarks/results/bnn_mcmc.json [--quick]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer.mcmc.util import initialize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from pyro_gpx.bnn import BayesianMLP, run_chains  # noqa: E402
from pyro_gpx.datasets import gap_regression, load_uci  # noqa: E402
from pyro_gpx.diagnostics import evaluate_draws, inspect_model  # noqa: E402
from pyro_gpx.metrics import mixture_gaussian_nll, rmse  # noqa: E402


class _Synthetic:
    """The 1-d gap regression set, standardised like the UCI loaders."""

    def __init__(self, seed: int):
        data = gap_regression(n=200, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        test_x = torch.rand(100, generator=gen, dtype=torch.float64) * 4 - 2
        noise = data.noise_std * torch.randn(100, generator=gen, dtype=torch.float64)
        test_y = torch.sin(3 * test_x) + 0.3 * test_x + noise
        self.X_train, self.y_train = data.X, data.y
        self.X_test, self.y_test = test_x[:, None], test_y
        self.y_test_original = test_y
        self.n_train, self.dim = 200, 1

        class _Identity:
            std = torch.tensor(1.0, dtype=torch.float64)

            @staticmethod
            def inverse(z):
                return z

            @staticmethod
            def inverse_variance(v):
                return v

        self.y_scaler = _Identity()


def _original_space(model, samples_by_chain, X, y):
    """Hidden weights and readout (mapped back for the repriorised model), ``(chain, draw, ...)``."""
    C, S = next(iter(samples_by_chain.values())).shape[:2]
    flat = {k: v.reshape((C * S,) + v.shape[2:]) for k, v in samples_by_chain.items()}
    structure = inspect_model(model, {k: v[0] for k, v in flat.items()}, (X, y))
    evaluation = evaluate_draws(model, flat, structure, (X, y), sites=["readout"])
    weights = {k: v for k, v in flat.items() if k.startswith("layers") or k == "noise"}
    weights["readout"] = evaluation.values["readout"]
    return {k: v.reshape((C, S) + v.shape[1:]) for k, v in weights.items()}


def _predictions(bnn, weights, X_test):
    """``(chain, draw, n_test)`` latent function values."""
    C, S = weights["readout"].shape[:2]
    out = torch.empty(C, S, X_test.shape[0], dtype=torch.float64)
    for c in range(C):
        for s in range(S):
            params = {k: v[c, s] for k, v in weights.items() if k.startswith("layers")}
            out[c, s] = (bnn.features(X_test, params) @ weights["readout"][c, s].T)[:, 0]
    return out


def _ess_stats(arrays: dict[str, np.ndarray], block: int = 4096) -> dict:
    """Minimum and median bulk ESS, maximum R-hat and the share of R-hat above 1.01 over every scalar of
    ``(chain, draw, ...)`` arrays, the same R-hat statistics of matched independent chains
    (:func:`_chance_rhat`), and the minimum bulk ESS of each array (``mins``). Scalars are taken
    ``block`` at a time, so the memory on top of the draws stays bounded at long runs (ArviZ's rank
    normalisation copies its input several times)."""
    flat = {k: a.reshape(a.shape[0], a.shape[1], -1) for k, a in arrays.items()}
    ess_by_key, rhats = {}, []
    for key, a in flat.items():
        parts = []
        for start in range(0, a.shape[-1], block):
            data = az.convert_to_dataset({"x": np.ascontiguousarray(a[..., start : start + block])})
            parts.append(az.ess(data, method="bulk")["x"].values)
            rhats.append(az.rhat(data)["x"].values)
        ess_by_key[key] = np.concatenate(parts)
    ess, rhat = np.concatenate(list(ess_by_key.values())), np.concatenate(rhats)
    chains, draws = next(iter(flat.values())).shape[:2]
    chance_max, chance_share = _chance_rhat(ess, chains, draws)
    return {"min": float(np.nanmin(ess)), "median": float(np.nanmedian(ess)), "rhat_max": float(np.nanmax(rhat)),
            "rhat_share": float(np.mean(rhat > 1.01)), "chance_rhat_max": chance_max, "chance_rhat_share": chance_share,
            "mins": {k: float(np.nanmin(v)) for k, v in ess_by_key.items()}}  # fmt: skip


def _chance_rhat(ess: np.ndarray, chains: int, draws: int, seed: int = 0, block: int = 2048) -> tuple[float, float]:
    r"""Maximum R-hat and share of R-hat above 1.01 that *perfectly mixed* chains would show: one
    stationary Gaussian AR(1) chain set per scalar, its lag-1 correlation
    :math:`\rho = (1 - r)/(1 + r)` chosen so the bulk ESS matches, :math:`r = \text{ESS}/(\text{chains}
    \cdot \text{draws})` (:math:`\rho < 0` for antithetic chains, ESS above the number of draws).
    Over thousands of weights the largest R-hat exceeds 1.01 by chance alone when ESS is about 1000."""
    gen = np.random.default_rng(seed)
    ratio = np.clip(np.nan_to_num(ess, nan=1.0) / (chains * draws), 1e-3, None)
    rho = np.clip((1 - ratio) / (1 + ratio), -0.95, 0.995)
    maxima, above = [], 0
    for start in range(0, rho.size, block):
        r = rho[start : start + block]
        x = np.empty((chains, draws, r.size))
        x[:, 0] = gen.normal(size=(chains, r.size))
        innovation = np.sqrt(1 - r**2)
        for t in range(1, draws):
            x[:, t] = r * x[:, t - 1] + innovation * gen.normal(size=(chains, r.size))
        rhat = az.rhat(az.convert_to_dataset({"x": x}))["x"].values
        maxima.append(float(rhat.max()))
        above += int((rhat > 1.01).sum())
    return max(maxima), above / rho.size


def _iid_min_ess(count: int, chains: int, draws: int, seed: int = 0, block: int = 16384) -> float:
    """Minimum bulk ESS over ``count`` scalars of *independent* N(0, 1) draws, ``(chains, draws)`` each:
    the minimum over thousands of weights sits well below ``chains * draws`` by estimation noise alone
    (over 8 200 scalars and 4 x 500 draws, about 1 370). Drawn ``block`` scalars at a time."""
    gen = np.random.default_rng(seed)
    minima = []
    for start in range(0, count, block):
        x = gen.normal(size=(chains, draws, min(block, count - start)))
        minima.append(float(az.ess(az.convert_to_dataset({"x": x}), method="bulk")["x"].values.min()))
    return min(minima)


def _gradient_ms(model, X, y, repeats: int = 60) -> float:
    """Median milliseconds of one potential-energy gradient at the initial point, on one thread:
    the cost per gradient without the noise of other jobs sharing the cores during the chains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init, potential_fn, _, _ = initialize_model(model, (X, y))
        params = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
        times = []
        for _ in range(repeats + 5):
            start = time.perf_counter()
            torch.autograd.grad(potential_fn(params), list(params.values()))
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times[5:]))
    finally:
        torch.set_num_threads(threads)


# each sampler's run_chains kernel; every one runs on the plain and on the repriorised model
KERNEL_OF = {"NUTS": "nuts", "HMC": "hmc", "jittered HMC": "jittered_hmc", "split HMC": "split_hmc"}
PREFIXES = ("", "repriorised ", "collapsed ")
ALL_METHODS = tuple(prefix + name for name in KERNEL_OF for prefix in PREFIXES)


def run_config(split, dataset, depth, width, method, args) -> dict:
    kernel = KERNEL_OF[method.removeprefix("repriorised ").removeprefix("collapsed ")]
    bnn = BayesianMLP(split.dim, [width] * depth, noise=None, parameterization="ntk", activation=args.activation)
    collapsed = method.startswith("collapsed")
    integrate_noise = collapsed and args.integrate_noise
    repriorised = method.startswith("repriorised")
    model = bnn.collapsed(integrate_noise) if collapsed else bnn.repriorised() if repriorised else bnn
    nuts = kernel == "nuts"
    kernel_kwargs = {"max_tree_depth": args.max_tree_depth} if nuts else {"trajectory_length": args.hmc_length}
    if kernel in ("jittered_hmc", "split_hmc"):  # the length drawn from U(1 - j, 1 + j) x hmc_length per trajectory
        kernel_kwargs["jitter"] = args.hmc_jitter
    if kernel == "split_hmc":
        kernel_kwargs.update(stages=args.split_stages, gradient_adaptation=args.gradient_adaptation)
    if args.target_accept is not None:  # step-size adaptation target (Pyro's default 0.8)
        kernel_kwargs["target_accept_prob"] = args.target_accept
    X, y = split.X_train, split.y_train
    gradient_ms = _gradient_ms(model, X, y)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    result = run_chains(model, (X, y), num_chains=4, num_samples=args.num_samples, warmup_steps=args.num_samples,
                        kernel=kernel, kernel_kwargs=kernel_kwargs, seed=args.seed, processes=args.processes,
                        progress=False)  # fmt: skip
    wall = time.perf_counter() - start
    samples = dict(result.samples)
    # the plain model has no phi; the collapsed one draws it (and so the readout) exactly at each kept draw
    refreshed = collapsed or (args.refresh_whitened and "readout_whitened" in samples)
    # phi is exactly N(0, I) and independent of the hidden weights and noise a posteriori: a Gibbs
    # refresh of phi at each kept draw is exact and decorrelates the readout from the trajectory
    gen = torch.Generator().manual_seed(args.seed)
    if collapsed:  # the library's exact readout draws (one randn call of shape (chain, draw, D, out))
        model.set_training_data(X, y)
        if integrate_noise:  # the noise of each kept draw from p(noise | hidden weights, y), then the readout
            samples["noise"] = model.noise_draws(samples, gen)
        weights = {**samples, "readout": model.readout_draws(samples, gen)}
    else:
        if refreshed:
            shape = (4, args.num_samples, bnn.feature_dim, bnn.out_dim)
            samples["readout_whitened"] = torch.randn(shape, generator=gen, dtype=torch.float64)
        weights = _original_space(model, samples, X, y)
    f_test = _predictions(bnn, weights, split.X_test)
    gen = np.random.default_rng(args.seed)
    U = gen.normal(size=(split.X_test.shape[0], 100))
    U /= np.linalg.norm(U, axis=0)
    projections = {"proj": np.einsum("csn,nk->csk", f_test.numpy(), U)}
    w_stats = _ess_stats({k: v.numpy() for k, v in weights.items()})
    p_stats = _ess_stats(projections)
    w_min, w_med, rhat_w, w_mins = w_stats["min"], w_stats["median"], w_stats["rhat_max"], w_stats["mins"]
    p_min, p_med, rhat_p = p_stats["min"], p_stats["median"], p_stats["rhat_max"]
    # per group: which part of the posterior limits the minimum (hidden weights, readout, noise)
    by_group = {"ess_hidden_min": min(v for k, v in w_mins.items() if k.startswith("layers")),
                "ess_readout_min": w_mins["readout"], "ess_noise_min": w_mins["noise"]}  # fmt: skip
    grads = float(result.sample_stats["n_steps"].sum())
    chain_seconds = float(sum(result.seconds))
    noise = weights["noise"].reshape(-1)
    means = split.y_scaler.inverse(f_test.reshape(-1, f_test.shape[-1]))
    variances = split.y_scaler.inverse_variance(noise[:, None].expand_as(means))
    y_test = split.y_test_original.double()
    return {
        "ess_bulk_min": w_min, "ess_bulk_median": w_med, "ess_proj_min": p_min, "ess_proj_median": p_med,
        "ess_per_grad_min": w_min / grads, "ess_per_grad_median": w_med / grads,
        "ess_proj_per_grad_min": p_min / grads, "ess_per_second_min": w_min / chain_seconds,
        "ess_proj_per_second_min": p_min / chain_seconds, "gradient_ms": gradient_ms,
        "ess_per_gradient_second_min": w_min / grads / (gradient_ms / 1e3),
        "ess_proj_per_gradient_second_min": p_min / grads / (gradient_ms / 1e3),
        "rhat_max": max(rhat_w, rhat_p), "rhat_weights_max": rhat_w,
        "rhat_proj_max": rhat_p, "num_grads": grads,
        "grads_per_draw": grads / (4 * args.num_samples), "train_seconds": wall,
        "rmse": rmse(means.mean(0), y_test), "nll": mixture_gaussian_nll(means, variances, y_test),
        "divergences": int(result.sample_stats["diverging"].sum()), "width": width, "depth": depth, **by_group,
        # R-hat that perfectly mixed chains with the measured ESS would show (``_chance_rhat``)
        "rhat_weights_share": w_stats["rhat_share"], "rhat_weights_chance_max": w_stats["chance_rhat_max"],
        "rhat_weights_chance_share": w_stats["chance_rhat_share"], "rhat_proj_chance_max": p_stats["chance_rhat_max"],
        # the same minima for independent draws: the floor of a perfectly mixing sampler
        "ess_weights_iid_min": _iid_min_ess(sum(v[0, 0].numel() for v in weights.values()), 4, args.num_samples),
        "ess_proj_iid_min": _iid_min_ess(projections["proj"].shape[-1], 4, args.num_samples, seed=1),
        "hmc_jitter": kernel_kwargs.get("jitter"), "hmc_length": kernel_kwargs.get("trajectory_length"),
        "target_accept": kernel_kwargs.get("target_accept_prob", 0.8), "refresh_whitened": refreshed,
        "integrate_noise": integrate_noise, "ess_min_by_site": w_mins, "activation": args.activation,
        "split_stages": kernel_kwargs.get("stages"), "gradient_adaptation": kernel_kwargs.get("gradient_adaptation"),
    }  # fmt: skip


def main(argv=None):
    def extra(parser):
        parser.add_argument("--widths", default="64,256,1024")
        parser.add_argument("--depths", default="1,2")
        parser.add_argument("--num-samples", type=int, default=200, help="draws (and warm-up steps) per chain")
        parser.add_argument("--max-tree-depth", type=int, default=8)
        parser.add_argument("--max-train", type=int, default=500)
        parser.add_argument("--processes", type=int, default=2)
        help_ = "NUTS only (HMC runs at width 256, depth 1, unless --methods names it)"
        parser.add_argument("--skip-hmc", action="store_true", help=help_)
        parser.add_argument("--hmc-length", type=float, default=2.0, help="HMC trajectory length (unit mass)")
        parser.add_argument("--hmc-jitter", type=float, default=0.5, help="jittered HMC: j in U(1 - j, 1 + j)")
        parser.add_argument("--target-accept", type=float, default=None, help="step-size target (default 0.8)")
        help_ = "repriorised: draw the whitened readout afresh from N(0, I) at each kept draw"
        parser.add_argument("--refresh-whitened", action="store_true", help=help_)
        help_ = "collapsed methods: integrate the noise variance out too (quadrature), draw it after each kept draw"
        parser.add_argument("--integrate-noise", action="store_true", help=help_)
        parser.add_argument("--activation", default="relu", choices=["relu", "gelu", "tanh", "erf"])
        help_ = "split HMC: 1 = Strang (kick, rotate, kick), 2 = two-stage splitting (kick weight 1/6)"
        parser.add_argument("--split-stages", type=int, default=1, choices=[1, 2], help=help_)
        help_ = "split HMC: adapt the reference's scale and centre from draws and gradients (GradientMassMatrix)"
        parser.add_argument("--gradient-adaptation", action="store_true", help=help_)
        parser.add_argument("--methods", default=None, help="comma-separated subset, e.g. 'repriorised HMC'")
        parser.add_argument("--max-hidden-weights", type=int, default=300_000,
                            help="skip configurations with more hidden weights (2 x 1024: a million)")  # fmt: skip

    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=["synthetic", "yacht", "energy", "concrete",
                                                                          "bostonHousing"],
                              default_splits=[0], quick_datasets=["synthetic"], quick_splits=[0], argv=argv,
                              extra=extra)  # fmt: skip
    torch.set_default_dtype(torch.float64)
    widths = [int(w) for w in args.widths.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    if args.quick:  # a check of the whole pipeline in a few minutes (widths 64 and 256 took over 15 on one core)
        widths, depths, args.num_samples = [32], [1], 40
    records = []
    for dataset in args.datasets:
        for split_id in args.splits:
            if dataset == "synthetic":
                split = _Synthetic(split_id)
            else:
                split = load_uci(dataset, split_id, args.data_dir, max_train=args.max_train, seed=split_id)
            for depth in depths:
                for width in widths:
                    hidden = width * split.dim + (depth - 1) * width * width
                    if hidden > args.max_hidden_weights:
                        print(f"skip {dataset} depth {depth} width {width}: {hidden} hidden weights", flush=True)
                        continue
                    methods = ["NUTS", "repriorised NUTS"]
                    if width == 256 and depth == 1 and not args.skip_hmc:
                        methods += ["HMC", "repriorised HMC"]
                    if args.methods:  # an explicit list runs at every width and depth
                        methods = [m for m in ALL_METHODS if m in args.methods.split(",")]
                    for method in methods:
                        pyro.set_rng_seed(args.seed)
                        out = run_config(split, dataset, depth, width, method, args)
                        name = f"{method}{' (noise integrated)' if out['integrate_noise'] else ''} ({depth}x{width})"
                        role = "peer" if method in ("NUTS", "HMC") else "ours"  # jittered / split HMC are ours
                        records.append(harness.record("bnn_mcmc", dataset, split_id, name, role,
                                                      n_train=split.n_train, **out))  # fmt: skip
                        print(f"{dataset:>14} {name:>26}: ESS/grad min {out['ess_per_grad_min']:.2e} "
                              f"(proj {out['ess_proj_per_grad_min']:.2e}) R-hat {out['rhat_weights_max']:.3f} "
                              f"(proj {out['rhat_proj_max']:.3f}; chance {out['rhat_weights_chance_max']:.3f} / "
                              f"{out['rhat_proj_chance_max']:.3f}) "
                              f"grads/draw {out['grads_per_draw']:.0f} NLL {out['nll']:.3f} "
                              f"{out['train_seconds']:.0f}s", flush=True)  # fmt: skip
                        harness.write_json(records, args.out)
    metrics = [
        "ess_per_grad_min",
        "ess_proj_per_grad_min",
        "ess_per_second_min",
        "gradient_ms",
        "rhat_weights_max",
        "rhat_weights_chance_max",
        "rhat_proj_max",
        "nll",
        "rmse",
    ]
    harness.report(records, metrics, args.markdown)
    assert all(math.isfinite(r["nll"]) for r in records)
    return records


if __name__ == "__main__":
    main()
