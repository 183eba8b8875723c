"""Computation-aware GPs (CaGP-Opt, CaGP-CG, IterGP-CG) vs GPyTorch exact GP, SGPR and SVGP.

Parts, all in one process so the numbers are side by side:

* ``accuracy``: uci-large sets, each method trained for the same wall-clock budget on the same
  split; test RMSE, NLL, 95% coverage (original units), train seconds, peak RSS.
* ``scaling``: seconds per training step versus n for CaGP-Opt and the GPyTorch exact GP.
* ``cg``: CG iterations to relative residual 0.01 with no, greedy pivoted-Cholesky and RPCholesky
  preconditioning.
* ``outputscale`` (a probe, with ``accuracy``): CaGP-Opt's refined ELBO and test metrics with the
  outputscale multiplied by a factor on a log grid, the noise re-selected at each.

    python benchmarks/gp_uci.py --out benchmarks/results/gp_uci.json [--quick] [--parts accuracy,scaling,cg]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import gpytorch
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from pyro_gpx.datasets import load_uci  # noqa: E402
from pyro_gpx.gp import (  # noqa: E402
    BlockSparsePolicy,
    CGPolicy,
    ComputationAwareGP,
    KernelFn,
    build_preconditioner,
    conjugate_gradients,
    exact_log_marginal_likelihood,
    kernel_matmul,
)
from pyro_gpx.gp.noise_refit import refit_noise  # noqa: E402
from pyro_gpx.gp.projection import _factorise  # noqa: E402
from pyro_gpx.metrics import gaussian_coverage, gaussian_nll, rmse  # noqa: E402
from pyro_gpx.svi import _BAD_LOSS, _numerical_failure  # noqa: E402

DTYPE = torch.float32
WARM_FRACTION = 0.6
REFINE_FRACTION = 0.1
PROJECTION_EVALS = 1.0  # the refined projection, noise refit and test predictions, in full-data loss evaluations
RESTART_AFTER = 5


KERNEL_FAMILIES = ("matern0.5", "matern1.5", "matern2.5", "rbf")


def make_kernel(dim: int, family: str = "matern1.5", dtype: torch.dtype = DTYPE) -> gpytorch.kernels.Kernel:
    """Matérn-3/2 ARD kernel (or another of ``KERNEL_FAMILIES``), the same initialisation for every
    method (lengthscales sqrt(d) on standardised inputs, so initial correlations are neither all ~0
    nor all ~1)."""
    if family not in KERNEL_FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; one of {', '.join(KERNEL_FAMILIES)}")
    if family == "rbf":
        base = gpytorch.kernels.RBFKernel(ard_num_dims=dim)
    else:
        base = gpytorch.kernels.MaternKernel(nu=float(family[len("matern") :]), ard_num_dims=dim)
    kernel = gpytorch.kernels.ScaleKernel(base).to(dtype)
    kernel.base_kernel.lengthscale = torch.full((1, dim), math.sqrt(dim))
    kernel.outputscale = 1.0
    return kernel


def _metrics(split, mean: torch.Tensor, var: torch.Tensor) -> dict:
    mean_o = split.y_scaler.inverse(mean.double())
    var_o = split.y_scaler.inverse_variance(var.double().clamp_min(1e-10))
    y = split.y_test_original
    return {
        "rmse": rmse(mean_o, y),
        "nll": gaussian_nll(mean_o, var_o, y),
        "coverage95": gaussian_coverage(mean_o, var_o, y),
    }


class _OutOfTime(Exception):
    pass


def _train(
    step, budget: float, max_steps: int, tol: float = 0.0, restart_on_stall: bool = True
) -> tuple[int, float, float]:
    """Run ``step(deadline)`` until the budget is spent (or the loss stops changing by more than
    ``tol``, relative); returns steps, seconds and the last loss. With ``restart_on_stall``, a step
    with a ``restart`` method (L-BFGS) that stalls is restarted once with a clear memory before
    training stops."""
    start = time.perf_counter()
    deadline = start + budget
    steps, loss, previous, restarted = 0, math.nan, math.inf, False
    while steps < max_steps and time.perf_counter() < deadline:
        try:
            value = float(step(deadline))
        except _OutOfTime:
            break
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {steps}")
        loss = value
        steps += 1
        if tol and abs(previous - loss) <= tol * max(1.0, abs(loss)):
            if restarted or not restart_on_stall or not hasattr(step, "restart"):
                break
            step.restart()
            restarted = True
        else:
            restarted = False
        previous = loss
    return steps, time.perf_counter() - start, loss


def _plain(step):
    """A step function that ignores the deadline (one cheap update)."""
    return lambda deadline: step()


def _loss_and_grad(loss_fn) -> torch.Tensor | None:
    """``loss_fn()`` with its gradient, or ``None`` where an L-BFGS trial step left the valid region
    (non-finite loss, indefinite or non-finite matrix): the line search then backs off."""
    try:
        value = loss_fn()
    except (ValueError, RuntimeError) as e:
        if not _numerical_failure(e):
            raise
        return None
    if not torch.isfinite(value):
        return None
    value.backward()
    return value


def _lbfgs_step(params, loss_fn, max_eval: int = 5, restart_after: int = RESTART_AFTER):
    """One L-BFGS iteration (strong-Wolfe line search, at most ``max_eval`` loss evaluations).

    The curvature memory is cleared once, after the first ``restart_after`` calls (0: never): the
    pairs stored during the large first steps from the initial hyperparameters can leave L-BFGS
    crawling at a constant tiny decrease (bike split 1 subset phase: 2171 -> 2110 in 37 calls; one
    restart: converged, test NLL -0.59 -> -1.53). Restarting every 5 calls instead cost elevators
    0.014 nats (the memory is useful once the pairs are local).

    An iteration that would run past the deadline is abandoned and its parameters restored, so
    every method gets the same wall-clock budget; an evaluation expected (median of the last five)
    to end past the deadline is not started.
    """
    optim = torch.optim.LBFGS(params, lr=1.0, max_iter=max_eval, max_eval=max_eval, history_size=20,
                              line_search_fn="strong_wolfe")  # fmt: skip

    calls = 0
    eval_seconds: list[float] = []  # one entry per loss-and-gradient evaluation

    def step(deadline):
        nonlocal calls
        if restart_after and calls == restart_after:
            optim.state.clear()
        calls += 1
        saved = [p.detach().clone() for p in params]

        def closure():
            # an evaluation that would end past the deadline is not started (at 41k points one
            # takes 6 s, and finishing it overran the budget by as much)
            expected = statistics.median(eval_seconds[-5:]) if eval_seconds else 0.0
            if time.perf_counter() + expected > deadline:
                raise _OutOfTime
            optim.zero_grad()
            start = time.perf_counter()
            value = _loss_and_grad(loss_fn)
            if value is not None:
                eval_seconds.append(time.perf_counter() - start)
                return value
            return torch.tensor(_BAD_LOSS)

        try:
            return optim.step(closure)
        except _OutOfTime:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
            raise

    step.restart = optim.state.clear
    step.eval_seconds = eval_seconds
    return step


def _pyro_params(model, guide, only: str | None = None) -> list[torch.Tensor]:
    """The unconstrained Pyro parameters of ``model``/``guide`` (those whose name contains ``only``)."""
    with pyro.poutine.trace(param_only=True) as capture:
        pyro.infer.Trace_ELBO().differentiable_loss(model, guide)
    return [site["value"].unconstrained() for name, site in capture.trace.nodes.items() if only is None or only in name]


# -- ours -------------------------------------------------------------------------------------------
def run_cagp(
    split,
    policy,
    objective: str,
    budget: float,
    max_steps: int,
    lr: float,
    optimizer: str = "adam",
    warm_start_n: int | None = None,
    seed: int = 0,
    warm_fraction: float = WARM_FRACTION,
    refine: CGPolicy | None = None,
    fixed_hypers: dict | None = None,
    refit_noise: bool = False,
    refit_mll: str | None = None,
    refine_fraction: float = REFINE_FRACTION,
    refit_share: float = 0.5,
) -> dict:
    """Train a ComputationAwareGP within ``budget`` seconds.

    ``optimizer="lbfgs"`` suits deterministic objectives (CaGP-Opt); CG actions change at every
    evaluation, so CG-based methods use Adam. With ``warm_start_n``, the first 60% of the budget
    fits the hyperparameters on a random subset of that size (cheap O(n^2) steps), the rest on all
    the data (fresh actions). With ``refine``, the last ``refine_fraction`` of the budget is kept
    for the prediction-time CG actions (``gp.posterior(..., refine=refine)``); their time (with the
    test predictions) is counted in ``train_seconds`` and reported as ``refine_seconds``. CG stops
    when the budget left, less ``PROJECTION_EVALS`` full-data loss evaluations for the projection
    that follows it, is spent (``CGPolicy.max_seconds``; protein, 41k points, float32: a CG iteration
    costs about 0.3 loss-and-gradient evaluations, the preconditioner 0.3, and the projection, the
    noise refit and the test predictions together about 0.8).
    ``fixed_hypers`` (``outputscale``, ``lengthscale``, ``noise``, e.g. a converged exact GP's record):
    keep these kernel hyperparameters and train only the actions (a diagnostic). ``refit_noise``: the
    refined prediction re-selects the noise by the ELBO of the extended actions
    (``gp.posterior(..., refit_noise=True)``); the ``*_norefit`` fields keep the trained noise.
    ``refit_mll`` (``"subset"``, ``"subset-kernel"`` or ``"stochastic"``, with ``refine``): the
    outputscale and the noise (``"subset-kernel"``: and the lengthscales, within ``refit_share`` of
    the reserve) are re-selected by the exact log marginal likelihood before the refinement
    (``gp.refit_mll``; its time counts, and CG gets what is left); the ``*_elbo_refit`` fields are
    the same model refined with the ELBO's noise instead (untimed).
    """
    if fixed_hypers is not None and optimizer != "lbfgs":
        raise ValueError("fixed_hypers is a CaGP-Opt (L-BFGS) diagnostic")
    pyro.clear_param_store()
    X, y = split.X_train, split.y_train
    subset = None
    if warm_start_n is not None and len(y) > warm_start_n:
        subset = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:warm_start_n]
    kernel, noise = make_kernel(split.dim), 0.1
    if fixed_hypers is not None:
        kernel.outputscale = fixed_hypers["outputscale"]
        kernel.base_kernel.lengthscale = torch.tensor(fixed_hypers["lengthscale"])[None]
        noise = fixed_hypers["noise"]
    gp = ComputationAwareGP(X if subset is None else X[subset], y if subset is None else y[subset],
                            kernel, policy=policy, noise=noise, objective=objective)  # fmt: skip
    loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
    only = "policy" if fixed_hypers is not None else None

    def make_step():
        if optimizer == "lbfgs":
            return _lbfgs_step(_pyro_params(gp.model, gp.guide, only), lambda: loss_fn(gp.model, gp.guide))
        svi = pyro.infer.SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": lr}), pyro.infer.Trace_ELBO())
        return _plain(svi.step)

    tol = 1e-6 if optimizer == "lbfgs" else 0.0
    with harness.measure() as m:
        steps, seconds, loss = 0, 0.0, math.nan
        if subset is not None:
            # a stall on the subset means it has converged there: move on to all the data
            steps, seconds, loss = _train(make_step(), warm_fraction * budget, max_steps, tol, restart_on_stall=False)
            gp.set_data(X, y)
        reserve = refine_fraction * budget if refine is not None else 0.0
        full_step = make_step()
        more, more_seconds, loss = _train(full_step, budget - reserve - seconds, max_steps, tol)
        steps, seconds = steps + more, seconds + more_seconds
        start = time.perf_counter()
        options = {"max_seconds": refit_share * reserve} if refit_mll == "subset-kernel" else {}
        mll = gp.refit_mll(refit_mll, **options) if refit_mll is not None and refine is not None else None
        mll_seconds = time.perf_counter() - start
        if refine is not None and getattr(full_step, "eval_seconds", None):
            # CG gets what is left of the budget after the projection, the noise refit and the test predictions
            # (float64 kernel entries where the re-selected noise is small: about three float32 passes)
            after_cg = (3 * PROJECTION_EVALS if mll is not None else PROJECTION_EVALS) * statistics.median(
                full_step.eval_seconds
            )
            refine.max_seconds = max(budget - seconds - (time.perf_counter() - start) - after_cg, 0.05 * reserve)
        with torch.no_grad():
            post = gp.posterior(split.X_test, refine=refine, refit_mll=mll,
                                refit_noise=refit_noise and refine is not None and mll is None)  # fmt: skip
        refine_seconds = time.perf_counter() - start if refine is not None else 0.0
    out = _metrics(split, post.mean, post.covariance + float(post.noise))
    if refine is not None:  # the same trained model without the refinement, for the ablation
        out.update(
            refine_seconds=refine_seconds,
            refine_iterations=refine.last_result.iterations,
            refine_stop=refine.last_result.stop_reason,
            noise_refit=float(post.noise),
        )
        if mll is not None:
            out.update(mll_multiplier=mll.multiplier, mll_noise=mll.noise, mll_evaluations=mll.evaluations,
                       mll_products=mll.products, mll_seconds=mll_seconds, mll_converged=mll.converged)  # fmt: skip
            if mll.kernel is not None:
                spec = mll.kernel.spec
                out.update(mll_outputscale=float(spec.outputscale), mll_lengthscale=spec.lengthscale.tolist())
            refine.max_seconds = None
            with torch.no_grad():
                elbo = gp.posterior(split.X_test, refine=refine, refit_noise=True)
            elbo_metrics = _metrics(split, elbo.mean, elbo.covariance + float(elbo.noise))
            out.update({f"{key}_elbo_refit": value for key, value in elbo_metrics.items()})
        with torch.no_grad():
            plain = gp.posterior(split.X_test)
        unrefined = _metrics(split, plain.mean, plain.covariance + float(plain.noise))
        out.update({f"{key}_unrefined": value for key, value in unrefined.items()})
        if refit_noise and mll is None:  # refined, trained noise (CG runs again, untimed)
            with torch.no_grad():
                kept = gp.posterior(split.X_test, refine=refine)
            norefit = _metrics(split, kept.mean, kept.covariance + float(kept.noise))
            out.update({f"{key}_norefit": value for key, value in norefit.items()})
    out.update(train_seconds=seconds + refine_seconds, peak_rss_mb=m.peak_rss_mb, steps=steps,
               final_loss=loss / split.n_train, noise=float(gp.noise), num_actions=policy.num_actions,
               **_kernel_hypers(gp.kernel))  # fmt: skip
    out["_gp"] = gp
    return out


def _kernel_hypers(kernel) -> dict:
    """The trained outputscale and lengthscales of ``make_kernel``'s kernel, for the JSON."""
    lengthscale = kernel.base_kernel.lengthscale.detach().flatten()
    return {"outputscale": float(kernel.outputscale), "lengthscale": [float(v) for v in lengthscale]}


# -- GPyTorch peers ---------------------------------------------------------------------------------
class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood, kernel):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _train_exact_like(model, likelihood, X, y, budget, max_steps, lr, optimizer="adam"):
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    def loss_fn():
        return -mll(model(X), y)

    if optimizer == "lbfgs":
        return _train(_lbfgs_step(list(model.parameters()), loss_fn), budget, max_steps, 1e-6)
    optim = torch.optim.Adam(model.parameters(), lr=lr)

    def step():
        optim.zero_grad()
        loss = loss_fn()
        loss.backward()
        optim.step()
        return loss

    return _train(_plain(step), budget, max_steps)


def _predict(model, likelihood, X, exact_variance: bool = False):
    """Predictive mean and variance. ``exact_variance``: the exact GP's variance from a Cholesky factor of
    the training covariance (LOVE, ``fast_pred_var``, gave variances about 2x the dense ones on elevators:
    95% coverage 0.97 against 0.90 at the same model); SGPR ignores the setting, SVGP needs neither."""
    model.eval()
    likelihood.eval()
    fast = gpytorch.settings.fast_pred_var(not exact_variance)
    exact = gpytorch.settings.max_cholesky_size(len(model.train_targets) + 1 if exact_variance else 800)
    with torch.no_grad(), fast, exact:
        pred = likelihood(model(X))
    return pred.mean, pred.variance


def run_exact(split, budget, max_steps, lr, max_n: int, seed: int) -> dict:
    X, y = split.X_train, split.y_train
    if len(y) > max_n:  # the dense kernel matrix does not fit: a random subsample
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_n]
        X, y = X[idx], y[idx]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = 0.1
    model = _ExactGP(X, y, likelihood, make_kernel(split.dim)).to(DTYPE)
    with harness.measure() as m:
        steps, seconds, loss = _train_exact_like(model, likelihood, X, y, budget, max_steps, lr)
        mean, var = _predict(model, likelihood, split.X_test, exact_variance=True)
    return {**_metrics(split, mean, var), "train_seconds": seconds, "peak_rss_mb": m.peak_rss_mb, "steps": steps,
            "n_used": len(y), "final_loss": loss}  # fmt: skip


def run_sgpr(split, budget, max_steps, lr, m_inducing: int, seed: int) -> dict:
    X, y = split.X_train, split.y_train
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:m_inducing]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = 0.1
    kernel = gpytorch.kernels.InducingPointKernel(make_kernel(split.dim), X[idx].clone(), likelihood)
    model = _ExactGP(X, y, likelihood, kernel).to(DTYPE)
    with harness.measure() as m:
        # Adam, as GPyTorch's SGPR examples: L-BFGS took catastrophic float32 steps on full elevators
        steps, seconds, loss = _train_exact_like(model, likelihood, X, y, budget, max_steps, lr)
        mean, var = _predict(model, likelihood, split.X_test)
    return {**_metrics(split, mean, var), "train_seconds": seconds, "peak_rss_mb": m.peak_rss_mb, "steps": steps,
            "final_loss": loss}  # fmt: skip


class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, Z, kernel):
        distribution = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(self, Z, distribution, learn_inducing_locations=True)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def run_svgp(split, budget, max_steps, lr, m_inducing: int, batch: int, seed: int) -> dict:
    X, y = split.X_train, split.y_train
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=gen)[:m_inducing]
    model = _SVGP(X[idx].clone(), make_kernel(split.dim)).to(DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    likelihood.noise = 0.1
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))
    optim = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=lr)
    order = {"perm": torch.randperm(len(y), generator=gen), "pos": 0}

    def step():
        if order["pos"] + batch > len(y):
            order["perm"], order["pos"] = torch.randperm(len(y), generator=gen), 0
        b = order["perm"][order["pos"] : order["pos"] + batch]
        order["pos"] += batch
        optim.zero_grad()
        loss = -mll(model(X[b]), y[b])
        loss.backward()
        optim.step()
        return loss

    with harness.measure() as m:
        steps, seconds, loss = _train(_plain(step), budget, max_steps)
        mean, var = _predict(model, likelihood, split.X_test)
    return {**_metrics(split, mean, var), "train_seconds": seconds, "peak_rss_mb": m.peak_rss_mb, "steps": steps,
            "final_loss": loss}  # fmt: skip


# -- converged reference --------------------------------------------------------------------------
def _exact_loss(kernel, likelihood, X, y):
    """Negative exact log marginal likelihood per point (zero mean, as CaGP-Opt's model), float64."""
    return -exact_log_marginal_likelihood(KernelFn(kernel), X, y, likelihood.noise) / len(y)


def _converge_lbfgs(params, loss_fn, max_evals: int, label: str) -> tuple[int, float]:
    """L-BFGS (strong Wolfe) until the loss per point changes by less than 1e-7 between iterations
    (0.001 nats in all at 10k points) or the gradient vanishes; prints every evaluation (they take
    30 s at 10k points)."""
    optim = torch.optim.LBFGS(params, lr=1.0, max_iter=max_evals, max_eval=max_evals, history_size=50,
                              tolerance_grad=1e-6, tolerance_change=1e-7, line_search_fn="strong_wolfe")  # fmt: skip
    evals, start = [0], time.perf_counter()

    def closure():
        optim.zero_grad()
        value = _loss_and_grad(loss_fn)
        evals[0] += 1
        shown = "invalid (backing off)" if value is None else f"{float(value.detach()):.6f}"
        print(f"  exact reference {label}: evaluation {evals[0]} loss {shown} ({time.perf_counter() - start:.0f}s)",
              flush=True)  # fmt: skip
        return torch.tensor(_BAD_LOSS) if value is None else value

    optim.step(closure)
    # L-BFGS's last evaluation may be a rejected line-search trial: loss and gradient at the final point
    optim.zero_grad()
    value = loss_fn()
    value.backward()
    loss, grad = float(value), max(float(p.grad.abs().max()) for p in params)
    print(f"  exact reference {label}: converged after {evals[0]} evaluations, loss {loss:.6f}, max |grad| {grad:.1e}",
          flush=True)  # fmt: skip
    return evals[0], loss


@torch.no_grad()
def exact_moments(kernel: KernelFn, X: torch.Tensor, residual: torch.Tensor, X_new: torch.Tensor, noise: float):
    """The exact GP's posterior mean (of the residual) and latent variance at ``X_new``, by a dense
    float64 Cholesky factor of K(X, X) + noise I."""
    mean, var, _ = exact_moments_and_quadratic(kernel, X, residual, X_new, noise)
    return mean, var


def exact_moments_and_quadratic(kernel: KernelFn, X, residual, X_new, noise: float):
    """:func:`exact_moments` and the quadratic form r^T (K + noise I)^-1 r, from the same factor."""
    X, X_new, r = X.double(), X_new.double(), residual.double()[:, None]
    K = kernel(X, X).double()
    K.diagonal().add_(noise)
    L = torch.linalg.cholesky(K)
    del K
    alpha = torch.cholesky_solve(r, L)
    Kxs = kernel(X, X_new).double()
    var = kernel.diag(X_new).double() - torch.linalg.solve_triangular(L, Kxs, upper=False).square().sum(0)
    return Kxs.T @ alpha[:, 0], var, float((r * alpha).sum())


def interval_scales(split, mean: torch.Tensor, var: torch.Tensor) -> dict:
    """Standardised scales of the test errors against the latent predictive spread (probes)."""
    error = (mean - split.y_test.double()).abs()
    return {"mean_latent_variance": float(var.mean()), "median_latent_sd": float(var.sqrt().median()),
            "median_abs_error": float(error.median()), "q95_abs_error": float(error.quantile(0.95))}  # fmt: skip


def run_exact_reference(split, max_n: int, seed: int, warm_start_n: int = 2500, max_evals: int = 200) -> dict:
    """The exact GP (dense float64 Cholesky, zero mean, the same kernel family and initialisation as
    CaGP-Opt) trained by L-BFGS to convergence, with no time budget: the reference for "test NLL
    within 0.05 of the exact GP's". L-BFGS converges first on a random ``warm_start_n`` subset
    (cheap), then on all points (the subset only saves evaluations). One loss-and-gradient
    evaluation at 10 000 points costs ~30 s on 2 cores (Cholesky, then its inverse for the
    closed-form gradient)."""
    X, y = split.X_train.double(), split.y_train.double()
    if len(y) > max_n:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_n]
        X, y = X[idx], y[idx]
    kernel = make_kernel(split.dim).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.1
    params = [*kernel.parameters(), *likelihood.parameters()]
    with harness.measure() as m:
        start = time.perf_counter()
        evals = 0
        if len(y) > warm_start_n:
            sub = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))[:warm_start_n]
            more, _ = _converge_lbfgs(params, lambda: _exact_loss(kernel, likelihood, X[sub], y[sub]), max_evals,
                                      f"subset {warm_start_n}")  # fmt: skip
            evals += more
        more, loss = _converge_lbfgs(params, lambda: _exact_loss(kernel, likelihood, X, y), max_evals, f"n={len(y)}")
        evals += more
        seconds = time.perf_counter() - start
        noise = float(likelihood.noise)
        mean, var = exact_moments(KernelFn(kernel), X, y, split.X_test.double(), noise)
        var = var + noise
    return {**_metrics(split, mean, var), "train_seconds": seconds, "peak_rss_mb": m.peak_rss_mb, "steps": evals,
            "n_used": len(y), "final_loss": loss, "noise": float(likelihood.noise),
            **_kernel_hypers(kernel)}  # fmt: skip


def _refine_policy(args) -> CGPolicy | None:
    """CaGP-Opt's prediction-time refinement: CG to tolerance 0.01, preconditioned by block
    RPCholesky of rank 1000 (50 pivots per step). On protein (20k points, trained model) it needs
    4 iterations against 11 with the sequential rank-200 factor, in 7.1 s against 11.3 s."""
    if not args.refine_iters:
        return None
    pivots = getattr(args, "refit_mll", "none") != "none"  # a small re-selected noise: pivots for the variance
    return CGPolicy(args.refine_iters, tol=0.01, preconditioner="rpcholesky",
                    preconditioner_rank=getattr(args, "pivots", 1000),
                    preconditioner_block_size=50, pivot_actions=pivots)  # fmt: skip


def probe_parser(description: str, dataset: str, out: str) -> argparse.ArgumentParser:
    """The arguments the one-split probes share: ``--dataset --split --budget --data-dir --out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default=dataset)
    parser.add_argument("--split", type=int, default=0)
    parser.add_argument("--budget", type=float, default=90.0)
    data_dir = harness.DEFAULT_DATA_DIR
    parser.add_argument("--data-dir", default=str(data_dir) if data_dir.is_dir() else None)
    parser.add_argument("--out", default=out)
    return parser


def probe_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a probe's arguments; a missing data directory is an error."""
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir is required (no ../shared/data next to the repository)")
    return args


def probe_fit(args: argparse.Namespace, refine: CGPolicy | None, **kwargs):
    """Load a probe's split and train CaGP-Opt on it as the benchmark does (``kwargs``: the refit
    options of :func:`run_cagp`). Returns ``split, result, gp``."""
    split = load_uci(args.dataset, args.split, args.data_dir, dtype=DTYPE, seed=args.split)
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_cagp(split, BlockSparsePolicy(min(512, split.n_train)), "elbo", args.budget, 2000, 0.1, "lbfgs",
                       5000, 0, WARM_FRACTION, refine, **kwargs)  # fmt: skip
    return split, res, res.pop("_gp")


FIXED = "CaGP-Opt (exact GP's hyperparameters)"


def _exact_hypers(args, split) -> dict:
    """The converged exact GP's kernel hyperparameters and noise for ``split`` from ``--hypers-from``."""
    if not args.hypers_from:
        raise ValueError(f"method {FIXED!r} needs --hypers-from (a JSON with 'Exact GP (converged Cholesky)' rows)")
    for record in json.loads(Path(args.hypers_from).read_text()):
        if (record["dataset"], record["split"], record["method"]) == (split.name, split.split,
                                                                      "Exact GP (converged Cholesky)"):  # fmt: skip
            return record
    raise ValueError(f"no converged exact-GP row for {split.name} split {split.split} in {args.hypers_from}")


# -- the three parts --------------------------------------------------------------------------------
def accuracy(args, records, trained):
    budget = args.budget
    cfg = {"actions": 512, "cg_actions": 32, "max_steps": 2000, "exact_max_n": 10000, "sgpr_m": 512,
           "svgp_m": 1024, "svgp_batch": 1024, "warm_start_n": 5000}  # fmt: skip
    if args.actions:
        cfg["actions"] = args.actions
    if args.quick:
        cfg.update(actions=128, cg_actions=16, exact_max_n=3000, sgpr_m=128, svgp_m=256, svgp_batch=512,
                   warm_start_n=1500)  # fmt: skip
    methods = {
        "CaGP-Opt": ("ours", lambda s: run_cagp(s, BlockSparsePolicy(min(cfg["actions"], s.n_train),
                                                                   init=args.action_init), "elbo",
                                                 budget, cfg["max_steps"], 0.1, "lbfgs", cfg["warm_start_n"],
                                                 args.seed, args.warm_fraction, _refine_policy(args),
                                                 refit_noise=not args.no_refit_noise,
                                                 refit_mll=None if args.refit_mll == "none" else args.refit_mll,
                                                 refine_fraction=args.refine_fraction,
                                                 refit_share=args.refit_share)),
        # diagnostic: the exact GP's hyperparameters (--hypers-from), only the actions trained, no subset phase
        FIXED: ("ours", lambda s: run_cagp(s, BlockSparsePolicy(min(cfg["actions"], s.n_train), init=args.action_init),
                                           "elbo", budget, cfg["max_steps"], 0.1, "lbfgs", None, args.seed,
                                           refine=_refine_policy(args), fixed_hypers=_exact_hypers(args, s))),
        "CaGP-CG": ("ours", lambda s: run_cagp(s, CGPolicy(cfg["cg_actions"], preconditioner="rpcholesky",
                                                           preconditioner_rank=64), "elbo",
                                               budget, cfg["max_steps"], 0.1)),
        "IterGP-CG": ("ours", lambda s: run_cagp(s, CGPolicy(cfg["cg_actions"], preconditioner="rpcholesky",
                                                             preconditioner_rank=64), "projected",
                                                 budget, cfg["max_steps"], 0.1)),
        "GPyTorch exact (CG)": ("peer", lambda s: run_exact(s, budget, cfg["max_steps"], 0.1, cfg["exact_max_n"],
                                                             args.seed)),
        "Exact GP (converged Cholesky)": ("peer", lambda s: run_exact_reference(s, cfg["exact_max_n"],
                                                                                      args.seed)),
        "GPyTorch SGPR": ("peer", lambda s: run_sgpr(s, budget, cfg["max_steps"], 0.1, cfg["sgpr_m"], args.seed)),
        "GPyTorch SVGP": ("peer", lambda s: run_svgp(s, budget, 100_000, 0.01, cfg["svgp_m"], cfg["svgp_batch"],
                                                      args.seed)),
    }  # fmt: skip
    # the diagnostic FIXED needs --hypers-from: by default it runs only when that is given
    default = [m for m in methods if m != FIXED or args.hypers_from]
    selected = [m for m in methods if m in args.methods] if args.methods else default
    for dataset in args.datasets:
        for split_id in args.splits:
            split = load_uci(dataset, split_id, args.data_dir, dtype=DTYPE, max_train=args.max_train, seed=split_id)
            for method in selected:
                role, run = methods[method]
                pyro.set_rng_seed(args.seed)
                torch.manual_seed(args.seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run(split)
                gp = result.pop("_gp", None)
                if gp is not None and method == "CaGP-Opt":
                    trained[(dataset, split_id)] = gp
                    if "outputscale" in args.parts.split(","):
                        outputscale_probe(args, records, split, gp)
                records.append(harness.record("gp_uci", dataset, split_id, method, role, n_train=split.n_train,
                                              budget_seconds=budget, **result))  # fmt: skip
                print(f"{dataset:>10} {split_id} {method:>20}: RMSE {result['rmse']:.4f} NLL {result['nll']:.3f} "
                      f"cov {result['coverage95']:.3f} steps {result['steps']} {result['train_seconds']:.0f}s "
                      f"RSS {result['peak_rss_mb']:.0f}MB", flush=True)  # fmt: skip
                harness.write_json(records, args.out)


def _step_seconds(make_step, repeats: int) -> float:
    step = make_step()
    step()  # warm-up (allocations, action initialisation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cagp_step(split, num_actions):
    pyro.clear_param_store()
    gp = ComputationAwareGP(split.X_train, split.y_train, make_kernel(split.dim),
                            policy=BlockSparsePolicy(num_actions), noise=0.1)  # fmt: skip
    loss_fn = pyro.infer.Trace_ELBO().differentiable_loss
    params = _pyro_params(gp.model, gp.guide)
    optim = torch.optim.Adam(params, lr=0.1)

    def step():  # one loss-and-gradient evaluation, as in one L-BFGS function evaluation
        optim.zero_grad()
        loss_fn(gp.model, gp.guide).backward()
        optim.step()

    return step


def _exact_step(split):
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    model = _ExactGP(split.X_train, split.y_train, likelihood, make_kernel(split.dim)).to(DTYPE)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)

    def step():
        optim.zero_grad()
        (-mll(model(split.X_train), split.y_train)).backward()
        optim.step()

    return step


def outputscale_probe(args, records, split, gp):
    r"""Would re-selecting the outputscale with the noise help? For a CaGP-Opt model just trained on
    ``split`` (Pyro's parameters are global, so before the next model is built): the refined
    projection (trained noise) with :math:`K` scaled by ``a`` (no new kernel product: :math:`KS`,
    :math:`S^\top K S` and :math:`\operatorname{diag} K` scale with it), the noise re-selected by
    :func:`refit_noise` at each ``a``, and the ELBO and test metrics there."""
    probe = []
    with torch.no_grad():
        marginal = gp.marginal()
        projection = gp.refined_projection(_refine_policy(args))
        X = gp._refinement_inputs(marginal)
        diag_K = marginal.kernel.diag(gp.X).double()
        KxS = projection.actions.kernel_product(marginal.kernel, split.X_test.to(X.dtype), X).double()
        k_test = marginal.kernel.diag(split.X_test).double()
        prior_test = gp._prior_mean(split.X_test).double()
        for a in torch.logspace(math.log10(0.25), math.log10(4.0), 17, dtype=torch.float64).tolist():
            scaled = _factorise(projection.actions, projection.residual, projection.noise, projection.KS.double() * a,
                                projection.StKS * a, projection.StS, projection.Str)  # fmt: skip
            refit = refit_noise(scaled, diag_K * a, min_noise=float(gp.jitter))
            root = torch.linalg.solve_triangular(refit.chol_G, a * KxS.T, upper=False)
            var = (a * k_test - root.square().sum(0)).clamp_min(0) + refit.noise
            metrics = _metrics(split, prior_test + a * KxS @ refit.weights, var)
            elbo = float(refit.elbo(diag_K * a)) / split.n_train
            fields = dict(multiplier=a, noise=float(refit.noise), elbo_per_point=elbo, **metrics)
            record = harness.record("gp_uci_outputscale_probe", split.name, split.split, "CaGP-Opt", "ours", **fields)
            probe.append(record)
    chosen = max(probe, key=lambda r: r["elbo_per_point"])
    at_one = min(probe, key=lambda r: abs(math.log(r["multiplier"])))
    print(f"{split.name:>10} {split.split} outputscale x{chosen['multiplier']:.2f} (ELBO's choice): NLL "
          f"{chosen['nll']:.4f} vs {at_one['nll']:.4f} at x1", flush=True)  # fmt: skip
    records.extend(probe)


def scaling(args, records):
    sizes = [1000, 2000] if args.quick else [2500, 5000, 10000, 20000, 40000]
    dataset = "protein" if not args.quick else args.datasets[0]
    for n in sizes:
        split = load_uci(dataset, 0, args.data_dir, dtype=DTYPE, max_train=n, seed=0)
        if split.n_train < n:
            continue

        cagp_step = functools.partial(_cagp_step, split, min(512, n))
        exact_step = functools.partial(_exact_step, split)

        for method, make, role in (("CaGP-Opt", cagp_step, "ours"), ("GPyTorch exact (CG)", exact_step, "peer")):
            if method.startswith("GPyTorch") and n > args.exact_scaling_max_n:
                print(f"scaling n={n}: {method} skipped (dense {n}x{n} kernel matrix)", flush=True)
                continue
            with harness.measure() as m:
                seconds = _step_seconds(make, 1 if n >= 20000 else 3)
            records.append(harness.record("gp_scaling", dataset, 0, method, role, n_train=n,
                                          seconds_per_step=seconds, peak_rss_mb=m.peak_rss_mb))  # fmt: skip
            print(f"scaling n={n:6d} {method:>20}: {seconds:.3f} s/step, RSS {m.peak_rss_mb:.0f}MB", flush=True)
            harness.write_json(records, args.out)


def cg_iterations(args, records, trained):
    dataset = "elevators" if not args.quick else args.datasets[0]
    split = load_uci(dataset, 0, args.data_dir, dtype=DTYPE, max_train=args.max_train, seed=0)
    gp = trained.get((dataset, 0))
    kernel = (gp.kernel if gp is not None else make_kernel(split.dim)).double()  # precision is not the point here
    noise = torch.tensor(float(gp.noise) if gp is not None else 0.01, dtype=torch.float64)
    kfn = KernelFn(kernel)
    X = split.X_train.detach().double()
    rank = 50 if args.quick else 200

    def matvec(v):
        return kernel_matmul(kfn, X, X, v[:, None])[:, 0] + noise * v

    for name in ("none", "pivoted", "rpcholesky"):
        with torch.no_grad(), harness.measure() as m:
            pre = None
            if name != "none":
                pre = build_preconditioner(kfn, X, noise, rank, pivoting="greedy" if name == "pivoted" else name,
                                           generator=torch.Generator().manual_seed(0)).solve  # fmt: skip
            result = conjugate_gradients(matvec, split.y_train.double(), max_iter=args.cg_max_iter, tol=0.01,
                                         preconditioner=pre)  # fmt: skip
        records.append(harness.record("gp_cg", dataset, 0, f"CG, {name} preconditioner", "ours", n_train=split.n_train,
                                      cg_iterations=result.iterations, residual=result.converged_at,
                                      preconditioner_rank=0 if name == "none" else rank, train_seconds=m.seconds,
                                      noise=float(noise), stop_reason=result.stop_reason))  # fmt: skip
        print(f"CG {name:>10}: {result.iterations} iterations ({result.stop_reason}) to residual "
              f"{result.converged_at:.3g} ({m.seconds:.1f}s, noise {float(noise):.3g})", flush=True)  # fmt: skip
        harness.write_json(records, args.out)


def main(argv=None):
    def extra(parser):
        parser.add_argument("--parts", default="accuracy,scaling,cg")
        parser.add_argument("--budget", type=float, default=None, help="training seconds per method")
        parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
        parser.add_argument("--max-train", type=int, default=None, help="subsample training sets (smoke runs)")
        parser.add_argument("--exact-scaling-max-n", type=int, default=20000)
        parser.add_argument("--cg-max-iter", type=int, default=1000)
        parser.add_argument("--actions", type=int, default=None, help="CaGP-Opt's number of actions (512)")
        parser.add_argument(
            "--warm-fraction",
            type=float,
            default=WARM_FRACTION,
            help="share of CaGP-Opt's budget spent on the warm-start subset",
        )
        parser.add_argument(
            "--refine-iters",
            type=int,
            default=20,
            help="CaGP-Opt's prediction-time CG actions (0: predict with the learned actions only)",
        )
        help_ = "CaGP-Opt's refined prediction keeps the trained noise (default: re-selected by the refined ELBO)"
        parser.add_argument("--no-refit-noise", action="store_true", help=help_)
        help_ = (
            "CaGP-Opt's refined prediction re-selects the outputscale and noise by the exact marginal likelihood: "
            "'subset' (dense, random subsets), 'stochastic' (matrix-free) or 'none' (the ELBO's noise refit)"
        )
        parser.add_argument(
            "--refit-mll",
            default="none",
            choices=["none", "subset", "subset-kernel", "stochastic"],
            help=help_ + "; 'subset-kernel': the lengthscales too (L-BFGS on the subsets' likelihood)",
        )
        help_ = "share of the refinement reserve the 'subset-kernel' refit may take (the rest is CG's)"
        parser.add_argument("--refit-share", type=float, default=0.5, help=help_)
        help_ = "rank of the refinement's RPCholesky preconditioner (its pivots: unit-vector actions with --refit-mll)"
        parser.add_argument("--pivots", type=int, default=1000, help=help_)
        help_ = "share of CaGP-Opt's budget kept for the prediction-time refinement (and --refit-mll)"
        parser.add_argument("--refine-fraction", type=float, default=REFINE_FRACTION, help=help_)
        parser.add_argument("--hypers-from", default=None, help=f"JSON with exact-GP rows, for {FIXED!r}")
        parser.add_argument("--action-init", default="constant", help="CaGP-Opt's BlockSparsePolicy init")

    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=["elevators", "bike", "pol", "protein"],
                              default_splits=[0, 1, 2], quick_datasets=["elevators"], quick_splits=[0],
                              argv=argv, extra=extra)  # fmt: skip
    args.methods = args.methods.split(",") if args.methods else None
    if args.quick:
        args.budget = args.budget or 10.0
        args.max_train = args.max_train or 3000
        args.cg_max_iter = min(args.cg_max_iter, 300)
    args.budget = args.budget or 300.0
    parts = args.parts.split(",")
    records, trained = [], {}
    if "accuracy" in parts:
        accuracy(args, records, trained)
    if "scaling" in parts:
        scaling(args, records)
    if "cg" in parts:
        cg_iterations(args, records, trained)
    acc = [r for r in records if r["benchmark"] == "gp_uci"]
    if acc:
        table = harness.markdown_table(acc, ["rmse", "nll", "coverage95", "train_seconds", "peak_rss_mb"])
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table)
    return records


if __name__ == "__main__":
    main()
