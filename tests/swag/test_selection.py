"""select_scale: common random numbers across scales, the analytic spread of a linear model, errors."""

import math

import numpy as np
import pytest
import torch

from pyro_gpx.swag import SWAGCollector, select_scale


def _linear_swag(seed=0, snapshots=12):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1).double()
    swag = SWAGCollector(net, max_rank=5)
    for _ in range(snapshots):  # a random walk of iterates
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        swag.collect()
    return net, swag


def test_scales_share_draws_and_the_analytic_spread_is_picked():
    net, swag = _linear_swag()
    X = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = torch.cat([X, torch.ones(10, 1, dtype=torch.float64)], 1)  # d f / d (weight, bias)
    cov = swag.distribution(scale=1.0).covariance_matrix
    exact_var = torch.einsum("ni,ij,nj->n", J, cov, J)
    target = 0.25 * exact_var
    before = [p.clone() for p in net.parameters()]
    seen = []

    def loss(out):
        seen.append(out.var(0))
        return float(((out.var(0) - target) ** 2).mean())

    choice = select_scale(swag, lambda m: m(X)[:, 0], loss, scales=(0.1, 0.25, 0.5, 1.0), num_samples=400)
    assert choice.scale == 0.25
    assert list(choice.losses) == [0.1, 0.25, 0.5, 1.0]
    # the same standard-normal draws at every scale: the spread of a linear model scales exactly
    for s, var in zip((0.1, 0.25, 0.5, 1.0), seen):
        torch.testing.assert_close(var / seen[0], torch.full_like(var, s / 0.1), rtol=1e-9, atol=0)
    # and matches the SWAG Gaussian within Monte Carlo error (400 draws)
    assert ((seen[-1] / exact_var - 1).abs() < 0.25).all()
    for a, b in zip(net.parameters(), before):  # weights restored
        assert torch.equal(a, b)


def test_multiswag_splits_the_samples_between_runs():
    runs = [_linear_swag(seed)[1] for seed in (0, 1)]
    X = torch.randn(4, 3, dtype=torch.float64)
    shapes = []

    def loss(out):
        shapes.append(tuple(out.shape))
        return float(out.mean())

    select_scale(runs, lambda m: m(X)[:, 0], loss, scales=(np.float32(0.5),), num_samples=6)  # NumPy scales too
    assert shapes == [(6, 4)]
    with pytest.raises(ValueError, match="multiple of the number of collectors"):  # 1 of 7 was dropped silently
        select_scale(runs, lambda m: m(X)[:, 0], loss, scales=(0.5,), num_samples=7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scales": ()}, "scales"),
        ({"scales": (0.0, 0.5)}, "scales"),
        ({"scales": (math.inf,)}, "scales"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 4.0}, "num_samples must be a positive integer"),
        ({"scales": (True,)}, "scales"),
        ({"loss": lambda out: float("nan")}, "held-out loss at scale"),
        ({"bn_loaders": [None, None]}, "bn_loaders"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    _, swag = _linear_swag()
    X = torch.randn(4, 3, dtype=torch.float64)
    args = {"predict": lambda m: m(X)[:, 0], "loss": lambda out: float(out.var(0).mean())} | kwargs
    with pytest.raises(ValueError, match=match):
        select_scale(swag, **args)


def test_collectors_must_be_swag():
    with pytest.raises(TypeError, match="collectors"):
        select_scale([], lambda m: m, lambda out: 0.0)


@pytest.mark.parametrize("seed", [None, 7])
def test_every_scale_shares_the_draws_without_a_seed_too(seed):
    net, swag = _linear_swag()
    X = torch.randn(10, 3, dtype=torch.float64)
    mean = swag.swa_into(torch.nn.Linear(3, 1).double())(X)[:, 0].detach()
    seen = []
    select_scale(swag, lambda m: m(X)[:, 0], lambda out: seen.append(out) or 0.0, scales=(0.5, 2.0), seed=seed)
    torch.testing.assert_close(seen[1] - mean, 2 * (seen[0] - mean), rtol=1e-9, atol=1e-12)  # was fresh draws


@pytest.mark.parametrize("scales", [np.logspace(-1, 0, 3), torch.tensor([0.1, 0.5])])
def test_array_and_tensor_grids(scales):
    net, swag = _linear_swag()
    X = torch.randn(10, 3, dtype=torch.float64)
    choice = select_scale(swag, lambda m: m(X)[:, 0], lambda out: float(out.var(0).mean()), scales=scales)
    assert list(choice.losses) == pytest.approx([float(s) for s in scales]) and choice.scale == pytest.approx(0.1)


def test_seed_must_be_an_integer():
    net, swag = _linear_swag()
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        select_scale(swag, lambda m: m.weight.sum(), lambda out: 0.0, seed=1.5)
