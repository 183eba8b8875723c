"""Matrix-free products, action formats, preconditioners and Cholesky against dense references."""

import warnings

import pyro
import pytest
import torch
from linear_operator.functions import pivoted_cholesky as lo_pivoted_cholesky

from pyro_gpx.gp import (
    BlockSparseActions,
    BlockSparsePolicy,
    CGPolicy,
    CholeskyError,
    ComputationAwareGP,
    DenseActions,
    IndexActions,
    NonFiniteError,
    NumericalWarning,
    StackedActions,
    UnitVectorPolicy,
    build_preconditioner,
    kernel_matmul,
    partial_cholesky,
    safe_cholesky,
    settings,
)

from .problems import make_problem


@pytest.fixture
def problem(float64):
    return make_problem(n=50, seed=2)


def test_chunked_product_and_its_gradient_match_dense(problem):
    V = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    kernel = problem.kernel
    params = [kernel.raw_outputscale, kernel.base_kernel.raw_lengthscale]
    dense = kernel(problem.X, problem.X).to_dense() @ V
    g_dense = torch.autograd.grad((dense**2).sum(), params)
    with settings.chunk_size(7):
        chunked = kernel_matmul(problem.kfn, problem.X, problem.X, V)
        g_chunked = torch.autograd.grad((chunked**2).sum(), params)
    torch.testing.assert_close(chunked, dense)
    for a, b in zip(g_chunked, g_dense):
        torch.testing.assert_close(a, b)


def _block_actions(n=50, i=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    block = -(-n // i)
    perm = torch.cat([torch.randperm(n, generator=gen), torch.arange(block * i - n)])
    mask = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(block * i - n, dtype=torch.bool)])
    index, mask = perm.reshape(block, i).T, mask.reshape(block, i).T
    return BlockSparseActions(index, torch.randn(i, block, generator=gen, dtype=torch.float64), mask, n)


@pytest.mark.parametrize("kind", ["index", "dense", "block"])
def test_action_formats_agree_with_their_dense_matrix(problem, kind):
    if kind == "index":
        actions = IndexActions(torch.tensor([3, 10, 7]), 50)
    elif kind == "dense":
        actions = DenseActions(torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    else:
        actions = _block_actions()
    S = actions.dense()
    assert S.shape == (50, actions.num_actions)
    v, W = torch.randn(50, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    w = torch.randn(actions.num_actions, dtype=torch.float64)
    torch.testing.assert_close(actions.t_matmul(v), S.T @ v)
    torch.testing.assert_close(actions.t_matmul(W), S.T @ W)
    torch.testing.assert_close(actions.matmul(w), S @ w)
    torch.testing.assert_close(actions.gram(), S.T @ S)
    with settings.chunk_size(9):
        KS = actions.kernel_product(problem.kfn, problem.X_new, problem.X)
    torch.testing.assert_close(KS, problem.kernel(problem.X_new, problem.X).to_dense() @ S)


def test_block_actions_on_some_points_agree_and_overlapping_blocks_are_refused(problem):
    # blocks leaving points out: the symmetric training product read the uncovered points' rows from an
    # uninitialised position table (IndexError, or other points' rows); overlapping blocks (sliding windows)
    # were taken to have a diagonal S^T S, so the ELBO and the posterior were silently wrong
    index, mask = torch.tensor([[0, 1, 2], [5, 6, 7]]), torch.ones(2, 3, dtype=torch.bool)
    actions = BlockSparseActions(index, torch.randn(2, 3, dtype=torch.float64), mask, 50)
    S = actions.dense()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            KS = actions.kernel_product(problem.kfn, problem.X, problem.X)
        torch.testing.assert_close(KS, problem.kernel(problem.X, problem.X).to_dense() @ S)
    dense = DenseActions(torch.randn(50, 2, dtype=torch.float64))
    stacked = StackedActions([actions, dense])
    with torch.no_grad():
        KS = stacked.kernel_product(problem.kfn, problem.X, problem.X)
    torch.testing.assert_close(KS, problem.kernel(problem.X, problem.X).to_dense() @ stacked.dense())
    overlapping = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5]])
    with pytest.raises(ValueError, match="the blocks overlap"):
        BlockSparseActions(overlapping, torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.bool), 50)
    with pytest.raises(ValueError, match="the blocks overlap"):
        BlockSparseActions(torch.tensor([[0, 0, 1]]), torch.ones(1, 3, dtype=torch.float64), mask[:1], 50)


def test_greedy_pivoted_cholesky_matches_linear_operator(problem):
    K = problem.kernel(problem.X, problem.X).to_dense().detach()
    ours, pivots = partial_cholesky(problem.kfn, problem.X, rank=8, pivoting="greedy")
    ref = lo_pivoted_cholesky(K, rank=8)
    torch.testing.assert_close(ours @ ours.T, ref @ ref.T, rtol=1e-8, atol=1e-10)
    assert len(set(pivots.tolist())) == 8


def test_rpcholesky_error_decreases_and_full_rank_is_exact(problem):
    K = problem.kernel(problem.X, problem.X).to_dense().detach()
    errors = []
    for rank in (2, 5, 10, 20):
        L, _ = partial_cholesky(problem.kfn, problem.X, rank, pivoting="rpcholesky",
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        errors.append(float(torch.trace(K - L @ L.T)))
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3 * errors[0]


def test_block_rpcholesky_is_the_nystrom_factor_of_its_pivots(problem):
    K = problem.kernel(problem.X, problem.X).to_dense().detach()
    errors = []
    for rank in (4, 12, 24):
        L, pivots = partial_cholesky(problem.kfn, problem.X, rank, pivoting="rpcholesky", block_size=4,
                                     generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert L.shape[1] <= rank and len(set(pivots.tolist())) == len(pivots)
        S = pivots
        nystrom = K[:, S] @ torch.linalg.solve(K[S][:, S], K[S, :])
        torch.testing.assert_close(L @ L.T, nystrom, rtol=1e-6, atol=1e-8)
        assert float(torch.linalg.eigvalsh(K - L @ L.T).min()) > -1e-9  # the residual stays PSD
        errors.append(float(torch.trace(K - L @ L.T)))
    assert errors[0] > errors[1] > errors[2]
    L, _ = partial_cholesky(problem.kfn, problem.X, 50, pivoting="rpcholesky", block_size=8,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert float(torch.trace(K - L @ L.T)) < 1e-8 * float(torch.trace(K))
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="block_size"):
            partial_cholesky(problem.kfn, problem.X, 5, pivoting="rpcholesky", block_size=bad)


def test_preconditioner_solve_logdet_and_samples(problem):
    pre = build_preconditioner(problem.kfn, problem.X, problem.noise, rank=6)
    P = pre.L @ pre.L.T + problem.noise * torch.eye(50)
    v = torch.randn(50, 3, dtype=torch.float64)
    torch.testing.assert_close(pre.solve(v), torch.linalg.solve(P, v))
    assert float(pre.logdet()) == pytest.approx(float(torch.logdet(P)), rel=1e-10)
    samples = pre.sample(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples @ samples.T / 20000, P, atol=0.06, rtol=0.05)


def test_cholesky_jitter_escalation_and_error():
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # singular PSD
    with pytest.warns(NumericalWarning, match=r"matrix \(2x2\) was not positive definite; added jitter of 1e-08"):
        L = safe_cholesky(A)
    assert torch.isfinite(L).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without jitter
        safe_cholesky(torch.eye(2, dtype=torch.float64))
    message = r"my matrix \(2x2\): input is not positive-definite even with jitter \[3.00e-08, .*, 3.00e-02\]"
    with pytest.raises(CholeskyError, match=message) as error:
        safe_cholesky(torch.tensor([[1.0, 2.0], [2.0, -5.0]], dtype=torch.float64), "my matrix")
    assert isinstance(error.value, RuntimeError)
    with pytest.raises(NonFiniteError, match="NaN") as error:
        safe_cholesky(torch.tensor([[float("nan")]], dtype=torch.float64))
    assert isinstance(error.value, ValueError) and isinstance(error.value, RuntimeError)


@pytest.mark.parametrize("policy", ["unit", "blocks", "cg"])
def test_float32_inputs_far_from_the_origin_keep_their_distances(policy):
    """Squared distances formed as |z|^2 + |z'|^2 - 2 z.z' lost eps |z|^2 to cancellation: float32 inputs in
    [300, 305] gave a full-action (exact) posterior mean 0.08 off the float64 exact GP, and an ELBO of -2.6
    against 8.8. The products now centre the inputs (a stationary kernel is translation invariant)."""
    problem = make_problem(n=30, d=1, lengthscale=(1.0,), outputscale=1.0, noise=0.01)
    X64, y64 = problem.X * 5 + 300.0, problem.y
    exact = ComputationAwareGP(X64, y64, problem.kernel, policy=UnitVectorPolicy(30), noise=0.01)
    kernel32 = make_problem(n=30, d=1, lengthscale=(1.0,), outputscale=1.0).kernel.float()
    chosen = {"unit": UnitVectorPolicy(30), "blocks": BlockSparsePolicy(30), "cg": CGPolicy(30, tol=0.0)}[policy]
    gp = ComputationAwareGP(X64.float(), y64.float(), kernel32, policy=chosen, noise=0.01)
    with torch.no_grad():
        mean, _ = gp(X64[::3].float())
        mean64, _ = exact(X64[::3])
        elbo = float(gp.marginal().log_prob(y64.float()))
        lml = float(exact.marginal().log_prob(y64))  # n unit actions: the exact GP
    assert (mean.double() - mean64).abs().max() < 1e-3
    assert abs(elbo - lml) < 0.05


def test_a_noise_below_float32_resolution_warns_once():
    """float32 with noise 1e-6 at n = 30: n eps max k = 3.6e-6 exceeds the noise, and converged CG gave a mean
    744 off the float64 exact GP's, silently."""
    problem = make_problem(n=30, d=1, lengthscale=(1.0,), outputscale=1.0)
    kernel = make_problem(n=30, d=1, lengthscale=(1.0,), outputscale=1.0).kernel.float()
    gp = ComputationAwareGP(problem.X.float(), problem.y.float(), kernel, policy=CGPolicy(30), noise=1e-6, jitter=0.0)
    with pytest.warns(NumericalWarning, match="below what torch.float32 resolves"), torch.no_grad():
        gp.marginal()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        with torch.no_grad():
            gp.marginal()  # once
    pyro.clear_param_store()  # the noise is a Pyro parameter: a second model would read the first one's
    fine = ComputationAwareGP(problem.X.float(), problem.y.float(), kernel, policy=CGPolicy(30), noise=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        with torch.no_grad():
            fine.marginal()
    # with gradients on (SVI, L-BFGS) the check read the noise with float(), and torch warned about it
    pyro.clear_param_store()
    fitted = ComputationAwareGP(problem.X.float(), problem.y.float(), kernel, policy=CGPolicy(30), noise=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fitted.marginal()
