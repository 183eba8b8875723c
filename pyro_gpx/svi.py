"""Thin, optional training loops (SVI, L-BFGS) with progress bars and loud failures on non-finite losses."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

from ._validation import check_positive_int, is_finite_at_least, is_integer

__all__ = ["CollapseGuard", "fit_svi", "fit_lbfgs"]

_BAD_LOSS = 1e10  # at least; not far larger: L-BFGS's line search squares it, in the parameters' (maybe float32) dtype


def _numerical_failure(error: BaseException | None) -> bool:
    """Whether an exception (or its cause, as Pyro re-raises) is a NaN/indefinite-matrix failure."""
    from pyro_gpx.gp.cholesky import CholeskyError, NonFiniteError

    while error is not None:
        if isinstance(error, (CholeskyError, NonFiniteError, FloatingPointError)):
            return True
        error = error.__cause__
    return False


def _optimizer_state(obj) -> tuple[dict, dict | None]:
    """Copies of a torch optimiser's state and, for a learning-rate scheduler, the scheduler's too."""
    optimizer = getattr(obj, "optimizer", obj)
    scheduler = copy.deepcopy(obj.state_dict()) if obj is not optimizer else None
    return copy.deepcopy(optimizer.state_dict()), scheduler


class CollapseGuard:
    """Rolls an SVI run back to its best state when a monitored score collapses.

    Called before each SVI step (``fit_svi(..., guard=...)``, or by hand). Every ``every`` calls it
    evaluates ``score()``, a quantity to maximise that needs no knowledge of the answer (say the ELBO
    of fresh paths, ``lambda: guide.log_normalizer(1024)["elbo"]``). A new best saves every parameter
    in Pyro's param store and the state of each of ``svi``'s optimisers (Adam's moments included); a
    score more than ``drop`` below the best, or not finite, restores them, learning rates included,
    and multiplies every restored rate (``lr``, and ``initial_lr`` where a schedule keeps one) by
    ``lr_factor``: each rollback resumes from the best state at ``lr_factor`` times its rate (a
    repeated collapse does not lower the rate further, unless a new best was saved since). A step
    whose loss is not finite can be rolled back the same way (:meth:`rollback`; ``fit_svi`` does
    this when it has a guard).

    Log-variance training of a diffusion guide on a multimodal target can collapse within a few
    hundred steps after converging (``benchmarks/samplers.py``, many-well: the ELBO fell from 159.9
    to 108.6); rolling back keeps the converged state instead of ending with a broken guide.

    :param svi: the :class:`pyro.infer.SVI` being run (its optimiser states are saved once it has
        taken a step).
    :param score: a zero-argument callable returning a float, higher is better.
    :param every: calls between evaluations (>= 1).
    :param drop: how far below the best score counts as a collapse (> 0).
    :param lr_factor: learning-rate multiplier at each rollback, in (0, 1].
    """

    def __init__(self, svi: SVI, score: Callable[[], float], every: int = 500, drop: float = 10.0,
                 lr_factor: float = 0.5):  # fmt: skip
        if not (is_integer(every) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not is_finite_at_least(drop, 0.0, strict=True):
            raise ValueError(f"drop must be a finite positive number, got {drop!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        self.svi, self.score, self.every, self.drop, self.lr_factor = svi, score, every, float(drop), lr_factor
        self.calls, self.best, self.rollbacks = 0, -math.inf, 0
        self._saved: tuple[dict, dict] | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.check()

    def check(self) -> float:
        """Evaluate the score now: save a new best, or roll back a collapse. Returns the score (NaN
        where evaluating it failed numerically, e.g. a collapsed guide's non-finite density)."""
        try:
            with torch.no_grad():
                value = float(self.score())
        except Exception as error:  # a collapsed guide can make the score itself fail
            if not _numerical_failure(error):
                raise
            value = math.nan
        store, optimizers = pyro.get_param_store(), self.svi.optim.optim_objs
        if math.isfinite(value) and value > self.best:
            self.best = value
            self._saved = ({name: p.detach().clone() for name, p in store.named_parameters()},
                           {p: _optimizer_state(opt) for p, opt in optimizers.items()})  # fmt: skip
        elif self._saved is not None and (not math.isfinite(value) or not value > self.best - self.drop):
            self.rollback()  # +inf too: e.g. an ELBO whose guide's log density fell to -inf
        return value

    def rollback(self) -> bool:
        """Restore the best saved state at a lower learning rate; ``False`` if nothing is saved yet, or
        if a parameter created after the best save is not finite (there is nothing to restore it to)."""
        if self._saved is None:
            return False
        store, optimizers = pyro.get_param_store(), self.svi.optim.optim_objs
        values, states = self._saved
        if not all(name in values or bool(torch.isfinite(p).all()) for name, p in store.named_parameters()):
            return False
        with torch.no_grad():
            for name, p in store.named_parameters():
                if name in values:
                    p.copy_(values[name])
        for p, obj in optimizers.items():
            optimizer = getattr(obj, "optimizer", obj)  # a Pyro scheduler wraps a torch optimiser
            if p not in states:  # created after the best save: its fresh state at this first rollback is saved
                optimizer.state.clear()
                states[p] = _optimizer_state(obj)
            optimizer.load_state_dict(states[p][0])
            if states[p][1] is not None:
                obj.load_state_dict(states[p][1])
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] *= self.lr_factor
            if obj is not optimizer and hasattr(obj, "base_lrs"):
                obj.base_lrs = [lr * self.lr_factor for lr in obj.base_lrs]
        self.rollbacks += 1
        return True


def fit_svi(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    optim: pyro.optim.PyroOptim | None = None,
    loss: ELBO | None = None,
    progress: bool = True,
    guard: Callable[[SVI], CollapseGuard] | None = None,
    **kwargs,
) -> list[float]:
    """Run ``num_steps`` of :class:`pyro.infer.SVI` and return the losses.

    This is plain Pyro (``SVI(model, guide, optim, loss).step(*args, **kwargs)`` in a loop),
    with a tqdm bar and a :class:`FloatingPointError` naming the step when the loss stops being
    finite, or naming the parameters a step made non-finite (a finite loss with an infinite
    gradient), instead of silently training on NaN.

    :param optim: a Pyro optimiser; ``Adam(lr=0.01)`` by default.
    :param loss: an ELBO; ``Trace_ELBO()`` by default.
    :param guard: ``guard(svi)`` builds a :class:`CollapseGuard` for the run, called before each
        step, e.g. ``lambda svi: CollapseGuard(svi, lambda: guide.log_normalizer(1024)["elbo"])``;
        a non-finite loss is then rolled back (and left out of the returned losses) once the guard
        has saved a state, and is an error before that.

    Other keyword arguments go to the model and guide; one of theirs named ``num_steps``, ``optim``,
    ``loss``, ``progress`` or ``guard`` is taken by ``fit_svi`` itself, so pass it positionally or bind it
    with :func:`functools.partial`.

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
    num_steps = check_positive_int("num_steps", num_steps)
    if optim is None:
        optim = pyro.optim.Adam({"lr": 0.01})  # type: ignore[attr-defined]  # pyro.optim makes Adam at import time
    svi = SVI(model, guide, optim, loss or Trace_ELBO())
    watch = guard(svi) if guard is not None else None
    losses: list[float] = []
    bar = tqdm(range(num_steps), disable=not progress, desc="SVI", mininterval=0.5)
    for step in bar:
        if watch is not None:
            watch()
        try:
            value = svi.step(*args, **kwargs)
        except (FloatingPointError, ValueError) as error:
            # FloatingPointError: a loss that checks itself (e.g. LogVarianceLoss). ValueError: Pyro's
            # validation of a distribution whose parameter the previous step made NaN (a finite loss with
            # an infinite gradient)
            bad = _non_finite_parameters()
            if isinstance(error, ValueError) and not bad:
                raise
            if watch is not None and watch.rollback():
                continue
            if bad:
                raise FloatingPointError(f"SVI parameter(s) {bad} became non-finite before step {step}") from error
            raise
        if not math.isfinite(value):
            if watch is not None and watch.rollback():
                continue
            raise FloatingPointError(f"SVI loss became {value} at step {step}")
        losses.append(value)
        if step % 50 == 0 or step == num_steps - 1:  # the bar ends on the last loss
            bar.set_postfix(loss=f"{value:.4g}")
    bad = _non_finite_parameters()  # the last step's update (finite loss, infinite gradient)
    if bad and not (watch is not None and watch.rollback()):
        raise FloatingPointError(f"SVI parameter(s) {bad} became non-finite at the last step")
    return losses


def _non_finite_parameters() -> list[str]:
    """Names of the param store's parameters holding NaN or infinite values."""
    return [name for name, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all())]


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
    :param loss: a Pyro loss with ``differentiable_loss`` (default ``Trace_ELBO()``).
    :param lr: L-BFGS's initial step length; :param max_eval: loss evaluations per iteration;
        :param history_size: curvature pairs kept (all passed to ``torch.optim.LBFGS``).
    :param tolerance_change: passed to ``torch.optim.LBFGS`` (an absolute tolerance within an iteration);
        also, the run stops when the loss changes between iterations by at most
        ``tolerance_change * max(1, |loss|)``, a relative tolerance for large losses.
    :param progress: show a tqdm bar.
    :param restart_after: clear the curvature memory once, after this many iterations (0: never).
        The pairs stored during the large first steps from a poor initial point can leave L-BFGS
        crawling at a constant tiny decrease; one restart from where it stands then resumes
        normal progress (``benchmarks/gp_uci.py``, CaGP-Opt on a bike subset: 2171 -> 2110 in 37
        iterations of 5 evaluations without a restart, -6520 in 30 with one after 5).
    :returns: the loss at the start of each iteration (``LBFGS.step``'s value: the first entry is the
        initial loss, and the loss after the last iteration is not included).
    """
    num_steps = check_positive_int("num_steps", num_steps)
    max_eval = check_positive_int("max_eval", max_eval)
    history_size = check_positive_int("history_size", history_size)
    if not is_finite_at_least(tolerance_change, 0.0):
        raise ValueError(f"tolerance_change must be a finite number >= 0, got {tolerance_change!r}")
    if not is_finite_at_least(lr, 0.0, strict=True):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if not is_integer(restart_after) or restart_after < 0:
        raise ValueError(f"restart_after must be an integer >= 0, got {restart_after!r}")
    elbo = loss or Trace_ELBO()
    loss_fn = getattr(elbo, "differentiable_loss", None)  # not on every ELBO (e.g. TraceGraph_ELBO)
    if loss_fn is None:
        raise TypeError(f"fit_lbfgs needs a loss with differentiable_loss, e.g. Trace_ELBO; got {type(elbo).__name__}")
    with poutine.trace(param_only=True) as param_capture:
        loss_fn(model, guide, *args, **kwargs)
    # the param store's tensors carry unconstrained(); Pyro types a site's value as Optional
    params = [site["value"].unconstrained() for site in param_capture.trace.nodes.values()]  # type: ignore[union-attr]
    if not params:
        raise ValueError("the model and guide have no pyro.param to optimise")
    optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=max_eval, max_eval=max_eval, history_size=history_size,
                                  tolerance_change=tolerance_change, line_search_fn="strong_wolfe")  # fmt: skip

    failed: list[bool] = []  # per loss evaluation: whether it left the numerically valid region
    bad_loss = _BAD_LOSS

    def closure():
        nonlocal bad_loss
        optimizer.zero_grad()
        try:
            value = loss_fn(model, guide, *args, **kwargs)
        except (ValueError, RuntimeError) as e:
            if not _numerical_failure(e):
                raise
            value = None
        failed.append(value is None or not bool(torch.isfinite(value)))
        if failed[-1]:
            # a trial point of the line search left the numerically valid region: report it as
            # very bad (zero gradient) so the search steps back, instead of a NaN that derails it
            return torch.tensor(bad_loss)
        bad_loss = max(bad_loss, 4.0 * abs(float(value)))  # worse than every loss seen
        value.backward()
        return value

    losses: list[float] = []
    bar = tqdm(range(num_steps), disable=not progress, desc="L-BFGS", mininterval=0.5)
    for step in bar:
        if restart_after and step == restart_after:
            optimizer.state.clear()
        first = len(failed)
        value = float(optimizer.step(closure).detach())  # the closure's loss still holds its graph
        if failed[first] or not math.isfinite(value):  # LBFGS.step returns its first evaluation
            raise FloatingPointError(f"L-BFGS started from a point where the loss is not finite (step {len(losses)})")
        losses.append(value)
        bar.set_postfix(loss=f"{losses[-1]:.5g}")
        if len(losses) > 1 and abs(losses[-2] - losses[-1]) <= tolerance_change * max(1.0, abs(losses[-1])):
            break
    return losses
