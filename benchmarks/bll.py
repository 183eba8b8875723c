"""Bayesian last layers on UCI regression (clean and outlier-rich) and digits classification with OOD.

Methods, one run, same split and feature architecture (one hidden layer of 50 tanh units):

* ``MAP``: the network and a learned noise trained by Adam (the point-estimate baseline); the
  last-layer methods start from its features and train them further (their times include it);
* ``Gaussian BLL``: Gaussian prior (learned scale), full-covariance Gaussian guide, the
  deterministic VBLL-style ELBO (``LastLayerELBO``; classification: ``Trace_ELBO``), features
  trained jointly;
* ``implicit BLL`` (ours): generator prior W = s g~(z), ``AutoDiffusion`` guide over z trained with
  ``PathELBO``, features, generator and s trained jointly; g~ is the learned generator standardised
  to zero mean and unit variance per weight over fixed probe latents (``StandardizedGenerator``), so
  that only the prior's shape is learned and its first two moments are a learned-scale Gaussian
  prior's (``--generator learned``: W = g(z), unconstrained; ``--generator fixed``: the generator
  stays at a centred random initialisation and only s is learned; ``--generator-hidden 16``: a
  smaller generator, which overfits the noisy and outlier-rich sets less);
* ``Gaussian BLL (exact last layer)``: the Gaussian BLL's trained features, noise and
  prior scale with the exact posterior of W (``exact_posterior``) instead of its guide; the Gaussian
  BLL's row records ``elbo_gap``, how far its guide's ELBO is below that optimum (nats, training set);
* ``last-layer NUTS``: NUTS over W with the Gaussian BLL's features and noise frozen.

All SVI methods use minibatches (the ``data`` plate rescales the likelihood) and the same number
of epochs; the last-layer methods' learning rate decays exponentially to ``--lr-final`` (1%) of its
start, so that the guides settle instead of jittering at Adam's step size (with a constant rate the
Gaussian guide's covariance stayed ~10x too large on the data directions, which inflated the learned
noise). The MAP pre-training keeps a constant rate. ``--outliers 0.05`` replaces 5% of the
training targets by heavy-tailed noise (Student-t, 2 dof, scaled by the target's standard
deviation). ``digits`` (scikit-learn) holds out classes 8 and 9 as out-of-distribution.

    python benchmarks/bll.py --out benchmarks/results/bll.json [--quick] [--outliers 0.05]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from pyro_gpx.bll import (  # noqa: E402
    BayesianLastLayer,
    CategoricalHead,
    GaussianHead,
    GaussianWeightPrior,
    ImplicitWeightPrior,
    LastLayerELBO,
    LastLayerNormal,
    exact_posterior,
    log_evidence,
    predict,
)
from pyro_gpx.datasets import load_uci  # noqa: E402
from pyro_gpx.diffusion import AutoDiffusion, PathELBO  # noqa: E402
from pyro_gpx.metrics import auroc, classification_metrics, mixture_gaussian_nll, rmse  # noqa: E402

GAL = ["bostonHousing", "concrete", "energy", "naval-propulsion-plant", "power-plant", "wine-quality-red", "yacht"]
HIDDEN = 50


def _features(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, HIDDEN), nn.Tanh())


def _batches(n: int, batch: int, epochs: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            yield perm[i : i + batch]


def _decay(n: int, cfg: dict) -> float:
    """Per-step factor that takes the learning rate to ``lr_final`` times its start over the run."""
    steps = cfg["epochs"] * math.ceil(n / cfg["batch"])
    return cfg["lr_final"] ** (1.0 / steps)


def _svi(model, guide, loss, X, y, cfg, seed) -> float:
    """Minibatch SVI; returns the training seconds."""
    pyro.set_rng_seed(seed)
    optim = pyro.optim.ClippedAdam({"lr": cfg["lr"], "clip_norm": 10.0, "lrd": _decay(len(X), cfg)})
    svi = SVI(model, guide, optim, loss)
    start = time.perf_counter()
    for idx in _batches(len(X), cfg["batch"], cfg["epochs"], seed):
        svi.step(X[idx], y[idx], num_data=len(X))
    return time.perf_counter() - start


def _map(split, cfg, seed, classes: int | None):
    """The point-estimate network: features, a linear head, and (regression) a learned log noise."""
    torch.manual_seed(seed)
    out = classes or 1
    net = nn.Sequential(_features(split.X_train.shape[1]), nn.Linear(HIDDEN, out))
    log_noise = nn.Parameter(torch.tensor(-2.0))
    params = list(net.parameters()) + ([] if classes else [log_noise])
    optim = torch.optim.Adam(params, lr=cfg["lr"])
    X, y = split.X_train, split.y_train
    start = time.perf_counter()
    for idx in _batches(len(X), cfg["batch"], cfg["epochs"], seed):
        optim.zero_grad()
        f = net(X[idx])
        if classes:
            loss = nn.functional.cross_entropy(f, y[idx])
        else:
            loss = 0.5 * (log_noise + (y[idx] - f[:, 0]) ** 2 / log_noise.exp()).mean()
        loss.backward()
        optim.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        f = net(split.X_test)
        if classes:
            return {"probs": f.softmax(-1), "f_ood": net(split.X_ood).softmax(-1)}, seconds, net[0]
        return {"f": f[None, :, :], "noise": log_noise.exp().detach()}, seconds, net[0]


def _pretrained(features: nn.Module) -> nn.Module:
    return copy.deepcopy(features)


def _bll_models(features: nn.Module, classes: int | None, seed: int, generator: str = "learned", latent_dim: int = 16,
                generator_hidden: int = 64):  # fmt: skip
    """Both last-layer models start from the MAP network's features (then train them jointly).

    ``generator="learned"``: every generator parameter is learned (empirical Bayes over the whole
    network); ``"fixed"``: the generator stays at its centred random initialisation and only an
    output scale is learned, as the Gaussian prior learns its scale."""
    torch.manual_seed(seed)
    head = CategoricalHead(classes) if classes else GaussianHead(0.1)
    gaussian = BayesianLastLayer(_pretrained(features), HIDDEN, head, GaussianWeightPrior(1.0, learn_scale=True))
    head = CategoricalHead(classes) if classes else GaussianHead(0.1)
    C = classes or 1
    fixed, standardized = generator == "fixed", generator == "standardized"
    prior = ImplicitWeightPrior.mlp(C * (HIDDEN + 1), latent_dim=latent_dim, hidden=generator_hidden,
                                    learn_generator=not fixed, learn_scale=fixed or standardized, center=fixed,
                                    standardize=standardized)  # fmt: skip
    implicit = BayesianLastLayer(_pretrained(features), HIDDEN, head, prior)
    return gaussian, implicit


def _summaries(model, posterior, split, classes, num_samples, train) -> dict:
    out = predict(model, posterior, split.X_test, num_samples=num_samples, train=train)
    if classes:
        ood = predict(model, posterior, split.X_ood, num_samples=num_samples, train=train)
        return {"probs": out["probs"], "f_ood": ood["probs"]}
    return {"f": out["f"], "noise": out["noise"]}


def _metrics(pred: dict, split, classes) -> dict:
    if classes:
        out = classification_metrics(pred["probs"], split.y_test)
        entropy = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
        out["ood_auroc"] = auroc(entropy(pred["probs"]), entropy(pred["f_ood"]))
        return out
    f = pred["f"][..., 0]
    means = split.y_scaler.inverse(f)
    variances = split.y_scaler.inverse_variance(pred["noise"].expand_as(f))
    y = split.y_test_original
    return {"rmse": rmse(means.mean(0), y), "nll": mixture_gaussian_nll(means, variances, y)}


def _exact_last_layer(gaussian, guide, split, args) -> tuple[dict, float]:
    """The Gaussian BLL's trained features, noise and prior scale with the exact last-layer posterior
    in place of its guide (``exact_posterior``): the metrics of that predictive, and how far the trained
    guide's ELBO is below its optimum at these features (``log_evidence``), in nats over the training set."""
    X, y = split.X_train, split.y_train
    gap = log_evidence(gaussian, X, y) + LastLayerELBO().loss(gaussian, guide, X, y)
    pyro.set_rng_seed(args.seed)
    q = exact_posterior(gaussian, X, y)
    draws = {gaussian.weight_site: q.sample((args.num_samples,))}
    return _metrics(_summaries(gaussian, draws, split, None, args.num_samples, None), split, None), gap


def _last_layer_nuts(gaussian, split, classes, args) -> tuple[str, str, dict]:
    """NUTS over the last layer, with the Gaussian BLL's features (and noise, prior scale) frozen."""
    X, y = split.X_train, split.y_train
    with torch.no_grad():
        design = gaussian.design(X)
    start = time.perf_counter()
    kernel = NUTS(gaussian, full_mass=True, max_tree_depth=8)  # a strongly correlated posterior
    mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_samples, disable_progbar=True)
    mcmc.run(X, y, design=design)
    seconds = time.perf_counter() - start
    pred = _summaries(gaussian, mcmc.get_samples(), split, classes, args.num_samples, None)
    return "last-layer NUTS", "peer", dict(_metrics(pred, split, classes), train_seconds=seconds)


def run_split(split, classes, cfg, args) -> list[tuple[str, str, dict]]:
    X, y = split.X_train, split.y_train
    results = []
    pred, map_seconds, features = _map(split, cfg, args.seed, classes)
    results.append(("MAP", "peer", dict(_metrics(pred, split, classes), train_seconds=map_seconds)))

    pyro.clear_param_store()
    gaussian, implicit = _bll_models(
        features, classes, args.seed, args.generator, args.latent_dim, args.generator_hidden
    )
    guide = LastLayerNormal(gaussian, init_scale=0.1)
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1) if classes else LastLayerELBO()
    gaussian_seconds = _svi(gaussian, guide, loss, X, y, cfg, args.seed)
    seconds = map_seconds + gaussian_seconds
    pred = _summaries(gaussian, guide, split, classes, args.num_samples, None)
    metrics = _metrics(pred, split, classes)
    if not classes:
        with torch.random.fork_rng():  # the implicit BLL's start must not depend on this reference
            exact, metrics["elbo_gap"] = _exact_last_layer(gaussian, guide, split, args)
    results.append(("Gaussian BLL", "ours", dict(metrics, train_seconds=seconds)))
    if not classes:
        results.append(("Gaussian BLL (exact last layer)", "ours", dict(exact, train_seconds=seconds)))

    if not args.skip_nuts:
        results.append(_last_layer_nuts(gaussian, split, classes, args))

    # the implicit model starts from its own copy of the MAP features: the two models share parameter
    # names, so the Gaussian BLL's trained values must leave the store first
    warm = args.implicit_init == "gaussian"
    trained = {k: v.detach().clone() for k, v in pyro.get_param_store().items()} if warm else None
    pyro.clear_param_store()
    if warm:
        _start_from(implicit, trained, X, y)
    guide = AutoDiffusion(implicit, process="pis", num_steps=cfg["steps"], hidden=64, init_scale=args.guide_init_scale,
                          use_score=False, affine=args.affine)  # fmt: skip
    seconds = map_seconds + _svi(implicit, guide, PathELBO(num_paths=cfg["paths"]), X, y, cfg, args.seed)
    if warm:  # it needed the Gaussian BLL's training first
        seconds += gaussian_seconds
    pred = _summaries(implicit, guide, split, classes, args.num_samples, (X, y))
    results.append(("implicit BLL (diffusion)", "ours", dict(_metrics(pred, split, classes), train_seconds=seconds)))
    if args.implicit_nuts:
        results.append(_implicit_nuts(implicit, split, classes, args, seconds))
    return results


def _start_from(implicit, trained: dict, X, y) -> None:
    """Set the implicit model's features (and noise) to the Gaussian BLL's trained values: the two
    models' parameters share names, and the generator and the guide keep their own start."""
    with pyro.poutine.trace(), torch.no_grad():
        implicit(X[:4], y[:4])  # registers the implicit model's parameters in the store
    store = pyro.get_param_store()
    for name in list(store.keys()):
        if name in trained and (name.startswith("features") or name == "head.noise"):
            store[name] = trained[name]


def _implicit_nuts(implicit, split, classes, args, seconds) -> tuple[str, str, dict]:
    """Diagnostic: NUTS over the implicit prior's latent z, with the implicit BLL's trained features,
    generator and noise frozen: the exact posterior under the learned prior, against which the
    diffusion guide's predictive is measured."""
    X, y = split.X_train, split.y_train
    with torch.no_grad():
        design = implicit.design(X)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(implicit, max_tree_depth=8), num_samples=args.nuts_samples, warmup_steps=args.nuts_samples,
                disable_progbar=True)  # fmt: skip
    mcmc.run(X, y, design=design)
    pred = _summaries(implicit, mcmc.get_samples(), split, classes, args.num_samples, None)
    seconds += time.perf_counter() - start
    return "implicit BLL (NUTS over z)", "ours", dict(_metrics(pred, split, classes), train_seconds=seconds)


class _Digits:
    """scikit-learn's digits: classes 0-7 in distribution (stratified 70/30 split), 8 and 9 held out."""

    def __init__(self, split: int):
        from sklearn.datasets import load_digits

        data = load_digits()
        X = torch.tensor(data.data, dtype=torch.float64) / 16.0
        y = torch.tensor(data.target)
        inside = y < 8
        gen = torch.Generator().manual_seed(split)
        idx = torch.nonzero(inside)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = int(0.7 * len(idx))
        mean, std = X[idx[:cut]].mean(0), X[idx[:cut]].std(0).clamp_min(1e-3)
        scale = lambda A: (A - mean) / std  # noqa: E731
        self.X_train, self.y_train = scale(X[idx[:cut]]), y[idx[:cut]]
        self.X_test, self.y_test = scale(X[idx[cut:]]), y[idx[cut:]]
        self.X_ood = scale(X[~inside])
        self.n_train = cut


def _add_outliers(split, fraction: float, seed: int):
    """Replace ``fraction`` of the (standardised) training targets by scaled Student-t(2) noise."""
    gen = torch.Generator().manual_seed(seed + 1000)
    n = split.y_train.shape[0]
    idx = torch.randperm(n, generator=gen)[: int(round(fraction * n))]
    # Student-t with 2 dof from the seeded generator: z / sqrt(chi2_2 / 2), chi2_2 = -2 log U
    z = torch.randn(len(idx), generator=gen, dtype=split.y_train.dtype)
    u = torch.rand(len(idx), generator=gen, dtype=split.y_train.dtype).clamp_min(1e-300)
    noise = z / torch.sqrt(-u.log())
    y = split.y_train.clone()
    y[idx] = 3.0 * noise.to(y.dtype)
    return dataclasses.replace(split, y_train=y)


def _config(n: int, quick: bool, lr_final: float = 0.01, paths: int = 16, steps: int = 8) -> dict:
    batch = 128 if n > 2000 else 32
    epochs = max(10, min(400, math.ceil(4000 / math.ceil(n / batch))))  # about 4000 steps
    cfg = {"batch": batch, "epochs": epochs, "lr": 5e-3, "lr_final": lr_final, "steps": steps, "paths": paths}
    if quick:
        cfg["epochs"] = max(3, epochs // 10)
    return cfg


def main(argv=None):
    def extra(parser):
        parser.add_argument("--outliers", type=float, default=0.0, help="fraction of training targets replaced")
        parser.add_argument("--num-samples", type=int, default=300, help="posterior draws for prediction")
        parser.add_argument("--nuts-samples", type=int, default=200, help="NUTS draws (and warm-up steps)")
        parser.add_argument("--lr-final", type=float, default=0.01,
                            help="the last-layer SVI's learning rate decays exponentially to this share")  # fmt: skip
        parser.add_argument("--paths", type=int, default=16, help="diffusion paths per SVI step (implicit BLL)")
        parser.add_argument("--steps", type=int, default=8, help="diffusion steps of the implicit BLL's guide")
        parser.add_argument("--skip-nuts", action="store_true", help="leave out the last-layer NUTS reference")
        help_ = ("implicit prior: learned generator standardised to zero mean and unit variance per weight + "
                 "learned scale (default), learned generator, or fixed random one + learned scale")  # fmt: skip
        parser.add_argument("--generator", default="standardized", choices=["fixed", "learned", "standardized"],
                            help=help_)  # fmt: skip
        parser.add_argument(
            "--implicit-nuts",
            action="store_true",
            help="diagnostic: NUTS over z under the implicit BLL's trained prior, features and noise",
        )
        help_ = "the implicit BLL's start: the MAP features, or the Gaussian BLL's trained features and noise"
        parser.add_argument("--implicit-init", default="map", choices=["map", "gaussian"], help=help_)
        parser.add_argument("--latent-dim", type=int, default=16, help="the implicit prior's latent dimension")
        parser.add_argument("--generator-hidden", type=int, default=64, help="the generator's hidden width")
        help_ = "the implicit BLL's diffusion guide starts as N(m, s^2 I) over z with this s (1: the prior)"
        parser.add_argument("--guide-init-scale", type=float, default=0.1, help=help_)
        parser.add_argument("--affine", default="diagonal", choices=["diagonal", "full"],
                            help="the implicit BLL's diffusion-guide frame")  # fmt: skip

    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=GAL + ["digits"],
                              default_splits=[0, 1, 2, 3, 4], quick_datasets=["yacht", "digits"], quick_splits=[0],
                              argv=argv, extra=extra)  # fmt: skip
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    if args.quick:
        args.num_samples, args.nuts_samples = 100, 50
    records = []
    for dataset in args.datasets:
        for split_id in args.splits:
            if dataset == "digits":
                split, classes = _Digits(split_id), 8
            else:
                split, classes = load_uci(dataset, split_id, args.data_dir), None
                if args.outliers > 0:
                    split = _add_outliers(split, args.outliers, split_id)
            cfg = _config(split.n_train, args.quick, args.lr_final, args.paths, args.steps)
            name = dataset if not args.outliers or classes else f"{dataset} (outliers {args.outliers:g})"
            for method, role, metrics in run_split(split, classes, cfg, args):
                records.append(harness.record("bll", name, split_id, method, role, n_train=split.n_train,
                                              epochs=cfg["epochs"], latent_dim=args.latent_dim,
                                              generator_hidden=args.generator_hidden, **metrics))  # fmt: skip
                shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                print(f"{name:>32} {split_id} {method:>26}: {shown}", flush=True)
            harness.write_json(records, args.out)
    harness.report(records, ["rmse", "nll", "accuracy", "ece", "ood_auroc", "elbo_gap"], args.markdown)
    assert all(math.isfinite(r.get("nll", 0.0)) for r in records)
    return records


if __name__ == "__main__":
    main()
