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
    for bad in (float("nan"), float("inf")):  # gave NaN / inf targets
        with pytest.raises(ValueError, match="noise_std must be a finite number"):
            gap_regression(noise_std=bad)
        with pytest.raises(ValueError, match="noise_std must be a finite number"):
            two_moons(noise_std=bad)
    with pytest.raises(ValueError, match="noise_std"):
        two_moons(noise_std=-1.0)
    with pytest.raises(ValueError, match="must be finite"):
        gap_regression(domain=(-float("inf"), 2.0))
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        gap_regression(dtype=torch.int64)
    assert gap_regression(n=10.0, n_grid=5.0).X_grid.shape == (5, 1)  # integral floats are counts


def test_two_moons_balanced_and_separable():
    data = two_moons(n=200, noise_std=0.05, seed=0)
    assert data.X.shape == (200, 2) and set(data.y.tolist()) == {0, 1}
    assert data.y.sum() == 100
    # the upper moon (label 0) sits above the lower one on average
    assert data.X[data.y == 0, 1].mean() > data.X[data.y == 1, 1].mean()
