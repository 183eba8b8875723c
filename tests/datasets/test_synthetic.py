import pytest
import torch

from pyro_gpx.datasets import gap_regression, two_moons


def test_gap_regression_has_a_gap_and_is_seeded():
    data = gap_regression(n=100, gap=(-0.5, 0.8), seed=1)
    x = data.X[:, 0]
    assert data.X.shape == (100, 1) and data.y.shape == (100,)
    assert not ((x > -0.5) & (x < 0.8)).any()
    assert (x >= -2).all() and (x <= 2).all()
    resid = data.y - (torch.sin(3 * x) + 0.3 * x)
    assert resid.std() == pytest.approx(data.noise_std, rel=0.3)
    torch.testing.assert_close(gap_regression(n=100, gap=(-0.5, 0.8), seed=1).y, data.y)


def test_gap_regression_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gap"):
        gap_regression(gap=(1.0, 0.0))
    with pytest.raises(ValueError, match="noise_std"):
        gap_regression(noise_std=-1.0)


def test_two_moons_balanced_and_separable():
    data = two_moons(n=200, noise_std=0.05, seed=0)
    assert data.X.shape == (200, 2) and set(data.y.tolist()) == {0, 1}
    assert data.y.sum() == 100
    # the upper moon (label 0) sits above the lower one on average
    assert data.X[data.y == 0, 1].mean() > data.X[data.y == 1, 1].mean()
