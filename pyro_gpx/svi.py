"""Thin, optional training loops (SVI, L-BFGS) with progress bars and loud failures on non-finite losses."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

__all__ = ["fit_svi", "fit_lbfgs"]

_BAD_LOSS = 1e10  # not larger: L-BFGS's line search squares it, in the parameters' (maybe float32) dtype


def _numerical_failure(error: BaseException) -> bool:
    """Whether an exception (or its cause, as Pyro re-raises) is a NaN/indefinite-matrix failure."""
    from pyro_gpx.gp.cholesky import CholeskyError, NonFiniteError

    while error is not None:
        if isinstance(error, (CholeskyError, NonFiniteError, FloatingPointError)):
            return True
        error = error.__cause__
    return False


def fit_svi(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    optim: pyro.optim.PyroOptim | None = None,
    loss: ELBO | None = None,
    progress: bool = True,
    **kwargs,
) -> list[float]:
    """Run ``num_steps`` of :class:`pyro.infer.SVI` and return the losses.

    This is plain Pyro (``SVI(model, guide, optim, loss).step(*args, **kwargs)`` in a loop),
    with a tqdm bar and a :class:`FloatingPointError` naming the step when the loss stops being
    finite, instead of silently training on NaN.

    :param optim: a Pyro optimiser; ``Adam(lr=0.01)`` by default.
    :param loss: an ELBO; ``Trace_ELBO()`` by default.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> losses = fit_svi(model, AutoNormal(model), torch.zeros(3), num_steps=5, progress=False)
        >>> len(losses)
        5
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    svi = SVI(model, guide, optim or pyro.optim.Adam({"lr": 0.01}), loss or Trace_ELBO())
    losses: list[float] = []
    bar = tqdm(range(num_steps), disable=not progress, desc="SVI", mininterval=0.5)
    for step in bar:
        value = svi.step(*args, **kwargs)
        if not math.isfinite(value):
            raise FloatingPointError(f"SVI loss became {value} at step {step}")
        losses.append(value)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4g}")
    return losses


def fit_lbfgs(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 20,
    loss: ELBO | None = None,
    lr: float = 1.0,
    max_eval: int = 25,
    history_size: int = 20,
    tolerance_change: float = 1e-9,
    restart_after: int = 0,
    progress: bool = True,
    **kwargs,
) -> list[float]:
    """Minimise a deterministic Pyro loss with L-BFGS (strong-Wolfe line search).

    For objectives without Monte Carlo noise (type-II maximum likelihood or MAP of GP
    hyperparameters, e.g. ``ComputationAwareGP`` with an empty or ``AutoDelta`` guide), L-BFGS needs
    far fewer loss evaluations than Adam (Maddox et al. 2021 recommend it for iterative GPs). The
    parameters are those Pyro's SVI would train: every ``pyro.param`` the loss touches.

    :param num_steps: L-BFGS iterations, each at most ``max_eval`` loss evaluations.
    :param restart_after: clear the curvature memory once, after this many iterations (0: never).
        The pairs stored during the large first steps from a poor initial point can leave L-BFGS
        crawling at a constant tiny decrease; one restart from where it stands then resumes
        normal progress (``benchmarks/gp_uci.py``, CaGP-Opt on a bike subset: 2171 -> 2110 in 37
        iterations of 5 evaluations without a restart, -6520 in 30 with one after 5).
    :returns: the loss after each iteration.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if restart_after < 0:
        raise ValueError(f"restart_after must be >= 0, got {restart_after}")
    loss_fn = (loss or Trace_ELBO()).differentiable_loss
    with poutine.trace(param_only=True) as param_capture:
        loss_fn(model, guide, *args, **kwargs)
    params = [site["value"].unconstrained() for site in param_capture.trace.nodes.values()]
    if not params:
        raise ValueError("the model and guide have no pyro.param to optimise")
    optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=max_eval, max_eval=max_eval, history_size=history_size,
                                  tolerance_change=tolerance_change, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        optimizer.zero_grad()
        try:
            value = loss_fn(model, guide, *args, **kwargs)
        except (ValueError, RuntimeError) as e:
            if not _numerical_failure(e):
                raise
            value = None
        if value is None or not torch.isfinite(value):
            # a trial point of the line search left the numerically valid region: report it as
            # very bad (zero gradient) so the search steps back, instead of a NaN that derails it
            return torch.tensor(_BAD_LOSS)
        value.backward()
        return value

    losses: list[float] = []
    bar = tqdm(range(num_steps), disable=not progress, desc="L-BFGS", mininterval=0.5)
    for step in bar:
        if restart_after and step == restart_after:
            optimizer.state.clear()
        value = float(optimizer.step(closure))
        if not math.isfinite(value) or value >= _BAD_LOSS:
            raise FloatingPointError(f"L-BFGS started from a point where the loss is not finite (step {len(losses)})")
        losses.append(value)
        bar.set_postfix(loss=f"{losses[-1]:.5g}")
        if len(losses) > 1 and abs(losses[-2] - losses[-1]) <= tolerance_change * max(1.0, abs(losses[-1])):
            break
    return losses
