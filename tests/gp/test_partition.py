"""Block partitions for CaGP-Opt actions: exact partitions, balanced sizes, local (k-d) blocks."""

import pyro
import pytest
import torch

from pyro_gpx.gp import BlockSparsePolicy, ComputationAwareGP, KernelFn, PolicyContext, kd_partition, random_partition

from .problems import make_problem


def _blocks(index, mask):
    return [row[m] for row, m in zip(index, mask)]


@pytest.mark.parametrize("n,num_blocks", [(10, 3), (257, 16), (1000, 512), (13, 13), (5, 1)])
def test_partitions_cover_every_point_once_with_sizes_within_one(n, num_blocks):
    Z = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    for index, mask in (kd_partition(Z, num_blocks), random_partition(n, num_blocks, seed=1)):
        assert index.shape == mask.shape == (num_blocks, -(-n // num_blocks))
        assert sorted(index[mask].tolist()) == list(range(n))
        sizes = mask.sum(1)
        assert int(sizes.max() - sizes.min()) <= 1


def test_kd_blocks_are_intervals_in_one_dimension():
    x = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double()
    for block in _blocks(*kd_partition(x[:, None], 8)):
        values = x[block].sort().values
        assert torch.equal(values, torch.arange(values[0], values[-1] + 1, dtype=values.dtype))


def test_kd_blocks_are_far_tighter_than_random_ones():
    Z = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0))

    def within(partition):  # mean squared distance of a point to its block's centroid
        return torch.stack([((Z[b] - Z[b].mean(0)) ** 2).sum(1).mean() for b in _blocks(*partition)]).mean()

    assert within(kd_partition(Z, 64)) < 0.05 * within(random_partition(2000, 64))


def test_kd_policy_splits_along_the_short_lengthscale(float64):
    """In scaled inputs x / lengthscale a coordinate the kernel barely varies along is never split:
    every block is a run of consecutive points in the order of the fast coordinate."""
    problem = make_problem()
    X = torch.cat([problem.X[:, :1], 100 * torch.rand(len(problem.X), 1, dtype=torch.float64)], 1)
    problem.kernel.base_kernel.lengthscale = torch.tensor([[0.3, 1e4]], dtype=torch.float64)
    context = PolicyContext(X, problem.y, KernelFn(problem.kernel), problem.noise)
    actions = BlockSparsePolicy(6).actions(context)
    rank = torch.argsort(torch.argsort(X[:, 0]))
    for block in _blocks(actions.index, actions.mask):
        r = rank[block].sort().values
        assert torch.equal(r, torch.arange(int(r[0]), int(r[0]) + len(r)))


def test_kd_policy_fits_better_than_random_with_few_actions(float64):
    """On a smooth 2-d problem with 6 actions, local blocks give a higher CaGP ELBO than random blocks."""
    problem = make_problem()
    elbos = {}
    for partition in ("kd", "random"):
        pyro.clear_param_store()  # each model initialises its own blocks
        gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(6, partition=partition),
                                noise=float(problem.noise))  # fmt: skip
        with torch.no_grad():
            elbos[partition] = float(gp.marginal().log_prob(problem.y))
    assert elbos["kd"] > elbos["random"]


def test_bad_partition_arguments_raise():
    with pytest.raises(ValueError, match="partition"):
        BlockSparsePolicy(4, partition="voronoi")
    with pytest.raises(ValueError, match="num_blocks"):
        kd_partition(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match="Z contains NaN or inf"):
        kd_partition(torch.tensor([[0.0], [float("nan")]]), 1)


@pytest.mark.parametrize("partition", ["kd", "random"])
def test_trained_block_actions_round_trip_through_state_dict(float64, partition):
    """A reloaded model predicts exactly as the trained one, though its lengthscales (which a new
    k-d partition would be cut with) have changed since the partition was made."""
    problem = make_problem()

    def fresh():
        kernel = make_problem().kernel
        return ComputationAwareGP(problem.X, problem.y, kernel, policy=BlockSparsePolicy(6, partition=partition),
                                  noise=0.1)  # fmt: skip

    pyro.clear_param_store()
    gp = fresh()
    svi = pyro.infer.SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(20):
        svi.step()
    with torch.no_grad():
        mean, var = gp(problem.X_new)
    state = gp.state_dict()
    pyro.clear_param_store()
    reloaded = fresh()
    reloaded.load_state_dict(state)
    with torch.no_grad():
        mean2, var2 = reloaded(problem.X_new)
    assert torch.equal(reloaded.policy.index, gp.policy.index)
    assert torch.allclose(mean2, mean, rtol=0, atol=1e-12)
    assert torch.allclose(var2, var, rtol=0, atol=1e-12)


def test_a_block_state_loaded_into_other_inputs_or_settings_is_refused(float64):
    """The state's point indices act on the inputs it was trained on: the same points in another row
    order predicted 0.2 off with no warning; more points silently dropped the trained entries; a policy
    built with other num_actions silently adopted the saved partition."""
    problem = make_problem()

    def build(X, y, num_actions=6):
        pyro.clear_param_store()
        return ComputationAwareGP(X, y, make_problem().kernel, policy=BlockSparsePolicy(num_actions), noise=0.1)

    gp = build(problem.X, problem.y)
    with torch.no_grad():
        gp(problem.X_new)
    state = gp.state_dict()
    perm = torch.randperm(len(problem.y), generator=torch.Generator().manual_seed(1))
    permuted = build(problem.X[perm], problem.y[perm])
    permuted.load_state_dict(state)
    with pytest.raises(ValueError, match="other training inputs.*another row order"), torch.no_grad():
        permuted(problem.X_new)
    more = build(torch.cat([problem.X, problem.X_new[:3]]), torch.cat([problem.y, problem.y[:3]]))
    more.load_state_dict(state)
    with pytest.warns(UserWarning, match="loaded partition is for 60 training points, this model has 63"):
        with torch.no_grad():
            more(problem.X_new)
    with pytest.raises(ValueError, match="6 block actions, but this policy was built with num_actions=8"):
        build(problem.X, problem.y, num_actions=8).load_state_dict(state)


def test_constant_init_averages_each_block_and_starts_higher_than_targets(float64):
    """``init="constant"`` makes action j the normalised indicator of block j. On a smooth problem
    with many points per block its starting ELBO beats the data-shaped ``"targets"`` init: the
    residual's noise puts energy where the kernel has little, so those actions remove less prior
    variance (the trace term of the ELBO)."""
    problem = make_problem(n=400, noise=0.01)
    elbos = {}
    for init in ("constant", "targets", "random"):
        pyro.clear_param_store()  # the entries live in the param store under one name
        gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(20, init=init),
                                noise=float(problem.noise))  # fmt: skip
        with torch.no_grad():
            elbos[init] = float(gp.marginal().log_prob(problem.y))
        if init == "constant":
            actions = gp.policy.actions(PolicyContext(problem.X, problem.y, gp._kernel_fn(), problem.noise))
            sizes = actions.mask.sum(1, keepdim=True).double()
            assert torch.allclose(actions.blocks, actions.mask / sizes.sqrt())
    assert elbos["constant"] > elbos["targets"] > elbos["random"], elbos
    with pytest.raises(ValueError, match="init"):
        BlockSparsePolicy(4, init="ones")
