"""SWAGCollector against torch.optim.swa_utils, BatchNorm updates, saving, errors."""

import copy

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
    torch.save(state, "/dev/null")  # plain tensors and ints: saveable with torch.save


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
