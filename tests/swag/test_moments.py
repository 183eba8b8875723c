"""SWAG statistics against a numpy reference; the sampling covariance against Sigma."""

import numpy as np
import pytest
import torch

from pyro_gpx.swag import diagonal_variance, init_moments, swag_distribution, update_moments


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
