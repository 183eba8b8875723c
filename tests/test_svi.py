"""The optional training loops."""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_gpx.svi import CollapseGuard, fit_lbfgs, fit_svi


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_fit_svi_reduces_loss():
    y = torch.randn(50) + 3.0
    losses = fit_svi(model, AutoNormal(model), y, num_steps=300, optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
    assert losses[-1] < losses[0]


def test_fit_lbfgs_finds_the_map_exactly():
    y = torch.randn(50, generator=torch.Generator().manual_seed(0)) + 3.0
    guide = AutoDelta(model)
    fit_lbfgs(model, guide, y, num_steps=10, progress=False)
    # MAP of a Normal mean with a N(0, 10^2) prior and unit noise
    expected = y.sum() / (len(y) + 1 / 100)
    assert float(guide.median()["mu"]) == pytest.approx(float(expected), abs=1e-4)


def test_non_finite_loss_is_an_error():
    def bad(y):
        mu = pyro.param("mu", torch.tensor(0.0))
        pyro.factor("nan", mu * float("nan"))

    with pyro.validation_enabled(False):  # Pyro's own checks would catch this NaN earlier
        with pytest.raises(FloatingPointError, match="step 0"):
            fit_svi(bad, lambda y: None, torch.zeros(1), num_steps=2, progress=False)
        with pytest.raises(FloatingPointError):
            fit_lbfgs(bad, lambda y: None, torch.zeros(1), num_steps=2, progress=False)
    for bad in (0, float("nan"), float("inf"), 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            fit_svi(model, AutoNormal(model), torch.zeros(1), num_steps=bad)
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            fit_lbfgs(model, AutoNormal(model), torch.zeros(1), num_steps=bad)


def _banana():
    x = pyro.param("x", torch.tensor([-1.5, 2.0], dtype=torch.float64))
    pyro.factor("rosenbrock", -((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2))


def _lbfgs_point(schedule, **kwargs):
    pyro.clear_param_store()
    for num_steps in schedule:
        fit_lbfgs(_banana, lambda: None, num_steps=num_steps, max_eval=3, progress=False, **kwargs)
    return pyro.param("x").detach().clone()


def test_fit_lbfgs_restart_clears_the_memory():
    # a restart after 2 iterations is a fresh L-BFGS from where the first 2 left off
    restarted = _lbfgs_point([4], restart_after=2)
    assert torch.equal(restarted, _lbfgs_point([2, 2]))
    assert not torch.equal(restarted, _lbfgs_point([4]))  # the memory mattered
    with pytest.raises(ValueError, match="restart_after"):
        fit_lbfgs(_banana, lambda: None, restart_after=-1, progress=False)
    for bad in (0, -1):  # an IndexError from torch's LBFGS before
        with pytest.raises(ValueError, match="history_size must be a positive integer"):
            fit_lbfgs(_banana, lambda: None, history_size=bad, progress=False)
    with pytest.raises(ValueError, match="tolerance_change must be a finite number"):
        fit_lbfgs(_banana, lambda: None, tolerance_change=float("nan"), progress=False)


def _quadratic():  # a deterministic loss (x - 3)^2 with an empty guide: SVI is plain Adam on x
    x = pyro.param("x", torch.tensor(0.0, dtype=torch.float64))
    pyro.factor("quadratic", -((x - 3.0) ** 2))


def test_collapse_guard_restores_the_best_state_and_lowers_the_rate():
    pyro.clear_param_store()
    svi = SVI(_quadratic, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    scores = iter([-1.0, -0.5, -100.0, -0.7])  # the third evaluation is a collapse (drop 10), the fourth is not

    guard = CollapseGuard(svi, lambda: next(scores), every=2, drop=10.0)
    saved = None
    for step in range(8):
        guard()
        if step == 3:  # the second evaluation (a new best) just saved this state
            saved = (pyro.param("x").detach().clone(), copy.deepcopy(next(iter(svi.optim.optim_objs.values())).state))
        if step == 5:  # the collapse was just rolled back: the parameter and Adam's moments are those saved
            optimizer = next(iter(svi.optim.optim_objs.values()))
            assert torch.equal(pyro.param("x").detach(), saved[0])
            (state,) = optimizer.state.values()
            (saved_state,) = saved[1].values()
            assert torch.equal(state["exp_avg"], saved_state["exp_avg"])
            assert torch.equal(state["exp_avg_sq"], saved_state["exp_avg_sq"])
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
        svi.step()
    assert guard.rollbacks == 1 and guard.best == -0.5


def test_collapse_guard_in_fit_svi_and_its_arguments():
    pyro.clear_param_store()
    values = []

    def score():  # evaluated every 10 steps on the moving parameter; no collapse, so no rollback
        values.append(float(pyro.param("x")))
        return -((values[-1] - 3.0) ** 2)

    guards = []

    def make(svi):
        guards.append(CollapseGuard(svi, score, every=10))
        return guards[-1]

    fit_svi(_quadratic, lambda: None, num_steps=50, optim=pyro.optim.Adam({"lr": 0.1}), guard=make, progress=False)
    assert len(values) == 5 and len(set(values)) == 5 and guards[0].rollbacks == 0
    svi = SVI(_quadratic, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for kwargs, name in (({"every": 0}, "every"), ({"every": True}, "every"), ({"drop": 0.0}, "drop"),
                         ({"drop": float("inf")}, "drop"), ({"lr_factor": 1.5}, "lr_factor")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            CollapseGuard(svi, score, **kwargs)


def test_fit_svi_with_a_guard_rolls_back_a_non_finite_step():
    pyro.clear_param_store()
    calls = [0]

    def flaky():  # the quadratic, but its 16th evaluation is infinite
        calls[0] += 1
        x = pyro.param("x", torch.tensor(0.0, dtype=torch.float64))
        pyro.factor("quadratic", -((x - 3.0) ** 2) - (float("inf") if calls[0] == 16 else 0.0))

    guards = []

    def make(svi):
        guards.append(CollapseGuard(svi, lambda: -((float(pyro.param("x")) - 3.0) ** 2), every=5))
        return guards[-1]

    with pyro.validation_enabled(False):
        losses = fit_svi(flaky, lambda: None, num_steps=30, optim=pyro.optim.Adam({"lr": 0.1}), guard=make,
                         progress=False)  # fmt: skip
        assert len(losses) == 29 and all(map(math.isfinite, losses)) and guards[0].rollbacks == 1
        optimizer = next(iter(guards[0].svi.optim.optim_objs.values()))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
        calls[0] = 0  # before the guard's first save, a non-finite loss is still an error
        with pytest.raises(FloatingPointError, match="step 15"):
            fit_svi(flaky, lambda: None, num_steps=30, guard=lambda svi: CollapseGuard(svi, lambda: 0.0, every=100),
                    progress=False)  # fmt: skip


def test_collapse_guard_rolls_back_when_the_score_itself_fails():
    pyro.clear_param_store()
    svi = SVI(_quadratic, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    outcomes = iter([-1.0, FloatingPointError("log density of site 'x' is not finite"), RuntimeError("a bug")])

    def score():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    guard = CollapseGuard(svi, score, every=1)
    svi.step()
    guard()  # saves
    saved = pyro.param("x").detach().clone()
    svi.step()
    assert math.isnan(guard.check()) and guard.rollbacks == 1  # a collapsed guide's failing score: rolled back
    assert torch.equal(pyro.param("x").detach(), saved)
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not hidden
        guard.check()


def test_collapse_guard_with_a_pyro_scheduler_and_an_optimiser_made_after_the_save():
    pyro.clear_param_store()
    scheduler = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "gamma": 0.9})
    svi = SVI(_quadratic, lambda: None, scheduler, Trace_ELBO())
    scores = iter([-1.0] + [-100.0] * 3)
    guard = CollapseGuard(svi, lambda: next(scores), every=1)
    svi.step()
    guard()  # saves the scheduler's and the optimiser's states
    for _ in range(3):
        svi.step()
        scheduler.step()
        guard()  # each collapse restores the saved state, at half its rate: no compounding
        (sched,) = scheduler.optim_objs.values()
        assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
        assert sched.base_lrs == pytest.approx([0.05])
    assert guard.rollbacks == 3
    pyro.clear_param_store()
    svi = SVI(_quadratic, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    scores = iter([0.0] + [-100.0] * 3)
    guard = CollapseGuard(svi, lambda: next(scores), every=1)
    guard()  # the best is saved before the first step created the optimiser
    for _ in range(3):
        svi.step()
        guard()  # the optimiser goes back to a fresh state at half its first rate, every time
        (optimizer,) = svi.optim.optim_objs.values()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and not optimizer.state


def _kinked_model(calls, at):
    """Normal(x, 1) at y = 3, with one evaluation (number ``at``) of value 0 and gradient inf: Adam then
    writes NaN into x, and with validation on the next step raises Pyro's ValueError."""

    def model():
        calls[0] += 1
        x = pyro.param("x", torch.tensor(0.0, dtype=torch.float64))
        pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.tensor(3.0, dtype=torch.float64))
        pyro.factor("kink", torch.sqrt((x - x.detach()).abs()) if calls[0] == at else torch.tensor(0.0))

    return model


@pytest.mark.parametrize("validation", [True, False])
def test_a_step_that_makes_a_parameter_nan_is_rolled_back_or_named(validation):
    with pyro.validation_enabled(validation):
        pyro.clear_param_store()
        calls = [0]

        def guard(svi):
            return CollapseGuard(svi, lambda: -((float(pyro.param("x")) - 3.0) ** 2), every=5)

        losses = fit_svi(_kinked_model(calls, 16), lambda: None, num_steps=30, optim=pyro.optim.Adam({"lr": 0.1}),
                         guard=guard, progress=False)  # fmt: skip
        assert len(losses) == 29 and math.isfinite(float(pyro.param("x")))
        pyro.clear_param_store()
        calls[0] = 0
        with pytest.raises(FloatingPointError, match=r"\['x'\]|step 16"):
            fit_svi(_kinked_model(calls, 16), lambda: None, num_steps=30, progress=False)
        pyro.clear_param_store()
        calls[0] = 0
        with pytest.raises(FloatingPointError, match=r"\['x'\] became non-finite at the last step"):
            fit_svi(_kinked_model(calls, 5), lambda: None, num_steps=5, progress=False)


def test_a_guard_with_nothing_saved_for_a_nan_parameter_does_not_go_on():
    """Saved before the parameter existed, the guard had nothing to restore it to: it 'rolled back'
    every later NaN step and fit_svi returned with x = NaN."""
    pyro.clear_param_store()
    calls = [0]

    def model():
        calls[0] += 1
        x = pyro.param("x", torch.tensor(0.0, dtype=torch.float64))
        pyro.factor("q", -((x - 3.0) ** 2) * (math.nan if calls[0] == 5 else 1.0))

    with pyro.validation_enabled(False), pytest.raises(FloatingPointError, match="step 4"):
        fit_svi(model, lambda: None, num_steps=100, optim=pyro.optim.Adam({"lr": 0.1}),
                guard=lambda svi: CollapseGuard(svi, lambda: 0.0, every=1), progress=False)  # fmt: skip


def test_a_score_of_plus_infinity_is_rolled_back():
    pyro.clear_param_store()
    scores = iter([1.0, math.inf])

    def model():
        pyro.factor("q", -((pyro.param("x", torch.tensor(0.0)) - 1.0) ** 2))

    svi = SVI(model, lambda: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    guard = CollapseGuard(svi, lambda: next(scores), every=1)
    svi.step()
    guard()
    svi.step()
    guard()
    assert guard.rollbacks == 1 and guard.best == 1.0


def test_fit_lbfgs_starts_from_a_huge_finite_loss_and_checks_lr():
    """A starting loss of 5e11 was refused as 'not finite' (the failure marker was 1e10)."""
    pyro.clear_param_store()
    y = 100.0 + 10.0 * torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(y):
        m = pyro.param("m", torch.tensor(0.0, dtype=torch.float64))
        s = pyro.param("s", torch.tensor(0.01, dtype=torch.float64), constraint=dist.constraints.positive)
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(m, s), obs=y)

    losses = fit_lbfgs(model, lambda y: None, y, num_steps=50, progress=False)
    assert losses[0] > 1e11
    assert float(pyro.param("m")) == pytest.approx(float(y.mean()), rel=1e-7)
    assert float(pyro.param("s")) == pytest.approx(float(y.std(unbiased=False)), rel=1e-6)
    for lr in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lr must be"):
            fit_lbfgs(model, lambda y: None, y, lr=lr, progress=False)
