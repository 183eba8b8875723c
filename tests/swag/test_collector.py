"""SWAGCollector against torch.optim.swa_utils, BatchNorm updates, saving, errors."""

import copy
import io

import numpy as np
import pyro
import pytest
import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from pyro_gpx.swag import MultiSWAG, SWAGCollector, swag_learning_rate, swag_predict, swag_scheduler


def _net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(3, 8)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.ReLU(), torch.nn.Linear(8, 1)]
    return torch.nn.Sequential(*layers).double()


def _train(net, epochs, collectors=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(128, 3, generator=gen, dtype=torch.float64)
    y = X[:, :1] ** 2 + 0.1 * torch.randn(128, 1, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, 128, 32):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(X[i : i + 32]), y[i : i + 32]).backward()
            optimizer.step()
        for c in collectors:
            c.collect(net)
    return X


def test_swa_mean_equals_averaged_model():
    net = _net()
    swag = SWAGCollector(net, max_rank=5)
    averaged = AveragedModel(net)

    class Both:
        def collect(self, module):
            swag.collect(module)
            averaged.update_parameters(module)

    _train(net, 12, [Both()])
    mean_net = swag.swa_into(copy.deepcopy(net))
    for a, b in zip(mean_net.parameters(), averaged.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_batchnorm_statistics_are_recomputed_like_update_bn():
    net = _net(bn=True)
    swag = SWAGCollector(net, max_rank=4)
    X = _train(net, 6, [swag])
    loader = [X[i : i + 32] for i in range(0, 128, 32)]
    ours = swag.sample_into(copy.deepcopy(net), bn_loader=loader, generator=torch.Generator().manual_seed(1))
    reference = swag.sample_into(copy.deepcopy(net), generator=torch.Generator().manual_seed(1))
    update_bn(loader, reference)
    bn, ref_bn = ours[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert not torch.allclose(bn.running_mean, net[1].running_mean)  # the statistics changed with the weights
    # a one-shot iterator would be exhausted after the first sample and leave zero statistics
    with pytest.raises(TypeError, match="bn_loader must be re-iterable"):
        swag_predict(swag, lambda m: m(X), 2, module=copy.deepcopy(net), bn_loader=iter(loader))


def test_state_dict_round_trip_gives_identical_samples():
    net = _net()
    swag = SWAGCollector(net, max_rank=5)
    _train(net, 8, [swag])
    state = swag.state_dict()
    restored = SWAGCollector(_net(seed=3), max_rank=5)
    restored.load_state_dict(state)
    a = swag.sample(generator=torch.Generator().manual_seed(7))
    b = restored.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # plain tensors, ints and tuples: loadable with weights_only
    buffer.seek(0)
    again = SWAGCollector(_net(seed=4), max_rank=5)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    c = again.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_load_state_dict_validates_the_state():
    net = _net()
    swag = SWAGCollector(net, max_rank=5)
    _train(net, 3, [swag])
    state = swag.state_dict()
    fresh = SWAGCollector(_net(seed=1), max_rank=5)
    bad = [
        ({k: v for k, v in state.items() if k != "shapes"}, "'shapes' entry"),
        ({k: v for k, v in state.items() if k != "mean"}, r"lacks the SWAG entries \['mean'\]"),
        (state | {"deviations": state["deviations"][:, :-1]}, r"has shape \(3, 40\); expected \(3, 41\)"),
        (state | {"num_snapshots": 7}, r"expected \(5, 41\)"),
        (state | {"shapes": state["shapes"] | {"2.bias": (2,)}}, r"other names or shapes: \['2.bias'\]"),
    ]  # fmt: skip
    for s, match in bad:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(s)
    assert fresh.num_snapshots == 0  # a failed load leaves the collector as it was


def _swag_reference(thetas, max_rank, scale):
    """Mean and covariance scale * (Sigma_diag + D D^T / (k - 1)) of SWAG from numpy."""
    running = np.cumsum(thetas, 0) / np.arange(1, len(thetas) + 1)[:, None]
    D = (thetas - running)[-max_rank:].T
    return thetas.mean(0), scale * (np.diag(thetas.var(0)) + D @ D.T / (D.shape[1] - 1))


def _assert_moments_match(draws, mean, cov):
    """Sample mean and covariance within 5 Monte Carlo standard errors of each entry."""
    n = draws.shape[0]
    assert (np.abs(draws.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n)).all()
    se = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)  # sd of a sample covariance
    assert (np.abs(np.cov(draws.T) - cov) < 5 * se).all()


def _five_parameter_swag(thetas, max_rank):
    net = torch.nn.Linear(4, 1).double()  # 4 weights + 1 bias
    swag = SWAGCollector(net, max_rank=max_rank)
    for t in thetas:
        torch.nn.utils.vector_to_parameters(torch.as_tensor(t), net.parameters())
        swag.collect()
    return swag


@pytest.mark.parametrize("diag_only", [False, True])
def test_sampling_covariance_matches_numpy_sigma(diag_only):
    rng = np.random.default_rng(2)
    thetas = np.cumsum(rng.normal(size=(10, 5)), 0) * 0.1 + rng.normal(size=5)
    swag = _five_parameter_swag(thetas, max_rank=3)
    mean, cov = _swag_reference(thetas, 3, 0.5)
    if diag_only:
        cov = 0.5 * np.diag(thetas.var(0))
    draws = swag.sample(0.5, diag_only, torch.Generator().manual_seed(0), sample_shape=(20_000,))
    assert draws.shape == (20_000, 5) and draws.dtype == torch.float64
    _assert_moments_match(draws.numpy(), mean, cov)


def test_single_sample_stream_is_unchanged():
    """One draw: z1 (P normals) then z2 (rank normals) from the generator, as before sample_shape."""
    rng = np.random.default_rng(3)
    swag = _five_parameter_swag(np.cumsum(rng.normal(size=(6, 5)), 0), max_rank=3)
    ours = swag.sample(generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    z1 = torch.randn(5, generator=gen, dtype=torch.float64)
    z2 = torch.randn(3, generator=gen, dtype=torch.float64)
    d = swag.distribution()
    torch.testing.assert_close(ours, d.loc + d.cov_factor @ z2 + d.cov_diag.sqrt() * z1, rtol=0, atol=0)


def test_statistics_and_samples_follow_the_module_device():
    # the meta device stands in for a GPU: tensors with a device and a dtype but no values
    with pyro.validation_enabled(False):  # distributions cannot validate meta tensors
        net = torch.nn.Linear(3, 2).to("meta")
        swag = SWAGCollector(net, max_rank=3)
        for _ in range(3):
            swag.collect()
        m = swag.moments
        assert {t.device.type for t in (m.mean, m.sq_mean, m.deviations)} == {"meta"}
        assert m.mean.dtype == torch.float64  # float64 accumulation whatever the parameters' dtype
        assert swag.sample(generator=torch.Generator().manual_seed(0)).device.type == "meta"  # a CPU generator
        assert swag.sample(sample_shape=(4,)).shape == (4, 8)
        assert swag.sample_into().weight.device.type == "meta"
        # moved after the collector was made, before the first collect: the statistics follow
        moved = torch.nn.Linear(3, 2)
        swag = SWAGCollector(moved)
        moved.to("meta")
        swag.collect()
        assert swag.moments.mean.device.type == "meta"
    # collected on the CPU, moved afterwards: samples land on the module's device
    net = _net()
    swag = SWAGCollector(net, max_rank=3)
    _train(net, 3, [swag])
    net.to("meta")
    assert swag.sample().device.type == "meta" and swag.moments.mean.device.type == "cpu"


def test_errors_on_too_few_iterates_and_changed_shapes():
    net = _net()
    swag = SWAGCollector(net)
    with pytest.raises(ValueError, match="at least 2 collected iterates"):
        swag.sample()
    swag.collect()
    with pytest.raises(ValueError, match="at least 2"):
        swag.sample_into()
    other = torch.nn.Sequential(torch.nn.Linear(3, 9), torch.nn.ReLU(), torch.nn.Linear(9, 1)).double()
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(9, 3\)"):
        swag.collect(other)


def test_samples_load_into_a_frozen_copy_and_the_tracked_set_is_named():
    net = _net()
    swag = SWAGCollector(net, max_rank=3)
    _train(net, 4, [swag])
    frozen = copy.deepcopy(net).requires_grad_(False)  # an evaluation copy (was: "added or removed")
    gen = torch.Generator().manual_seed(0)
    swag.sample_into(frozen, generator=gen)
    expected = swag.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in frozen.parameters()]), expected, rtol=0, atol=0)
    torch.testing.assert_close(swag.flat_parameters(swag.swa_into(frozen)), swag.moments.mean, rtol=0, atol=0)
    grown = torch.nn.Sequential(*net, torch.nn.Linear(1, 1)).double()
    with pytest.raises(ValueError, match=r"\['3.weight', '3.bias'\] are trainable and not tracked"):
        swag.collect(grown)
    with pytest.raises(ValueError, match=r"\['2.weight', '2.bias'\] are missing"):
        swag.collect(net[:1])
    with pytest.raises(ValueError, match="no trainable parameters"):
        SWAGCollector(torch.nn.ReLU())  # was: "num_params must be a positive integer"


@pytest.mark.parametrize("num_samples", [2.5, True, 0])
def test_swag_predict_sample_count_is_checked(num_samples):
    net = _net()
    swag = SWAGCollector(net, max_rank=3)
    _train(net, 3, [swag])
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        swag_predict(swag, lambda m: m.weight.sum(), num_samples)
    with pytest.raises(ValueError, match="samples_per_model must be a positive integer"):
        MultiSWAG([swag]).predict(lambda m: m.weight.sum(), num_samples)


class _Pair(torch.nn.Module):
    """Two vectors registered in the given order."""

    def __init__(self, order: str):
        super().__init__()
        for name in order:
            setattr(self, name, torch.nn.Parameter(torch.zeros(2) if name == "a" else torch.full((2,), 10.0)))


def test_parameters_in_another_order_are_refused():
    swag = SWAGCollector(_Pair("ab"))
    for _ in range(3):
        swag.collect()
    with pytest.raises(ValueError, match=r"in the order \['b', 'a'\]; SWAG collected \['a', 'b'\]"):
        swag.collect(_Pair("ba"))
    with pytest.raises(ValueError, match="parameter order"):
        SWAGCollector(_Pair("ba")).load_state_dict(swag.state_dict())


@pytest.mark.parametrize("max_rank", [2.5, float("nan"), float("inf"), True, "3"])
def test_max_rank_must_be_a_positive_integer(max_rank):
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        SWAGCollector(_net(), max_rank=max_rank)


def test_predict_restores_weights_and_multiswag_stacks_runs():
    runs = []
    for seed in (0, 1):
        net = _net(seed)
        swag = SWAGCollector(net, max_rank=4)
        X = _train(net, 6, [swag], seed=seed)
        runs.append(swag)
    before = [p.clone() for p in runs[0].module.parameters()]
    preds = swag_predict(runs[0], lambda m: m(X), num_samples=5)
    assert preds.shape == (5, 128, 1)
    for a, b in zip(before, runs[0].module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert MultiSWAG(runs).predict(lambda m: m(X), samples_per_model=3).shape == (6, 128, 1)
    # seed: run i draws from its own generator seeded seed + i, so scales share their draws
    seeded = MultiSWAG(runs).predict(lambda m: m(X), 3, scale=0.25, diag_only=True, seed=7)
    by_run = [swag_predict(r, lambda m: m(X), 3, scale=0.25, diag_only=True,
                           generator=torch.Generator().manual_seed(7 + i)) for i, r in enumerate(runs)]  # fmt: skip
    torch.testing.assert_close(seeded, torch.cat(by_run), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bn_loaders has 1 entries for 2 SWAG runs"):
        MultiSWAG(runs).predict(lambda m: m(X), bn_loaders=[None])


def test_learning_rate_schedule_and_swalr_interop():
    lrs = [swag_learning_rate(e, 0.1, 0.01, 20) for e in range(25)]
    assert lrs[0] == lrs[10] == 0.1
    assert lrs[14] == pytest.approx(0.1 - 0.09 * (14 / 20 - 0.5) / 0.4)
    assert all(lr == pytest.approx(0.01) for lr in lrs[19:])
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = swag_scheduler(optimizer, swa_lr=0.01, swa_start=20)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    ours = optimizer.param_groups[0]["lr"]
    swalr = SWALR(optimizer, swa_lr=0.01, anneal_epochs=1)
    optimizer.step()
    swalr.step()
    assert ours == pytest.approx(0.01) and optimizer.param_groups[0]["lr"] == pytest.approx(ours)
    for bad in (float("nan"), float("inf"), 0.0, True):
        with pytest.raises(ValueError, match="lr_init must be a finite positive number"):
            swag_learning_rate(1, bad, 0.01, 20)
    with pytest.raises(ValueError, match="epoch must be a finite number"):
        swag_learning_rate(float("nan"), 0.1, 0.01, 20)
    swag = SWAGCollector(net)
    swag.collect()
    swag.collect()
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        swag.sample(scale=True)


def test_schedule_decays_every_parameter_group_to_the_swa_rate_as_swalr_does():
    net = _net()
    groups = [{"params": [net[0].weight], "lr": 0.5}, {"params": [net[0].bias], "lr": 0.05}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    scheduler = swag_scheduler(optimizer, swa_lr=0.01, swa_start=10)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    for epoch in range(12):
        optimizer.step()
        scheduler.step()
        expected = [swag_learning_rate(epoch + 1, lr, 0.01, 10) for lr in (0.5, 0.05)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])


def test_a_non_finite_parameter_is_named():
    net = torch.nn.Linear(2, 1)
    collector = SWAGCollector(net)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")  # SGD diverged: 'theta contains NaN or inf' named nothing
    with pytest.raises(ValueError, match=r"parameters \['weight'\] contain NaN or inf"):
        collector.collect()


def test_predict_copies_outputs_that_alias_the_module():
    # predict returning the module's own tensors (a view of the weights, a BatchNorm buffer) gave every
    # row the last sample's values: each row must be its own draw
    net = _net(bn=True)
    swag = SWAGCollector(net, max_rank=4)
    X = _train(net, 6, [swag])
    draws = swag_predict(swag, lambda m: m[0].weight.detach(), 4, generator=torch.Generator().manual_seed(0))
    copies = swag_predict(swag, lambda m: m[0].weight.clone(), 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, copies, rtol=0, atol=0)
    assert not torch.equal(draws[0], draws[1])
    stats = swag_predict(swag, lambda m: m[1].running_mean, 3, bn_loader=[X[:64], X[64:]],
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert not torch.equal(stats[0], stats[1])
    seeded = MultiSWAG([swag]).predict(lambda m: m[0].weight.detach(), 3, seed=2)
    assert not torch.equal(seeded[0], seeded[1])
