"""SWAG statistics against a numpy reference; the sampling covariance against Sigma."""

import numpy as np
import pyro
import pytest
import torch

from pyro_gpx.swag import (
    AutoMultiSWAG,
    AutoSWAG,
    MultiSWAG,
    SWAGCollector,
    SWAGMoments,
    diagonal_variance,
    init_moments,
    moments_from_state,
    moments_state_dict,
    swag_distribution,
    swag_learning_rate,
    swag_scheduler,
    update_moments,
)


def _iterates(T=30, P=7, seed=0):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(T, P)), axis=0) * 0.1 + rng.normal(size=P)


@pytest.mark.parametrize("T, K", [(30, 20), (8, 20), (20, 20)])
def test_moments_and_deviations_match_numpy(T, K):
    thetas = _iterates(T)
    m = init_moments(7, max_rank=K)
    for t in thetas:
        m = update_moments(m, torch.as_tensor(t))
    np.testing.assert_allclose(m.mean.numpy(), thetas.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.sq_mean.numpy(), (thetas**2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(diagonal_variance(m).numpy(), thetas.var(0), rtol=1e-9)
    running = np.cumsum(thetas, 0) / np.arange(1, T + 1)[:, None]
    expected = (thetas - running)[-K:]
    assert m.rank == min(T, K)  # fewer than K iterates: rank = number collected
    np.testing.assert_allclose(m.deviations.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_state_is_not_mutated():
    m0 = init_moments(3)
    m1 = update_moments(m0, torch.ones(3))
    assert m0.num_snapshots == 0 and float(m0.mean.sum()) == 0.0 and m1.num_snapshots == 1


def test_sampling_covariance_matches_sigma():
    thetas = _iterates(25, P=5, seed=1)
    m = init_moments(5, max_rank=10)
    for t in thetas:
        m = update_moments(m, torch.as_tensor(t))
    D = m.deviations.numpy()
    sigma = 0.5 * (np.diag(thetas.var(0)) + D.T @ D / (m.rank - 1))  # the SWAG covariance
    d = swag_distribution(m, scale=0.5)
    np.testing.assert_allclose(d.covariance_matrix.numpy(), sigma, rtol=1e-9)
    samples = d.sample((200_000,)).numpy()
    emp = np.cov(samples.T)
    se = np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / 200_000)  # sd of a sample covariance
    assert (np.abs(emp - sigma) < 5 * se).all()
    diag = swag_distribution(m, scale=0.5, diag_only=True)
    np.testing.assert_allclose(diag.variance.numpy(), 0.5 * thetas.var(0), rtol=1e-9)


def test_errors():
    m = init_moments(3)
    with pytest.raises(ValueError, match="at least 2 collected iterates"):
        swag_distribution(update_moments(m, torch.zeros(3)))
    with pytest.raises(ValueError, match="track 3"):
        update_moments(m, torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        update_moments(m, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(TypeError, match="positional"):  # the old field order (sq_mean third) would pass silently
        SWAGMoments(m.num_snapshots, m.mean, m.variance, m.deviations, m.max_rank)  # type: ignore[misc]


def test_moments_live_on_the_given_device_and_dtype():
    m = init_moments(4, max_rank=3, dtype=torch.float32, device="meta")  # meta: a device other than the CPU
    assert {t.device.type for t in (m.mean, m.variance, m.deviations)} == {"meta"}
    assert {t.dtype for t in (m.mean, m.variance, m.deviations)} == {torch.float32}
    m = update_moments(m, torch.ones(4, dtype=torch.float64))  # a CPU float64 iterate is moved and cast
    assert m.mean.device.type == "meta" and m.deviations.shape == (1, 4) and m.mean.dtype == torch.float32


@pytest.mark.parametrize("diag_only, K", [(False, 5), (True, 5), (False, 1)])
def test_distribution_is_computed_in_float64_then_cast(diag_only, K):
    m = init_moments(5, max_rank=K)
    for t in _iterates(8, P=5):
        m = update_moments(m, torch.as_tensor(t))
    d64 = swag_distribution(m, 0.5, diag_only)
    d32 = swag_distribution(m, 0.5, diag_only, dtype=torch.float32)
    assert type(d32) is type(d64)
    if isinstance(d64, torch.distributions.LowRankMultivariateNormal):
        pairs = [(d32.loc, d64.loc), (d32.cov_factor, d64.cov_factor), (d32.cov_diag, d64.cov_diag)]
    else:
        pairs = [(d32.base_dist.loc, d64.base_dist.loc), (d32.base_dist.scale, d64.base_dist.scale)]
    for a, b in pairs:
        assert a.dtype == torch.float32 and torch.equal(a, b.float())
    with pyro.validation_enabled(False):  # distributions cannot validate meta tensors
        assert swag_distribution(m, 0.5, diag_only, device="meta").mean.device.type == "meta"


def test_state_round_trip_and_validation():
    m = init_moments(3, max_rank=2)
    for t in _iterates(4, P=3):
        m = update_moments(m, torch.as_tensor(t))
    state = moments_state_dict(m)
    back = moments_from_state(state, 3)
    assert back.num_snapshots == 4 and back.max_rank == 2 and torch.equal(back.deviations, m.deviations)
    bad = [
        ({k: v for k, v in state.items() if k != "variance"}, r"lacks the SWAG entries \['variance'\]"),
        (state | {"deviations": state["deviations"][:1]}, r"deviations.\] has shape \(1, 3\); expected \(2, 3\)"),
        (state | {"num_snapshots": 1}, r"expected \(1, 3\)"),
        (state | {"mean": state["mean"].float()}, r"state\[.variance.\] has dtype torch.float64; state\[.mean.\] has"),
        (state | {"max_rank": 0}, r"state\['max_rank'\] must be an int >= 1"),
        (state | {"variance": torch.full((3,), float("nan"), dtype=torch.float64)}, "NaN"),
        (state | {"variance": -state["variance"]}, r"state\['variance'\] has negative entries"),
    ]  # fmt: skip
    for s, match in bad:
        with pytest.raises(ValueError, match=match):
            moments_from_state(s)
    with pytest.raises(ValueError, match=r"state\['mean'\] has shape \(3,\); expected \(4,\)"):
        moments_from_state(state, 4)


@pytest.mark.parametrize("offset", [0.3, 1.0])
def test_float32_statistics_keep_the_variance_of_weights_far_from_zero(offset):
    # iterates of weights about 10^3 to 10^4 times their spread: the paper's E[theta^2] - E[theta]^2
    # loses all of the variance to cancellation in float32 (eps (mean / sd)^2 >= 1); updates from
    # deviations err by about eps (mean / sd)
    rng = np.random.default_rng(3)
    thetas = (offset * rng.choice([-1.0, 1.0], size=50) + 1e-3 * _iterates(40, P=50, seed=3)).astype(np.float32)
    m32, m64 = init_moments(50, max_rank=5, dtype=torch.float32), init_moments(50, max_rank=5)
    for t in thetas:
        m32, m64 = update_moments(m32, torch.as_tensor(t)), update_moments(m64, torch.as_tensor(t))
    exact = thetas.astype(np.float64).var(0)
    np.testing.assert_allclose(diagonal_variance(m64).numpy(), exact, rtol=1e-9)
    np.testing.assert_allclose(diagonal_variance(m32).numpy(), exact, rtol=1e-2)
    np.testing.assert_allclose(m32.deviations.numpy(), m64.deviations.numpy(), rtol=0, atol=1e-2 * exact.min() ** 0.5)
    np.testing.assert_allclose(m64.sq_mean.numpy(), (thetas.astype(np.float64) ** 2).mean(0), rtol=1e-12)


def test_a_state_saved_with_the_second_moment_loads():
    m = init_moments(3, max_rank=2)
    for t in _iterates(4, P=3):
        m = update_moments(m, torch.as_tensor(t))
    state = moments_state_dict(m)
    legacy = {k: v for k, v in state.items() if k != "variance"} | {"sq_mean": m.sq_mean}
    back = moments_from_state(legacy, 3)
    torch.testing.assert_close(back.variance, m.variance, rtol=1e-12, atol=0)
    assert torch.equal(back.mean, m.mean) and torch.equal(back.deviations, m.deviations)
    with pytest.raises(ValueError, match=r"state\['sq_mean'\] and state\['mean'\] must be tensors of one shape"):
        moments_from_state(legacy | {"sq_mean": m.sq_mean[:2]})


def _two_snapshots():
    m = init_moments(3, max_rank=2)
    for t in _iterates(3, P=3):
        m = update_moments(m, torch.as_tensor(t))
    return m


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: init_moments(3, dtype=torch.int64), TypeError, "dtype"),
        (lambda: SWAGCollector(torch.nn.Linear(2, 1), dtype=torch.int32), TypeError, "dtype"),
        (lambda: SWAGCollector(None), TypeError, "module"),
        (lambda: MultiSWAG([1, 2]), TypeError, "collectors"),
        (lambda: MultiSWAG(SWAGCollector(torch.nn.Linear(2, 1))), TypeError, "collectors"),
        (lambda: AutoMultiSWAG(AutoSWAG(lambda: None)), TypeError, "guides"),
        (lambda: moments_from_state(moments_state_dict(_two_snapshots()), True), ValueError, "num_params"),
        (lambda: moments_from_state(moments_state_dict(_two_snapshots()), 0), ValueError, "num_params"),
        (lambda: moments_from_state(moments_state_dict(_two_snapshots()), 2.5), ValueError, "num_params"),
        (lambda: swag_distribution(_two_snapshots(), diag_only="yes"), TypeError, "diag_only"),
        (lambda: swag_scheduler(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), 0.1), 0.01, 2.5), ValueError,
         "swa_start"),
        (lambda: swag_learning_rate(-1, 0.1, 0.01, 20), ValueError, "epoch"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_update_moments_accepts_numpy():
    m = update_moments(init_moments(3), np.array([1.0, 2.0, 3.0]))
    assert torch.equal(m.mean, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
