"""Backward (replayed) paths, the replay buffer and the Langevin local search against exact answers."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide.initialization import init_to_mean

from pyro_gpx.diffusion import (
    AutoDiffusion,
    DriftNet,
    LogVarianceLoss,
    ReferenceProcess,
    ReplayBuffer,
    gaussian_log_density,
    importance_estimate,
    langevin_search,
    make_process,
)


def gaussian_model(scale=1.0, dim=3):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(dim, dtype=torch.float64), scale).to_event(1))

    return model


@pytest.mark.parametrize("grid_power", [1.0, 3.0])
def test_pis_backward_steps_are_the_brownian_bridge(float64, grid_power):
    # Brownian motion from 0 conditioned on z_K = z: z_k ~ N(z t_k / T, sigma^2 t_k (T - t_k) / T)
    sigma, horizon, n = 1.3, 2.0, 40_000
    process = make_process("pis", 6, sigma=sigma, horizon=horizon, grid_power=grid_power)
    grid = process.grid if process.grid is not None else torch.linspace(0, horizon, 7, dtype=torch.float64)
    z = torch.full((n, 1), 1.5)
    torch.manual_seed(0)
    states = [z]
    for k in reversed(range(6)):
        states.append(process.backward_step(k, states[-1], torch.randn_like(z)))
    states = torch.stack(states[::-1], 1)[..., 0]
    assert states[:, 0].abs().max() == 0
    for k in range(1, 6):
        t = float(grid[k])
        mean, var = 1.5 * t / horizon, sigma**2 * t * (horizon - t) / horizon
        assert abs(float(states[:, k].mean()) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(states[:, k].var()) / var - 1) < 4 * math.sqrt(2 / n)


def test_dds_backward_steps_noise_towards_the_reference(float64):
    # the variance-preserving chain: after the steps k..K-1, z_k ~ N(z prod sqrt(1 - a), sigma^2 (1 - prod(1 - a)))
    sigma, n = 0.7, 40_000
    process = make_process("dds", 5, sigma=sigma)
    torch.manual_seed(1)
    y = torch.full((n, 1), 2.0)
    keep = 1.0
    for k in reversed(range(5)):
        y = process.backward_step(k, y, torch.randn_like(y))
        keep *= 1 - float(process.alphas[k])
        mean, var = 2.0 * math.sqrt(keep), sigma**2 * (1 - keep)
        assert abs(float(y.mean()) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(y.var()) / var - 1) < 4 * math.sqrt(2 / n)


@pytest.mark.parametrize(
    "process, affine", [("pis", "diagonal"), ("pis", "full"), ("dds", "full"), ("dis", "diagonal")]
)
def test_backward_paths_of_an_exact_sampler_weigh_log_z(float64, process, affine):
    # zero drift: the sampler ends at the reference marginal in y; in the frame z = m + S y that is a Gaussian
    # whose path ratio is exact on any path, so backward paths from arbitrary points all weigh log Z = 0
    sigma = 1.2
    guide = AutoDiffusion(gaussian_model(), process=process, num_steps=12, sigma=sigma, hidden=8, affine=affine,
                          init_loc_fn=init_to_mean)  # fmt: skip
    guide()
    loc = torch.tensor([0.5, -1.0, 2.0])
    tril = torch.tensor([[1.2, 0.0, 0.0], [0.4, 0.7, 0.0], [-0.3, 0.2, 0.9]])
    guide.loc = loc
    if affine == "full":
        guide.scale_tril = tril
    else:
        guide.scale = tril.diagonal()
    frame = tril if affine == "full" else torch.diag(tril.diagonal())
    if process == "dis":  # DIS's chain is not exactly stationary: check the path ratio against a fresh forward pass
        z = torch.randn(64, 3) * 3
        states = guide.backward_paths(z)
        torch.testing.assert_close(guide.frame(states[:, -1])[0], z)
        forward = guide.rescore_paths(guide.explore_paths(64)).log_path
        assert torch.isfinite(guide.rescore_paths(states).log_weight).all() and torch.isfinite(forward).all()
        return
    spread = sigma * frame
    target = dist.MultivariateNormal(loc, scale_tril=spread)
    pyro.clear_param_store()

    def model():
        pyro.sample("x", target)

    exact = AutoDiffusion(model, process=process, num_steps=12, sigma=sigma, hidden=8, affine=affine,
                          init_loc_fn=init_to_mean)  # fmt: skip
    exact()
    exact.loc = loc
    if affine == "full":
        exact.scale_tril = tril
    else:
        exact.scale = tril.diagonal()
    z = loc + 3 * torch.randn(200, 3)  # far wider than the sampler: off-policy end points
    states = exact.backward_paths(z)
    torch.testing.assert_close(exact.frame(states[:, -1])[0], z)
    path = exact.rescore_paths(states)
    torch.testing.assert_close(path.log_weight, torch.zeros(200), rtol=0, atol=1e-9)


def test_backward_paths_through_a_flow_invert_the_frame(float64):
    from pyro.distributions.transforms import affine_autoregressive

    torch.manual_seed(0)
    flow = affine_autoregressive(3, hidden_dims=[8]).to(torch.float64)
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    guide = AutoDiffusion(gaussian_model(), num_steps=4, hidden=8, flow=flow)
    guide()
    z = torch.randn(10, 3)
    torch.testing.assert_close(guide.frame(guide.backward_paths(z)[:, -1])[0], z)


def test_backward_paths_bad_input(float64):
    guide = AutoDiffusion(gaussian_model(), num_steps=4, hidden=8)
    with pytest.raises(RuntimeError, match="set-up guide"):
        guide.backward_paths(torch.zeros(2, 3))
    guide()
    with pytest.raises(ValueError, match=r"shape \(num_paths, 3\)"):
        guide.backward_paths(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="finite"):
        guide.backward_paths(torch.tensor([[0.0, math.nan, 0.0]]))


def test_rescore_paths_bad_input(float64):
    """States of another number of steps or dimension gave an IndexError or torch's broadcasting error."""
    guide = AutoDiffusion(gaussian_model(), num_steps=4, hidden=8)
    with pytest.raises(RuntimeError, match="set-up guide"):
        guide.rescore_paths(torch.zeros(2, 5, 3))
    guide()
    for shape in [(2, 3, 3), (2, 9, 3), (2, 5, 4), (5, 3)]:
        with pytest.raises(ValueError, match=r"shape \(num_paths, 5, 3\)"):
            guide.rescore_paths(torch.zeros(shape))
    assert guide.rescore_paths(torch.zeros(2, 5, 3)).log_weight.shape == (2,)


def test_replay_buffer_priority_capacity_and_state(float64):
    buffer = ReplayBuffer(capacity=5, rank_weight=0.5)
    buffer.add(torch.arange(4.0)[:, None], torch.tensor([0.0, 3.0, math.nan, 1.0]))  # the NaN row is skipped
    assert len(buffer) == 3 and buffer.z[:, 0].tolist() == [0.0, 1.0, 3.0]
    buffer.add(torch.tensor([[10.0], [11.0], [12.0]]), torch.tensor([2.0, -1.0, 5.0]))
    assert buffer.z[:, 0].tolist() == [1.0, 3.0, 10.0, 11.0, 12.0]  # first in, first out
    # P(i) proportional to 1 / (c N + rank), rank 0 the highest log target
    log_target = buffer.log_target
    rank = torch.argsort(torch.argsort(log_target, descending=True)).double()
    expected = 1 / (0.5 * 5 + rank)
    expected /= expected.sum()
    z, lt = buffer.sample(200_000, generator=torch.Generator().manual_seed(0))
    counts = torch.stack([(z[:, 0] == v).double().mean() for v in buffer.z[:, 0]])
    assert (counts - expected).abs().max() < 4 * math.sqrt(0.25 / 200_000)
    torch.testing.assert_close(lt, log_target[torch.searchsorted(buffer.z[:, 0], z[:, 0])])
    copy = ReplayBuffer()
    state = buffer.state_dict()
    copy.load_state_dict(state)
    torch.testing.assert_close(copy.sample(7, torch.Generator().manual_seed(3))[0],
                               buffer.sample(7, torch.Generator().manual_seed(3))[0])  # fmt: skip
    before = buffer.z.clone()
    buffer.update(torch.tensor([0]), torch.tensor([[7.0]]), torch.tensor([9.0]))  # in place, as a local search
    assert torch.equal(state["z"], before) and torch.equal(copy.z, before)  # the saved state is a copy
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError, match="rank_weight"):
        ReplayBuffer(rank_weight=0.0)
    with pytest.raises(ValueError, match="columns"):
        buffer.add(torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(RuntimeError, match="empty"):
        ReplayBuffer().sample(1)


def test_reservoir_slots_taken_twice_in_one_batch_keep_the_latest_point_whole():
    capacity, batch, dim = 8, 256, 512  # large enough that torch writes with several threads
    for seed in range(20):
        buffer = ReplayBuffer(capacity, eviction="reservoir")
        buffer.add(torch.full((capacity, dim), -1.0), torch.full((capacity,), -1.0))
        ids = torch.arange(batch, dtype=torch.float32)
        torch.manual_seed(seed)
        buffer.add(ids[:, None].expand(batch, dim).clone(), ids)
        torch.manual_seed(seed)  # the same slots, assigned one point at a time (Algorithm R: later wins)
        count = capacity + torch.arange(1, batch + 1, dtype=torch.float64)
        slot = (torch.rand(batch, dtype=torch.float64) * count).long()
        reference = torch.full((capacity,), -1.0)
        for i in range(batch):
            if slot[i] < capacity:
                reference[slot[i]] = float(i)
        assert torch.equal(buffer.log_target, reference)
        assert torch.equal(buffer.z, reference[:, None].expand(capacity, dim))  # no row mixes two points


def test_reservoir_buffer_keeps_a_uniform_sample_of_its_history(float64):
    torch.manual_seed(0)
    fifo, reservoir = ReplayBuffer(capacity=1000), ReplayBuffer(capacity=1000, eviction="reservoir")
    for start in range(0, 10_000, 100):
        batch = torch.arange(start, start + 100, dtype=torch.float64)[:, None]
        fifo.add(batch, batch[:, 0])
        reservoir.add(batch, batch[:, 0])
    assert fifo.z.min() == 9000 and reservoir.seen == 10_000 and len(reservoir) == 1000
    kept = reservoir.z[:, 0]
    assert len(kept.unique()) == 1000
    torch.testing.assert_close(reservoir.log_target, kept)
    # a uniform sample of 0..9999: mean 4999.5 (sd of the mean about 91), half from the first half (sd 0.016)
    assert abs(float(kept.mean()) - 4999.5) < 4 * 91
    assert abs(float((kept < 5000).double().mean()) - 0.5) < 4 * 0.016
    copy = ReplayBuffer()
    copy.load_state_dict(reservoir.state_dict())
    assert copy.eviction == "reservoir" and copy.seen == 10_000
    with pytest.raises(ValueError, match="eviction"):
        ReplayBuffer(eviction="lifo")


def test_langevin_search_keeps_the_target_invariant(float64):
    # started at exact draws of a correlated Gaussian, Metropolis-adjusted steps leave them exact draws
    cov = torch.tensor([[2.0, 0.8], [0.8, 0.5]])
    target = dist.MultivariateNormal(torch.tensor([1.0, -2.0]), cov)
    torch.manual_seed(0)
    start = target.sample((20_000,))
    z, log_rho, accept = langevin_search(target.log_prob, start, 20, 0.4)
    torch.testing.assert_close(log_rho, target.log_prob(z))
    assert 0.3 < accept < 1.0 and (z != start).any(-1).double().mean() > 0.9
    assert (z.mean(0) - target.mean).abs().max() < 0.05  # Monte Carlo sd about 0.01
    assert (torch.cov(z.T) - cov).abs().max() < 0.08
    with pytest.raises(ValueError, match="step_size"):
        langevin_search(target.log_prob, start, 1, 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        langevin_search(target.log_prob, start, -1, 0.1)


def test_buffered_log_variance_loss(float64):
    # for an exact sampler the loss is zero on forward and replayed paths alike; a trainable one gets gradients
    sigma = 1.0
    model = gaussian_model(scale=sigma)
    guide = AutoDiffusion(model, num_steps=6, sigma=sigma, hidden=8, init_loc_fn=init_to_mean)
    guide()
    buffer = ReplayBuffer(capacity=100)
    buffer.add(3 * torch.randn(40, 3), torch.zeros(40))  # far-off points: the backward paths reach them
    loss = LogVarianceLoss(16, buffer=buffer, search_steps=2)
    assert float(loss.differentiable_loss(model, guide).detach()) < 1e-20
    assert 40 + 8 < len(buffer) <= 40 + 8 + 16 and loss.calls == 1  # 8 forward end points, distinct searched points
    in_place = ReplayBuffer(capacity=100)
    in_place.add(3 * torch.randn(40, 3), torch.zeros(40))
    before_search = in_place.z.clone()
    LogVarianceLoss(16, buffer=in_place, search_steps=2, search_in_place=True).differentiable_loss(model, guide)
    moved = torch.cat([(in_place.z[:40] != before_search).any(-1), torch.ones(8, dtype=torch.bool)])
    assert len(in_place) == 48 and moved[:40].any()  # moved, not added
    exact = dist.Normal(0.0, sigma).log_prob(in_place.z).sum(-1)
    torch.testing.assert_close(in_place.log_target[moved], exact[moved])
    before = guide.drift.out.weight.detach().clone()
    pyro.clear_param_store()
    model = gaussian_model(scale=2.0)
    guide = AutoDiffusion(model, num_steps=4, hidden=8)
    trained = LogVarianceLoss(16, buffer=ReplayBuffer())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), trained)
    for _ in range(3):
        svi.step()
    assert len(trained.buffer) == 16 + 8 + 8  # from the second step on, half the paths run backwards
    assert (guide.drift.out.weight.detach() - before).abs().sum() > 0
    for kwargs, match in (({"backward_fraction": 1.0}, "backward_fraction"), ({"search_steps": 2}, "needs a buffer"),
                          ({"buffer": buffer, "search_every": 0}, "search_every")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LogVarianceLoss(8, **kwargs)


def walled_model():
    # a standard normal whose density is NaN outside |x_i| < 2 (say, a simulator that fails there)
    x = pyro.sample("x", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
    pyro.factor("wall", torch.where(x.abs().amax(-1) < 2, 0.0, math.nan))


def test_local_search_rejects_points_where_the_density_is_not_finite(float64):
    guide = AutoDiffusion(walled_model, num_steps=4, hidden=8, init_loc_fn=init_to_mean)
    guide()
    target = guide.target()
    z = torch.tensor([[0.5, -1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, -1.5]])
    with pytest.raises(FloatingPointError, match="'wall'"):
        target.log_density(z)
    lenient = target.log_density(z, strict=False)
    assert lenient[1] == -math.inf
    torch.testing.assert_close(lenient[[0, 2]], dist.Normal(0.0, 1.0).log_prob(z[[0, 2]]).sum(-1))
    torch.manual_seed(0)
    buffer = ReplayBuffer(capacity=100)
    buffer.add(torch.rand(60, 3) * 2 - 1, torch.zeros(60))
    loss = LogVarianceLoss(32, buffer=buffer, search_steps=5, search_in_place=True)
    loss.search_step_size = 2.0  # proposals often cross the wall
    loss._search(guide, (), {})
    moved = buffer.log_target != 0
    assert moved.any() and torch.isfinite(buffer.log_target).all() and buffer.z.abs().max() < 2
    exact = dist.Normal(0.0, 1.0).log_prob(buffer.z[moved]).sum(-1)
    torch.testing.assert_close(buffer.log_target[moved], exact)
    assert loss.search_step_size < 2.0  # most proposals were rejected: the step shrinks


def _pis(**changes):
    fields = dict(kind="pis", num_steps=4, sigma=1.0, horizon=1.0) | changes
    return ReferenceProcess(**fields)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: gaussian_log_density(torch.zeros(2, 3), torch.zeros(3), 0.0), ValueError, "var"),
        (lambda: gaussian_log_density(torch.zeros(2, 3), torch.zeros(3), -1.0), ValueError, "var"),
        (lambda: gaussian_log_density(torch.zeros(2, 3), torch.zeros(3), float("nan")), ValueError, "var"),
        (lambda: gaussian_log_density(torch.zeros(2, 3), torch.zeros(3), True), ValueError, "var"),
        (lambda: gaussian_log_density(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3), 0.5), TypeError, "x"),
        (lambda: _pis(kind="xyz"), ValueError, "kind"),
        (lambda: _pis(num_steps=0), ValueError, "num_steps"),
        (lambda: _pis(num_steps=2.5), ValueError, "num_steps"),
        (lambda: _pis(sigma=float("nan")), ValueError, "sigma"),
        (lambda: _pis(horizon=-1.0), ValueError, "horizon"),
        (lambda: _pis(grid=torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)), ValueError, "grid"),
        (lambda: _pis(grid=torch.tensor([0.0, 0.5, 0.4, 0.8, 1.0], dtype=torch.float64)), ValueError, "grid"),
        (lambda: ReferenceProcess("dds", 4, 1.0, 1.0, torch.full((3,), 0.1)), ValueError, "alphas"),
        (lambda: ReferenceProcess("dds", 4, 1.0), ValueError, "alphas"),
        (lambda: DriftNet(2.5), ValueError, "dim"),
        (lambda: DriftNet(2, hidden=True), ValueError, "hidden"),
        (lambda: DriftNet(2, depth=0), ValueError, "depth"),
        (lambda: DriftNet(2, time_features=-1), ValueError, "time_features"),
        (lambda: DriftNet(2, score_clip=float("nan")), ValueError, "score_clip"),
        (lambda: DriftNet(2, use_score=False)(torch.zeros(3, 2), float("nan")), ValueError, "t"),
        (lambda: langevin_search(lambda z: -z.square().sum(-1), torch.full((2, 2), float("nan")), 1, 0.1), ValueError,
         "z"),
        (lambda: langevin_search(lambda z: -z.square().sum(-1), torch.zeros(0, 2), 1, 0.1), ValueError, "z"),
        (lambda: langevin_search(lambda z: -z.square().sum(-1), [[0.0, 1.0]], 1, 0.1), TypeError, "z"),
        (lambda: _filled_buffer().sample(0), ValueError, "num"),
        (lambda: _filled_buffer().sample(-1), ValueError, "num"),
        (lambda: LogVarianceLoss(buffer="x"), TypeError, "buffer"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _filled_buffer():
    buffer = ReplayBuffer(capacity=4)
    buffer.add(torch.zeros(2, 1), torch.zeros(2))
    return buffer


def test_numpy_and_integer_inputs_are_accepted():
    buffer = ReplayBuffer(capacity=4)
    buffer.add(np.zeros((2, 1)), np.zeros(2))
    assert len(buffer) == 2 and torch.is_tensor(buffer.z)
    assert importance_estimate(torch.tensor([0, 0]))["log_z"] == 0.0
    assert DriftNet(2, score_clip=None)(torch.zeros(3, 2), 0.5, torch.full((3, 2), 1e9)).shape == (3, 2)
