"""Metrics against scipy/numpy references."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_gpx.metrics import (
    auroc,
    classification_metrics,
    expected_calibration_error,
    gaussian_coverage,
    gaussian_nll,
    mixture_gaussian_nll,
    rmse,
    sample_coverage,
)


@pytest.fixture
def xy():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(200, generator=gen, dtype=torch.float64)
    mean = y + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64)
    var = torch.rand(200, generator=gen, dtype=torch.float64) + 0.1
    return mean, var, y


def test_rmse_and_gaussian_nll(xy):
    mean, var, y = xy
    assert rmse(mean, y) == pytest.approx(np.sqrt(np.mean((mean - y).numpy() ** 2)))
    ref = -stats.norm(mean.numpy(), np.sqrt(var.numpy())).logpdf(y.numpy()).mean()
    assert gaussian_nll(mean, var, y) == pytest.approx(ref, rel=1e-12)


def test_mixture_nll(xy):
    mean, var, y = xy
    means = torch.stack([mean, mean + 0.5, mean - 0.2])
    dens = np.mean([stats.norm(m.numpy(), np.sqrt(var.numpy())).pdf(y.numpy()) for m in means], 0)
    assert mixture_gaussian_nll(means, var, y) == pytest.approx(-np.log(dens).mean(), rel=1e-10)
    # one component: the plain Gaussian NLL
    assert mixture_gaussian_nll(mean[None], var, y) == pytest.approx(gaussian_nll(mean, var, y), rel=1e-12)


def test_coverage():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(20000, generator=gen, dtype=torch.float64)
    zeros, ones = torch.zeros_like(y), torch.ones_like(y)
    assert gaussian_coverage(zeros, ones, y) == pytest.approx(0.95, abs=0.005)
    samples = torch.randn(2000, 500, generator=gen, dtype=torch.float64)
    assert sample_coverage(samples, y[:500], 0.9) == pytest.approx(0.9, abs=0.04)


def test_bad_input_raises(xy):
    mean, var, y = xy
    with pytest.raises(ValueError, match="var must be positive"):
        gaussian_nll(mean, -var, y)
    with pytest.raises(ValueError, match="mean has shape"):
        rmse(mean[:5], y)
    with pytest.raises(ValueError, match="NaN"):
        rmse(mean * math.nan, y)
    with pytest.raises(ValueError, match="level"):
        gaussian_coverage(mean, var, y, level=1.5)
    bad_y = y.clone()
    bad_y[3] = math.nan
    with pytest.raises(ValueError, match="y contains NaN"):
        gaussian_nll(mean, var, bad_y)
    with pytest.raises(ValueError, match="var must be positive"):
        gaussian_coverage(mean, -var, y)  # was a coverage of 0
    with pytest.raises(ValueError, match="var has shape"):
        gaussian_coverage(mean, var[:1], y)
    with pytest.raises(ValueError, match="vars contains NaN"):
        mixture_gaussian_nll(mean[None], var[None] * math.nan, y)
    with pytest.raises(ValueError, match=r"samples must be \(S, n\)"):
        sample_coverage(mean, y)
    with pytest.raises(ValueError, match="non-empty vector"):
        rmse(mean[:0], y[:0])  # was NaN
    with pytest.raises(ValueError, match="do not broadcast"):
        mixture_gaussian_nll(mean[None], var[:3], y)


def test_classification_metrics_against_hand_computed_values():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    out = classification_metrics(probs, labels)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["nll"] == pytest.approx(-float(torch.tensor([0.9, 0.8, 0.4, 0.7]).log().mean()))
    # 15 bins: confidences 0.9, 0.8, 0.6, 0.7 fall in separate bins; |acc - conf| = 0.1, 0.2, 0.6, 0.3
    assert out["ece"] == pytest.approx((0.1 + 0.2 + 0.6 + 0.3) / 4)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2])) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics(probs[:, 0], labels)
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(2 * probs, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        classification_metrics(probs, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        classification_metrics(probs, labels.double())
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(probs, labels, num_bins=0)
    with pytest.raises(ValueError, match="scores_out contains NaN"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([math.nan, 0.2]))


def test_auroc_equals_the_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        scores_in = torch.randint(0, 20, (300,), generator=gen).double()  # many ties
        scores_out = torch.randint(0, 25, (200,), generator=gen).double()
        diff = scores_out[:, None] - scores_in[None, :]
        pairwise = float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
        assert auroc(scores_in, scores_out) == pytest.approx(pairwise, rel=1e-12)


def test_integer_and_numpy_inputs_are_numbers_and_draws_are_not_vectors(xy):
    mean, var, y = xy
    ints = torch.tensor([0, 1, 2])
    assert rmse(ints, torch.tensor([0.0, 1.0, 3.0])) == pytest.approx(math.sqrt(1 / 3))
    assert gaussian_nll(mean.numpy(), var.numpy(), y.numpy()) == gaussian_nll(mean, var, y)
    # integer means: the variance 2.5 was cast to the means' integer dtype (2)
    expected = gaussian_nll(ints.double(), torch.full((3,), 2.5, dtype=torch.float64), y[:3])
    assert mixture_gaussian_nll(ints[None], 2.5, y[:3]) == pytest.approx(expected, rel=1e-12)
    probs = torch.tensor([[1, 0], [0, 1]])  # integer one-hot probabilities
    assert classification_metrics(probs, np.array([0, 1])) == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0}
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    with pytest.raises(ValueError, match=r"mean has shape \(2, 200\).*mixture_gaussian_nll"):
        gaussian_nll(torch.stack([mean, mean]), var, y)  # it averaged per-draw NLLs
    with pytest.raises(ValueError, match="level must be in"):
        gaussian_coverage(mean, var, y, level="0.9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_true_class_of_probability_zero_gives_an_infinite_nll(dtype):
    """It was floored at the dtype's smallest normal number: 44 nats in float32, 355 in float64."""
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=dtype)
    assert classification_metrics(probs, torch.tensor([1, 0]))["nll"] == math.inf


def test_lists_are_float64_and_coverage_quantiles_exact():
    """A list went through float32 first (a 0.04 residual at 1e6 read as 0.044); the coverage
    quantile was a float32 icdf (z = 5.29 at level 1 - 1e-7, scipy's 5.33)."""
    y = [1e6, 2e6]
    mean = [1e6 + 0.04, 2e6 + 0.04]
    assert rmse(mean, y) == pytest.approx(0.04, rel=1e-9)
    assert rmse(mean, y) == rmse(np.asarray(mean), np.asarray(y))
    assert gaussian_nll(mean, [1e-4, 1e-4], y) == pytest.approx(0.5 * math.log(2 * math.pi * 1e-4) + 8.0)
    assert auroc([1.00000001], [1.0]) == 0.0
    assert expected_calibration_error([[0.2, 0.8]], [1]) == pytest.approx(0.2, abs=1e-15)
    for level in (0.5, 0.9999999, 1 - 1e-8, 1e-8):
        z = stats.norm.ppf(0.5 + level / 2)
        inside, outside = (
            gaussian_coverage([0.0], [1.0], [z * (1 - 1e-9)], level),
            gaussian_coverage([0.0], [1.0], [z * (1 + 1e-9)], level),
        )
        assert (inside, outside) == (1.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_labels_are_labels(dtype):
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    assert classification_metrics(probs, labels.to(dtype)) == classification_metrics(probs, labels)
