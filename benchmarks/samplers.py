"""Diffusion-sampler guides (PIS, DDS, DIS; KL and log-variance losses) vs Pyro's autoguides and NUTS.

Targets are Pyro models: a 10-d funnel (log Z = 0), a 2-d mixture of 25 Gaussians (log Z = 0),
a 32-d many-well (log Z ~ 164.696), an opt-in 2-d mixture of two modes weighted 0.8 / 0.2 (``twomode``,
log Z = 0) and Bayesian logistic regression on the breast-cancer data
bundled with scikit-learn (a long NUTS run, 8000 draws, is the reference posterior). Every method gets
the same wall-clock budget (on logistic regression at most ``--logistic-budget``, 40 s, less than the
timed NUTS run takes); reported are the ELBO, the importance-sampled log Z (and its error where log Z is known),
a sliced Wasserstein distance to reference samples, modes recovered (GMM), posterior mean/std
error against the reference in its standard deviations (logistic regression) and the wall time.

    python benchmarks/samplers.py --out benchmarks/results/samplers.json [--quick]

(``--data-dir`` is accepted for the common contract; these targets need no files.)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import affine_autoregressive
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.importance import vectorized_importance_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from pyro_gpx.diffusion import (  # noqa: E402
    AutoDiffusion,
    LogVarianceLoss,
    PathELBO,
    ReplayBuffer,
    importance_estimate,
    langevin_search,
)
from pyro_gpx.svi import CollapseGuard  # noqa: E402

MANYWELL_LOG_Z = 164.696
SEED_LANGEVIN_STEPS = 100  # Langevin steps that move the replay buffer's seed points (--buffer-init)


# -- targets -------------------------------------------------------------------------------------
def funnel():
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0), 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), torch.exp(v / 2).unsqueeze(-1)).to_event(1))


GRID = torch.tensor([[a, b] for a in (-4.0, -2.0, 0.0, 2.0, 4.0) for b in (-4.0, -2.0, 0.0, 2.0, 4.0)])


MIXTURE = dist.MixtureSameFamily(dist.Categorical(torch.ones(25)), dist.Normal(GRID, 0.3).to_event(1))


def _flat(shape):  # a flat (improper) prior that can still be sampled for initialisation, as AutoIAFNormal needs
    return dist.Normal(torch.zeros(shape), 1.0).to_event(1).mask(False)


def gmm():  # the mixture density as a factor (its support has no bijection for autoguides)
    z = pyro.sample("z", _flat(2))
    pyro.factor("mixture", MIXTURE.log_prob(z))


TWO_MODES = dist.MixtureSameFamily(dist.Categorical(torch.tensor([0.8, 0.2])),
                                   dist.Normal(torch.tensor([[2.5, 0.0], [-2.5, 0.0]]), 0.4).to_event(1))  # fmt: skip


def twomode():  # two separated modes of unequal weight (0.8 / 0.2): does a sampler keep the lighter one?
    z = pyro.sample("z", _flat(2))
    pyro.factor("mixture", TWO_MODES.log_prob(z))


def _double_well_energy(x):  # per pair of coordinates
    return x[..., 0] ** 4 - 6 * x[..., 0] ** 2 - 0.5 * x[..., 0] + 0.5 * x[..., 1] ** 2


def manywell():
    z = pyro.sample("z", _flat(32))
    pairs = z.reshape(z.shape[:-1] + (16, 2))
    pyro.factor("energy", -_double_well_energy(pairs).sum(-1))


def logistic_data():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.column_stack([X, np.ones(len(X))])
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def logistic(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)  # batched w is (..., 1, D): Pyro's idiom


# -- reference samples ---------------------------------------------------------------------------
def reference_samples(target: str, n: int, gen: torch.Generator) -> torch.Tensor | None:
    if target == "funnel":
        v = 3 * torch.randn(n, 1, generator=gen)
        return torch.cat([v, torch.randn(n, 9, generator=gen) * torch.exp(v / 2)], 1)
    if target == "twomode":
        lighter = (torch.rand(n, generator=gen) < 0.2).long()
        return TWO_MODES.component_distribution.base_dist.loc[lighter] + 0.4 * torch.randn(n, 2, generator=gen)
    if target == "gmm":
        idx = torch.randint(25, (n,), generator=gen)
        return GRID[idx] + 0.3 * torch.randn(n, 2, generator=gen)
    if target == "manywell":  # exact: inverse-CDF sampling of the 1-d well on a fine grid, x2 ~ N(0, 1)
        grid = torch.linspace(-4, 4, 200_001, dtype=torch.float64)
        logp = -(grid**4 - 6 * grid**2 - 0.5 * grid)
        cdf = torch.cumsum(torch.exp(logp - logp.max()), 0)
        cdf = cdf / cdf[-1]
        u = torch.rand(n * 16, generator=gen, dtype=torch.float64)
        x1 = grid[torch.searchsorted(cdf, u).clamp(max=len(grid) - 1)].reshape(n, 16)
        x2 = torch.randn(n, 16, generator=gen, dtype=torch.float64)
        return torch.stack([x1, x2], -1).reshape(n, 32).float()
    return None


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 200, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    n = min(len(a), len(b))
    directions = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=0)
    pa = torch.sort(a[:n].double() @ directions, 0).values
    pb = torch.sort(b[:n].double() @ directions, 0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd(a: torch.Tensor, b: torch.Tensor, max_points: int = 2000) -> float:
    """Biased MMD between samples under an RBF kernel with the median-distance bandwidth of ``b``
    (bounded, so heavy tails such as the funnel's do not swamp it as they do Wasserstein distances)."""
    a, b = a[:max_points].double(), b[:max_points].double()
    bandwidth = torch.cdist(b, b).median().clamp_min(1e-12)

    def k(x, y):
        return torch.exp(-0.5 * (torch.cdist(x, y) / bandwidth) ** 2).mean()

    return float((k(a, a) + k(b, b) - 2 * k(a, b)).clamp_min(0).sqrt())


def lighter_well_share(samples: torch.Tensor) -> float:
    """Share of the double-well coordinates (every other one) in the lighter, negative well."""
    return float((samples[:, 0::2] < 0).double().mean())


def modes_recovered(samples: torch.Tensor) -> int:
    nearest = torch.cdist(samples.float(), GRID).argmin(1)
    counts = torch.bincount(nearest, minlength=25).float() / len(samples)
    return int((counts >= 0.01).sum())


# -- methods -------------------------------------------------------------------------------------
# targets on which every SVI method's learning rate decays geometrically by this factor over the second half
# of its time budget (the posterior moments are compared, so the final iterates' jitter matters)
LR_DECAY = {"logistic": 0.1}


def _train(svi, args, budget: float, decay: float | None = None, on_step=None, guard=None) -> tuple[int, float]:
    """SVI steps for ``budget`` seconds; ``on_step(fraction of the budget spent)`` runs before each. With a
    ``CollapseGuard``, a non-finite loss rolls back to its best state instead of ending the run."""
    start, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < budget:
        if on_step is not None:
            on_step(elapsed / budget)
        if decay is not None:
            factor = decay ** max(0.0, 2 * elapsed / budget - 1)
            for optimizer in svi.optim.optim_objs.values():
                for group in optimizer.param_groups:  # relative to each group's own rate (a frozen flow's is 0)
                    group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        try:
            value = svi.step(*args)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value}")
        except FloatingPointError:  # the LV loss raises this itself, naming itself
            if guard is not None and guard.rollback():
                print("guard: the loss was not finite: rolled back, rates halved", flush=True)
                continue
            raise
        steps += 1
    return steps, time.perf_counter() - start


def _init(target):
    if target in ("manywell", "gmm", "twomode"):
        return init_to_value(values={"z": torch.zeros(32 if target == "manywell" else 2)})
    return None


# per-target diffusion settings. Logistic regression: a correlated, nearly Gaussian posterior, so a full
# affine frame (the drift then learns only the non-Gaussian part) and a cheap sampler: 16 steps, 64 paths
# and no score input (one model gradient per path instead of one per step), to finish before NUTS does
DIFFUSION = {"logistic": {"affine": "full", "use_score": False, "steps": 16, "paths": 64}}


FLOW_DRIFT_CLIP = 5.0


def _zeros(site):  # the origin of a real-valued site (every target here has real support)
    return torch.zeros_like(site["fn"].sample())


def _fit_autoguide(model, args, target, cls, budget, cfg):
    """A Pyro autoguide trained as every peer is: ``Trace_ELBO`` with vectorised particles, Adam 1e-2."""
    kwargs = {"init_loc_fn": _init(target)} if _init(target) is not None else {}
    guide = cls(model, **kwargs)
    elbo = Trace_ELBO(num_particles=cfg["vi_particles"], vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    steps, seconds = _train(svi, args, budget, cfg["lr_decay"].get(target))
    return guide, steps, seconds


def _iaf_warm_start(model, args, target, budget, cfg):
    """``AutoIAFNormal`` trained exactly as the peer for ``budget`` seconds; its trained transform."""
    guide, _, _ = _fit_autoguide(model, args, target, AutoIAFNormal, budget, cfg)
    flow = guide._init_transform_fn(guide.latent_dim)  # a fresh copy (the trained one caches graph tensors)
    flow.load_state_dict(guide.transform.state_dict())
    return flow


def run_diffusion(model, args, target, process, loss_name, budget, cfg, flow_fraction: float | None = None,
                  zero_drift: bool = False, buffered: bool = False):  # fmt: skip
    """``flow_fraction`` (``+IAF`` methods): the guide runs in the frame of an affine autoregressive flow,
    ``AutoDiffusion(flow=...)``, with the affine frame starting at the identity, so that with a zero drift
    it is the flow's own guide. ``0``: a fresh flow, trained jointly with the drift (same optimiser, same
    budget). ``> 0``: that share of the budget trains ``AutoIAFNormal`` as the peer is trained; the
    diffusion then runs in its fixed, trained flow for the rest of the budget (a warm start).
    ``zero_drift``: the drift stays at zero (an ablation: the flow alone, trained with the path ELBO).
    ``buffered`` (``+buffer`` methods, LV only): half of each batch is backward paths from a replay buffer of
    the forward paths' end points, refined by ``cfg["search_steps"]`` Langevin steps per call (Sendera et al.)."""
    kwargs = {"init_loc_fn": _init(target)} if _init(target) is not None else {}
    start = time.perf_counter()
    train_flow = flow_fraction == 0
    if flow_fraction is not None:
        # the drift sees no score (with the pulled-back funnel score the loss diverged) and is bounded (an
        # unbounded one threw a path to v = 187: exp(v / 2) overflows). A warm-started flow is kept fixed: a
        # restarted Adam's first full-size steps on its trained weights took the ELBO from -0.15 to -18 on the funnel
        flow = (affine_autoregressive if train_flow
                else _iaf_warm_start(model, args, target, flow_fraction * budget, cfg))  # fmt: skip
        kwargs = {"init_loc_fn": _zeros, "flow": flow, "drift_clip": FLOW_DRIFT_CLIP, "use_score": False}
        pyro.clear_param_store()
    warm_seconds = time.perf_counter() - start
    special = DIFFUSION.get(target, {})
    steps, paths = special.get("steps", cfg["steps"]), special.get("paths", cfg["paths"])
    kwargs.setdefault("use_score", special.get("use_score", not cfg["no_score"]))
    if cfg["drift_clip"] is not None:
        kwargs.setdefault("drift_clip", cfg["drift_clip"])
    if process == "pis":
        kwargs["grid_power"] = cfg["grid_power"]
    guide = AutoDiffusion(model, process=process, num_steps=steps, sigma=cfg["sigma"][target], hidden=cfg["hidden"],
                          affine=special.get("affine", "diagonal"), **kwargs)  # fmt: skip
    if loss_name == "KL":
        loss = PathELBO(paths)
    else:
        buffer = ReplayBuffer(cfg["buffer_capacity"], cfg["rank_weight"], cfg["eviction"]) if buffered else None
        loss = LogVarianceLoss(paths, exploration=cfg["exploration"], buffer=buffer,
                               search_steps=cfg["search_steps"] if buffered else 0,
                               search_in_place=cfg["search_in_place"],
                               backward_fraction=cfg["backward_fraction"])  # fmt: skip
        if buffered and cfg["buffer_init"]:  # seeded before training, from the untrained sampler's wide end points
            buffer.add(*_langevin_seed(guide, target_args=args, num=cfg["buffer_init"]))
    lr = cfg["lr"][target] if loss_name == "KL" else min(cfg["lr"][target], 5e-3)  # LV diverged at 1e-2 (many-well)
    frozen = flow_fraction is not None and not train_flow

    def rate(name):
        return {"lr": 0.0 if (frozen and ".flow." in name) or (zero_drift and ".drift." in name) else lr}

    kl_iterations = 0
    if loss_name == "LV" and cfg["kl_fraction"] > 0:  # a reverse-KL warm start: fast, but it drops modes
        kl_svi = SVI(model, guide, pyro.optim.Adam({"lr": cfg["lr"][target]}), PathELBO(paths))
        kl_iterations, kl_seconds = _train(kl_svi, args, cfg["kl_fraction"] * budget)
        warm_seconds += kl_seconds
    svi = SVI(model, guide, _adam(rate, cfg["clip_norm"]), loss)
    end_budget = cfg["kl_end_fraction"] * budget if loss_name == "LV" else 0.0
    on_step = None
    if loss_name == "LV" and cfg["exploration_end"] is not None:  # linear, over the LV phase

        def on_step(fraction):
            loss.exploration = cfg["exploration"] + fraction * (cfg["exploration_end"] - cfg["exploration"])

    if cfg["trace_every"] and loss_name == "LV":
        _trace_training(guide, loss, cfg["trace_every"])
    lv_budget = budget - warm_seconds - end_budget
    guard = None
    if loss_name == "LV" and cfg["guard_every"]:  # the ELBO of 1024 fresh paths; its seconds count in the budget

        def elbo():
            return guide.log_normalizer(1024, *args, batch_size=1024)["elbo"]

        guard = CollapseGuard(svi, elbo, every=cfg["guard_every"], drop=cfg["guard_drop"])
        explore = on_step

        def on_step(fraction):
            if explore is not None:
                explore(fraction)
            rollbacks = guard.rollbacks
            guard()
            if guard.rollbacks > rollbacks:
                print(f"guard: ELBO below {guard.best:.4g} - {guard.drop}: rolled back, rates halved", flush=True)

    iterations, seconds = _train(svi, args, lv_budget, cfg["lr_decay"].get(target), on_step, guard)
    extra = {}
    if guard is not None:  # a collapse in the last interval is rolled back too
        start = time.perf_counter()
        guard.check()
        seconds += time.perf_counter() - start
        extra["rollbacks"] = guard.rollbacks
    if end_budget:  # a reverse-KL finish from the LV guide: sharpens each mode; does it keep their weights?
        if target in ("manywell", "twomode"):
            with torch.no_grad():
                z = guide.sample_paths(2000, *args, log_target=False).z
            extra["lighter_well_share_before_kl_end"] = lighter_well_share(z)
        end_svi = SVI(model, guide, _adam(lambda name: {"lr": cfg["kl_end_lr"]}, cfg["clip_norm"]), PathELBO(paths))
        end_iterations, end_seconds = _train(end_svi, args, end_budget, cfg["lr_decay"].get(target))
        iterations, seconds = iterations + end_iterations, seconds + end_seconds
        extra["kl_end_steps"] = end_iterations
    seconds += warm_seconds
    iterations += kl_iterations
    if cfg["save_guide"]:  # the param store (the guide's drift and frame), to re-evaluate without retraining
        pyro.get_param_store().save(f"{cfg['save_guide']}.{target}.{process}-{loss_name}.pt")
    with torch.no_grad():
        est = guide.log_normalizer(cfg["eval_paths"], *args, batch_size=paths * 4)
        samples = guide.sample_paths(cfg["eval_paths"], *args, log_target=False).z
    # one target gradient per path (the end point), plus one per step with the score input
    grads = iterations * paths * ((steps + 1) if guide.drift.use_score else 1)
    if buffered:  # the local search's and the seeding's gradients: one per point and Langevin step
        grads += loss.calls * paths * cfg["search_steps"] + cfg["buffer_init"] * SEED_LANGEVIN_STEPS
    return {"elbo": est["elbo"], "logz": est["log_z"], "logz_stderr": est["stderr"], "ess": est["ess"],
            "train_seconds": seconds,
            "steps": iterations, "num_grads": grads, **extra}, guide, samples  # fmt: skip


def _trace_training(guide, loss, every: int) -> None:
    """Prints, every ``every`` LV steps, the batch's log weights (forward and backward paths apart), the
    largest absolute drift-network output weight and the largest absolute process state on the batch's
    paths: a diagnosis of diverging runs."""
    rescore, count = guide.rescore_paths, [0]

    def traced(states, *args, **kwargs):
        path = rescore(states, *args, **kwargs)
        count[0] += 1
        if count[0] % every == 0:
            log_w, num_backward = path.log_weight.detach(), loss.num_backward()
            fwd, bwd = log_w[: len(log_w) - num_backward], log_w[len(log_w) - num_backward :]
            drift = guide.drift
            gate = float(drift.score_gate[-1].weight.detach().abs().max()) if drift.use_score else 0.0
            line = (f"trace step={count[0]} var={float(log_w.var()):.4g} fwd_mean={float(fwd.mean()):.4g} "
                    f"fwd_min={float(fwd.min()):.4g} fwd_max={float(fwd.max()):.4g}")  # fmt: skip
            if len(bwd):
                line += f" bwd_mean={float(bwd.mean()):.4g} bwd_min={float(bwd.min()):.4g}"
            line += f" out_w={float(drift.out.weight.detach().abs().max()):.3g} gate_w={gate:.3g}"
            line += f" state_max={float(states.detach().abs().max()):.3g}"
            print(line, flush=True)
        return path

    guide.rescore_paths = traced


def _adam(rate, clip_norm: float | None):
    """Adam with per-parameter options ``rate(name)``; ``ClippedAdam`` if ``clip_norm`` is given."""
    if clip_norm:
        return pyro.optim.ClippedAdam(lambda name: {**rate(name), "clip_norm": clip_norm})
    return pyro.optim.Adam(rate)


def _langevin_seed(guide, target_args, num, steps=SEED_LANGEVIN_STEPS, step_size=0.02):
    """``num`` end points of the (untrained) guide moved by ``steps`` Langevin steps on the target, with
    their log density: a buffer that covers the modes before reverse-KL training can drop any."""
    with torch.no_grad():
        z = guide.sample_paths(num, *target_args, log_target=False).z
    target = guide.target(*target_args)
    z, log_target, _ = langevin_search(lambda x: target.log_density(x, strict=False), z, steps, step_size)
    finite = torch.isfinite(log_target)  # a start where the density is not finite never moves: left out
    return z[finite], log_target[finite]


def run_autoguide(model, args, target, cls, budget, cfg):
    guide, steps, seconds = _fit_autoguide(model, args, target, cls, budget, cfg)
    with torch.no_grad():
        log_w, _, guide_trace = vectorized_importance_weights(
            model, guide, *args, num_samples=cfg["eval_paths"], max_plate_nesting=1
        )
    latents = sorted(n for n, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and not site["infer"].get("is_auxiliary"))  # fmt: skip
    z = torch.cat([guide_trace.nodes[n]["value"].reshape(cfg["eval_paths"], -1) for n in latents], 1)
    est = importance_estimate(log_w)  # as AutoDiffusion.log_normalizer
    return {"elbo": est["elbo"], "logz": est["log_z"], "train_seconds": seconds, "steps": steps,
            "logz_stderr": est["stderr"], "ess": est["ess"],
            "num_grads": steps * cfg["vi_particles"]}, guide, z  # fmt: skip


def run_nuts(model, args, target, budget, cfg, num_samples=None):
    """NUTS with a fixed number of draws (``cfg["nuts_samples"]`` after as many warm-up steps), not
    ``budget``: a truncated chain is not a fair reference. Its wall time is reported instead."""
    del budget  # same signature as the SVI runners
    kwargs = {"init_strategy": _init(target)} if _init(target) is not None else {}
    mcmc = MCMC(NUTS(model, **kwargs), num_samples=num_samples or cfg["nuts_samples"],
                warmup_steps=cfg["nuts_samples"], disable_progbar=True)  # fmt: skip
    start = time.perf_counter()
    mcmc.run(*args)
    samples = mcmc.get_samples()
    flat = torch.cat([v.reshape(len(v), -1) for _, v in sorted(samples.items())], 1)
    return {"train_seconds": time.perf_counter() - start}, None, flat


def _run_method(method, model, model_args, target, budget, cfg, args):
    """The result record and samples of one method."""
    if method == "NUTS":
        out, _, samples = run_nuts(model, model_args, target, budget, cfg)
    elif method.startswith(("PIS", "DDS", "DIS")):
        process, loss = method.split(" ")[0].split("+")[0].split("-")
        flow_fraction = args.flow_fraction if "+IAF" in method else None
        out, _, samples = run_diffusion(model, model_args, target, process.lower(), loss, budget, cfg, flow_fraction,
                                        zero_drift=method.endswith("(zero drift)"),
                                        buffered="+buffer" in method)  # fmt: skip
    else:
        cls = {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal,
               "AutoIAFNormal": AutoIAFNormal}[method]  # fmt: skip
        out, _, samples = run_autoguide(model, model_args, target, cls, budget, cfg)
    return out, samples


def main(argv=None):
    def extra(parser):
        help_ = "default funnel,gmm,manywell,logistic (--quick: funnel,gmm)"
        parser.add_argument("--targets", default=None, help=help_)
        parser.add_argument("--budget", type=float, default=None, help="seconds per method")
        parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
        parser.add_argument("--lr", type=float, default=None, help="diffusion learning rate")
        parser.add_argument("--steps", type=int, default=None, help="diffusion time steps")
        parser.add_argument("--paths", type=int, default=None, help="diffusion paths per step")
        parser.add_argument("--sigma", type=float, default=None, help="diffusion scale for every target")
        parser.add_argument("--threads", type=int, default=None, help="torch threads")
        help_ = "decay every SVI learning rate by this factor over the second half of the budget (every target)"
        parser.add_argument("--lr-decay", type=float, default=None, help=help_)
        parser.add_argument("--hidden", type=int, default=64, help="width of the drift networks")
        parser.add_argument("--eval-paths", type=int, default=None, help="paths of the log Z estimate (10 000)")
        help_ = "diffusion methods without a flow: softly bound each drift coordinate at this value (drift_clip)"
        parser.add_argument("--drift-clip", type=float, default=None, help=help_)
        parser.add_argument("--save-guide", default=None, help="diffusion methods: save the param store to PREFIX.*.pt")
        parser.add_argument("--no-score", action="store_true", help="drift networks without the score input")
        help_ = "PIS time grid t_k = T (1 - (1 - k/K)^p): p > 1 shortens the final steps (AutoDiffusion(grid_power=p))"
        parser.add_argument("--grid-power", type=float, default=1.0, help=help_)
        help_ = "LV loss: the training paths' noise is scaled by this factor (off-policy exploration)"
        parser.add_argument("--exploration", type=float, default=1.0, help=help_)
        help_ = "LV loss: the exploration factor moves linearly to this value over the LV phase"
        parser.add_argument("--exploration-end", type=float, default=None, help=help_)
        help_ = (
            "methods ending in +IAF (PIS-KL+IAF, DDS-KL+IAF, ...): 0 trains a fresh flow jointly with the drift; "
            "> 0 is the share of the budget that trains an AutoIAFNormal warm start, then kept fixed"
        )
        parser.add_argument("--flow-fraction", type=float, default=0.0, help=help_)
        help_ = "+buffer methods: Langevin local-search steps on the replayed points per training step"
        parser.add_argument("--search-steps", type=int, default=10, help=help_)
        help_ = "+buffer methods: share of each batch that is backward paths from replayed points"
        parser.add_argument("--backward-fraction", type=float, default=0.5, help=help_)
        parser.add_argument("--buffer-capacity", type=int, default=10_000, help="+buffer methods: replay buffer size")
        help_ = "+buffer methods: c in the replay priority 1 / (c N + rank); large c replays uniformly"
        parser.add_argument("--rank-weight", type=float, default=0.01, help=help_)
        help_ = "+buffer methods: seed the buffer with this many end points of the untrained guide, Langevin-moved"
        parser.add_argument("--buffer-init", type=int, default=0, help=help_)
        help_ = "clip each diffusion parameter's gradient norm at this value (ClippedAdam; the KL start is not clipped)"
        parser.add_argument("--clip-norm", type=float, default=None, help=help_)
        parser.add_argument("--eviction", default="fifo", choices=["fifo", "reservoir"], help="+buffer methods")
        help_ = "+buffer methods: searched points replace their starting points (a population of Langevin chains)"
        parser.add_argument("--search-in-place", action="store_true", help=help_)
        help_ = "LV methods: this share of the budget first trains the guide with the path ELBO (reverse KL)"
        parser.add_argument("--kl-fraction", type=float, default=0.0, help=help_)
        help_ = "LV methods: this share of the budget finishes training with the path ELBO (reverse KL)"
        parser.add_argument("--kl-end-fraction", type=float, default=0.0, help=help_)
        help_ = "LV methods: print the batch's log weights every N steps"
        parser.add_argument("--trace-every", type=int, default=0, help=help_)
        help_ = "LV methods: every N steps the ELBO of 1024 paths is estimated; a collapse restores the best state"
        parser.add_argument("--guard-every", type=int, default=0, help=help_)
        parser.add_argument("--guard-drop", type=float, default=10.0, help="nats below the best ELBO that roll back")
        parser.add_argument("--kl-end-lr", type=float, default=1e-3, help="learning rate of that finish")
        parser.add_argument(
            "--logistic-budget",
            type=float,
            default=40.0,
            help="seconds per method on logistic regression (NUTS there takes 54-78 s)",
        )

    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=["none"], default_splits=[0], argv=argv,
                              extra=extra)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    # --quick checks the pipeline in a few minutes (all four targets at 20 s per method took over 15 on one core)
    budget = args.budget or (5.0 if args.quick else 300.0)
    args.targets = args.targets or ("funnel,gmm" if args.quick else "funnel,gmm,manywell,logistic")
    cfg = {"steps": args.steps or 32, "paths": args.paths or (64 if args.quick else 128),
           "hidden": args.hidden, "lr": {"funnel": 5e-3, "gmm": 5e-3, "manywell": 1e-2, "logistic": 5e-3,
                                         "twomode": 5e-3},
           "eval_paths": args.eval_paths or (2000 if args.quick else 10000),
           "vi_particles": 16, "nuts_samples": 200 if args.quick else 1000,
           "reference_samples": 400 if args.quick else 8000,
           "sigma": {"funnel": 1.0, "gmm": 3.0, "manywell": 1.0, "logistic": 0.5, "twomode": 1.0},
           "exploration": args.exploration, "no_score": args.no_score, "lr_decay": dict(LR_DECAY),
           "grid_power": args.grid_power, "search_steps": args.search_steps,
           "buffer_capacity": args.buffer_capacity, "kl_fraction": args.kl_fraction,
           "rank_weight": args.rank_weight, "eviction": args.eviction,
           "search_in_place": args.search_in_place, "buffer_init": args.buffer_init,
           "clip_norm": args.clip_norm, "kl_end_fraction": args.kl_end_fraction,
           "kl_end_lr": args.kl_end_lr, "exploration_end": args.exploration_end,
           "save_guide": args.save_guide, "drift_clip": args.drift_clip,
           "backward_fraction": args.backward_fraction, "trace_every": args.trace_every,
           "guard_every": args.guard_every, "guard_drop": args.guard_drop}  # fmt: skip
    if args.lr:
        cfg["lr"] = dict.fromkeys(cfg["lr"], args.lr)
    if args.sigma:
        cfg["sigma"] = dict.fromkeys(cfg["sigma"], args.sigma)
    if args.lr_decay:
        cfg["lr_decay"] = dict.fromkeys(("funnel", "gmm", "manywell", "logistic", "twomode"), args.lr_decay)
    targets = args.targets.split(",")
    records = []
    gen = torch.Generator().manual_seed(args.seed)
    for target in targets:
        if target == "logistic":
            model, model_args = logistic, logistic_data()
        else:
            model, model_args = {"funnel": funnel, "gmm": gmm, "manywell": manywell, "twomode": twomode}[target], ()
        true_log_z = {"funnel": 0.0, "gmm": 0.0, "manywell": MANYWELL_LOG_Z, "twomode": 0.0}.get(target)
        reference = reference_samples(target, cfg["eval_paths"], gen)
        if target == "logistic":  # a long NUTS run is the reference (1000 draws have ~0.1 sd of Monte Carlo error)
            pyro.set_rng_seed(args.seed + 1)
            out, _, reference = run_nuts(model, model_args, target, None, cfg, cfg["reference_samples"])
            print(f"{target:>9} reference NUTS, {len(reference)} draws: {out['train_seconds']:.0f} s", flush=True)
        target_budget = min(budget, args.logistic_budget) if target == "logistic" else budget
        methods = [("NUTS", "peer")]
        methods += [(f"{p.upper()}-{loss}", "ours") for p in ("pis", "dds", "dis") for loss in ("KL", "LV")]
        methods += [(f"{p.upper()}-KL+IAF", "ours") for p in ("pis", "dds")]  # in an affine autoregressive frame
        if args.methods and "PIS-KL+IAF (zero drift)" in args.methods.split(","):  # opt-in ablation: the flow alone
            methods += [("PIS-KL+IAF (zero drift)", "ours")]
        for buffered in ("PIS-LV+buffer", "DDS-LV+buffer"):  # opt-in: LV with backward paths from a replay buffer
            if args.methods and buffered in args.methods.split(","):
                methods += [(buffered, "ours")]
        methods += [("AutoNormal", "peer"), ("AutoMultivariateNormal", "peer"), ("AutoIAFNormal", "peer")]
        if args.methods:
            methods = [(m, r) for m, r in methods if m in args.methods.split(",")]
        for method, role in methods:
            pyro.set_rng_seed(args.seed)
            pyro.clear_param_store()
            try:
                out, samples = _run_method(method, model, model_args, target, target_budget, cfg, args)
            except FloatingPointError as err:  # a diverged training run is a result, not the end of the benchmark
                records.append(harness.record("samplers", target, 0, method, role, failed=str(err)))
                print(f"{target:>9} {method:>23}: failed ({err})", flush=True)
                harness.write_json(records, args.out)
                continue
            if true_log_z is not None and "logz" in out:
                out["logz_error"] = out["logz"] - true_log_z
                out["logz_abs_error"] = abs(out["logz_error"])
            if samples is not None and reference is not None:
                out["sliced_w2"] = sliced_wasserstein(samples, reference)
                out["mmd"] = mmd(samples, reference)
            if target == "gmm" and samples is not None:
                out["modes_recovered"] = modes_recovered(samples)
            if target in ("manywell", "twomode") and samples is not None:  # exact share: 0.156 (each pair), 0.2
                out["lighter_well_share"] = lighter_well_share(samples)
            if target == "logistic" and samples is not None:
                m_ref, s_ref = reference.mean(0), reference.std(0)
                out["mean_rel_error"] = float(((samples.mean(0) - m_ref).abs() / s_ref).max())
                out["std_rel_error"] = float(((samples.std(0) - s_ref).abs() / s_ref).max())
            records.append(harness.record("samplers", target, 0, method, role, **out))
            print(f"{target:>9} {method:>23}: " + " ".join(f"{k}={v:.4g}" for k, v in out.items()
                                                             if isinstance(v, float | int)), flush=True)  # fmt: skip
            harness.write_json(records, args.out)
    columns = ["elbo", "logz_error", "logz_abs_error", "mmd", "modes_recovered", "mean_rel_error", "std_rel_error",
               "train_seconds"]  # fmt: skip
    harness.report(records, columns, args.markdown)
    return records


if __name__ == "__main__":
    main()
