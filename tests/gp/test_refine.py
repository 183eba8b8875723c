"""Refining a trained posterior with extra actions: StackedActions and ``posterior(refine=...)``."""

import gpytorch
import pyro
import pytest
import torch

from pyro_gpx.gp import (
    BlockSparsePolicy,
    CGPolicy,
    ComputationAwareGP,
    DenseActions,
    IndexActions,
    KernelFn,
    PolicyContext,
    PseudoInputPolicy,
    StackedActions,
    UnitVectorPolicy,
    independent_columns,
    partial_cholesky,
    project,
)
from pyro_gpx.gp.projection import pivoted_independent_columns

from .problems import make_problem


@pytest.fixture
def problem(float64):
    return make_problem(n=80, seed=3)


def test_stacked_actions_equal_their_dense_concatenation(problem):
    n = len(problem.y)
    context = PolicyContext(problem.X, problem.y, problem.kfn, problem.noise)
    block = BlockSparsePolicy(7, init="random").actions(context)
    dense = DenseActions(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)))
    index = IndexActions(torch.tensor([4, 17, 50]), n)
    stacked = StackedActions([block, dense, index])
    S = torch.cat([block.dense(), dense.dense(), index.dense()], 1)
    assert stacked.num_actions == 13
    torch.testing.assert_close(stacked.dense(), S)
    torch.testing.assert_close(stacked.gram(), S.T @ S)
    v, V, w = problem.y, torch.randn(n, 2), torch.randn(13)
    torch.testing.assert_close(stacked.t_matmul(v), S.T @ v)
    torch.testing.assert_close(stacked.t_matmul(V), S.T @ V)
    torch.testing.assert_close(stacked.matmul(w), S @ w)
    K = problem.kernel(problem.X_new, problem.X).to_dense()
    torch.testing.assert_close(stacked.kernel_product(problem.kfn, problem.X_new, problem.X), K @ S)
    Kxx = problem.kernel(problem.X, problem.X).to_dense()  # training path (symmetric block product)
    torch.testing.assert_close(stacked.kernel_product(problem.kfn, problem.X, problem.X), Kxx @ S)
    refinement = StackedActions([block, dense])  # prediction: one triangle of tiles for both parts
    with torch.no_grad():
        KS = refinement.kernel_product(problem.kfn, problem.X, problem.X)
    torch.testing.assert_close(KS, Kxx.detach() @ S[:, :10])


def test_stacked_actions_reject_bad_parts():
    with pytest.raises(ValueError, match="parts"):
        StackedActions([])
    with pytest.raises(ValueError, match="different numbers of points"):
        StackedActions([IndexActions(torch.tensor([0]), 5), IndexActions(torch.tensor([0]), 6)])


def test_refining_with_converged_cg_gives_the_exact_mean_and_shrinks_the_variance(problem):
    """Few learned actions leave real computational uncertainty; appending CG directions run to
    convergence makes the mean the exact GP's, and the variance falls towards (never below) the
    exact GP's, pointwise."""
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(4), noise=problem.noise,
                            jitter=0.0)  # fmt: skip
    ref_mean, ref_cov = problem.dense_posterior()
    with torch.no_grad():
        base = gp.posterior(problem.X_new, split=True)
        refined = gp.posterior(problem.X_new, split=True, refine=CGPolicy(80, tol=1e-12))
        again = gp.posterior(problem.X_new)
    assert (base.mean - ref_mean).abs().max() > 1e-2  # 4 actions are far from exact
    torch.testing.assert_close(refined.mean, ref_mean, rtol=1e-6, atol=1e-8)
    math_var = ref_cov.diagonal()
    torch.testing.assert_close(refined.mathematical, math_var)
    assert (refined.covariance >= math_var - 1e-10).all()
    assert (refined.covariance <= base.covariance + 1e-10).all()
    assert refined.computational.max() < 1e-3 * base.computational.max()
    torch.testing.assert_close(again.mean, base.mean)  # refining leaves the model as it was


def test_forward_refine_and_bad_refine(problem):
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(4), noise=problem.noise)
    with torch.no_grad():
        mean, var = gp(problem.X_new, noiseless=False, refine=UnitVectorPolicy(10))
        base_mean, base_var = gp(problem.X_new, noiseless=False)
    assert mean.shape == var.shape == (len(problem.X_new),)
    assert (var <= base_var + 1e-10).all() and not torch.allclose(mean, base_mean)
    with pytest.raises(TypeError, match="refine must be a Policy"):
        gp.posterior(problem.X_new, refine="cg")
    with pytest.raises(ValueError, match="num_actions"):
        gp.posterior(problem.X_new, refine=UnitVectorPolicy(81))


@pytest.mark.parametrize("kernel_kind", ["stationary", "sum"])
def test_refining_a_float32_model_with_tiny_noise_is_the_float64_posterior_of_its_actions(kernel_kind):
    """float32 data and kernel, noise 1e-4 of the signal variance: float32 CG directions lose their
    conjugacy (40 of them span far fewer dimensions). The refined posterior is the dense float64
    computation-aware posterior of the actions it keeps, :math:`\\mu = k_x S (S^\\top \\hat K S)^{-1}
    S^\\top y`, with a well-conditioned Gram matrix, and close to the exact GP."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(600, 1, generator=gen) * 10
    y = torch.sin(X[:, 0]) + 0.01 * torch.randn(600, generator=gen)
    X_new = torch.linspace(0, 10, 50)[:, None]
    rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    rbf.base_kernel.lengthscale = 0.7
    kernel = rbf if kernel_kind == "stationary" else rbf + gpytorch.kernels.LinearKernel()
    noise = 1e-4
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(20), noise=noise, jitter=0.0)
    refine = CGPolicy(40, tol=1e-6, preconditioner="rpcholesky", preconditioner_rank=30)
    with torch.no_grad():
        refined = gp.posterior(X_new, refine=refine, split=True)
        S = gp.refined_projection(refine).actions.dense()
        X64, Xn64 = X.double(), X_new.double()
        K_hat = kernel(X64, X64).to_dense() + noise * torch.eye(600, dtype=torch.float64)
        KxS = kernel(Xn64, X64).to_dense() @ S
        G = S.T @ K_hat @ S
        ref_mean = KxS @ torch.linalg.solve(G, S.T @ y.double())
        ref_var = kernel(Xn64, Xn64).to_dense().diagonal() - (KxS * torch.linalg.solve(G, KxS.T).T).sum(1)
        exact_mean = kernel(Xn64, X64).to_dense() @ torch.linalg.solve(K_hat, y.double())
    assert refined.mean.dtype == torch.float64
    scaled = G / torch.outer(G.diagonal().sqrt(), G.diagonal().sqrt())
    assert 20 < S.shape[1] < 60 and torch.linalg.cond(scaled) < 1e9  # redundant directions were dropped
    torch.testing.assert_close(refined.mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(refined.covariance, ref_var.clamp_min(0), rtol=1e-5, atol=1e-6)
    # which float32 CG directions survive depends on the CPU's rounding (vector width): the largest
    # gap, at the edge point x = 10, was 0.0096 on one machine and 0.0138 on another
    assert (refined.mean - exact_mean).abs().max() < 2e-2
    assert refined.computational.min() > -1e-8  # combined >= mathematical, in float64


def test_independent_columns_drops_exactly_the_redundant_ones(float64):
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(30, 4, generator=gen)
    S = torch.cat([A, A[:, :2] @ torch.tensor([[1.0], [2.0]]), torch.randn(30, 1, generator=gen), A[:, 3:]], 1)
    G = S.T @ S  # columns 4 (a combination) and 6 (a copy) add nothing
    assert independent_columns(G).tolist() == [0, 1, 2, 3, 5]
    assert independent_columns(G, start=2).tolist() == [0, 1, 2, 3, 5]
    assert independent_columns(G, rtol=0.99).tolist() == [0]  # every later column overlaps a little
    with pytest.raises(ValueError, match="start"):
        independent_columns(G, start=8)


def test_refining_a_float32_model_forms_float32_kernel_entries_where_their_rounding_is_harmless():
    """With noise well above the entries' rounding, the refined float32 model keeps float32 kernel
    entries (float64 sums) and gives the posterior of float64 entries; with a tiny noise, or under
    autograd, it evaluates the kernel in float64."""
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(900, 2, generator=gen) * 4
    y = torch.sin(2 * X[:, 0]) * X[:, 1] + 0.1 * torch.randn(900, generator=gen)
    X_new = torch.rand(40, 2, generator=gen) * 4
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5))
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(30), noise=0.01)
    refine = CGPolicy(20, tol=1e-4, preconditioner="rpcholesky", preconditioner_rank=50)
    with torch.no_grad():
        assert gp._refinement_inputs(gp.marginal()).dtype == torch.float32
        mixed = gp.posterior(X_new, refine=refine, refit_noise=True)
    gp._refinement_inputs = lambda marginal: gp.X.double()
    with torch.no_grad():
        wide = gp.posterior(X_new, refine=refine, refit_noise=True)
    assert mixed.mean.dtype == mixed.covariance.dtype == torch.float64
    torch.testing.assert_close(mixed.noise, wide.noise, rtol=1e-4, atol=0)
    # the entries' rounding (~1e-7 relative) moves the mean by a thousandth of a posterior sd at most
    assert ((mixed.mean - wide.mean).abs() / wide.covariance.sqrt()).max() < 1e-3
    torch.testing.assert_close(mixed.covariance, wide.covariance, rtol=1e-3, atol=1e-7)
    del gp._refinement_inputs
    assert gp._refinement_inputs(gp.marginal()).dtype == torch.float64  # autograd on
    pyro.clear_param_store()  # a second model of the same name would share the stored noise
    tiny = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(30), noise=1e-6)
    with torch.no_grad():
        assert tiny._refinement_inputs(tiny.marginal()).dtype == torch.float64


def test_pivot_actions_bring_the_variance_down_with_a_small_noise(float64):
    """With a tiny noise, CG directions resolve the mean but leave the variance at new points high;
    unit vectors at the preconditioner's pivots condition on those points exactly, so the variance
    falls towards the exact GP's (never below) and the mean stays exact. The one-pass training
    product of [block-sparse, dense, unit-vector] parts equals the dense product."""
    problem = make_problem(n=300, seed=4, noise=1e-4, lengthscale=(0.2, 0.3))
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(10), noise=problem.noise,
                            jitter=0.0)  # fmt: skip
    ref_mean, ref_cov = problem.dense_posterior()
    kwargs = dict(tol=1e-8, preconditioner="rpcholesky", preconditioner_rank=60)
    with torch.no_grad():
        plain = gp.posterior(problem.X_new, refine=CGPolicy(300, **kwargs))
        pivots = CGPolicy(300, pivot_actions=True, **kwargs)
        with_pivots = gp.posterior(problem.X_new, refine=pivots)
    assert len(pivots.last_pivots) == 60
    torch.testing.assert_close(with_pivots.mean, ref_mean, rtol=1e-5, atol=1e-6)
    exact = ref_cov.diagonal()
    assert (with_pivots.covariance >= exact - 1e-8).all()
    assert (with_pivots.covariance <= plain.covariance + 1e-10).all()
    assert float((with_pivots.covariance - exact).sum()) < 0.5 * float((plain.covariance - exact).sum())
    n = len(problem.y)
    context = PolicyContext(problem.X, problem.y, problem.kfn, problem.noise)
    parts = [
        BlockSparsePolicy(5).actions(context),
        DenseActions(torch.randn(n, 2)),
        IndexActions(torch.tensor([3, 9]), n),
    ]
    stacked = StackedActions(parts)
    with torch.no_grad():
        KS = stacked.kernel_product(problem.kfn, problem.X, problem.X)
        dense = problem.kernel(problem.X, problem.X).to_dense() @ stacked.dense()
    torch.testing.assert_close(KS, dense)
    with pytest.raises(ValueError, match="pivot_actions"):
        CGPolicy(5, pivot_actions=True)


@pytest.mark.parametrize("noise", [1e-3, 1e-4])
def test_refining_pseudo_input_actions_reaches_the_exact_gp(float64, noise):
    # near-dependent pseudo-input and CG columns passed a pivot test (cond(G) ~ 1e18): the refined mean was 20 off
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(300, 1, generator=gen) * 4
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(300, generator=gen)
    X_new = torch.linspace(-0.5, 4.5, 30)[:, None]
    kernel = gpytorch.kernels.RBFKernel().double()
    kernel.lengthscale = 0.5
    policy = PseudoInputPolicy(torch.linspace(0, 4, 9)[:, None])
    gp = ComputationAwareGP(X, y, kernel, policy=policy, noise=noise, jitter=0.0)
    with torch.no_grad():
        refined = gp.posterior(X_new, refine=CGPolicy(300, tol=1e-8))
        K = kernel(X, X).to_dense() + noise * torch.eye(300)
        Kx = kernel(X_new, X).to_dense()
        mean = Kx @ torch.linalg.solve(K, y)
        var = 1.0 - (Kx * torch.linalg.solve(K, Kx.T).T).sum(-1)
    torch.testing.assert_close(refined.mean, mean, rtol=0, atol=1e-5)
    assert float((refined.covariance - var).min()) > -1e-8  # never below the exact posterior's variance


def test_pivots_on_repeated_inputs_are_distinct_and_the_elbo_is_the_dense_one(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.cat([torch.rand(50, 2, generator=gen) * 4] * 4)  # every input four times
    y = torch.sin(3 * X[:, 0]) + 0.1 * torch.randn(200, generator=gen)
    kernel = gpytorch.kernels.RBFKernel().double()
    for pivoting in ("rpcholesky", "greedy"):
        _, pivots = partial_cholesky(KernelFn(kernel), X, 100, pivoting=pivoting, generator=gen)
        assert len(torch.unique(pivots)) == len(pivots) <= 50  # the numerical rank: 50 distinct inputs
    policy = CGPolicy(5, preconditioner="rpcholesky", preconditioner_rank=100, pivot_actions=True)
    gp = ComputationAwareGP(X, y, kernel, policy=policy, noise=1e-2, jitter=0.0)
    with torch.no_grad():
        marginal = gp.marginal(sample_priors=False)
        elbo = float(marginal.log_prob(y))
        S = marginal.actions.dense().double()
        U, s, _ = torch.linalg.svd(S, full_matrices=False)
        dense = project(DenseActions(U[:, s > 1e-10 * s[0]]), KernelFn(kernel), X, y, torch.tensor(1e-2))
    assert elbo == pytest.approx(float(dense.elbo(KernelFn(kernel).diag(X))), abs=1e-6)  # was 33.99 against 34.80


def _sine_40():
    """40 points on [0, 5], RBF lengthscale 0.7: an ill-conditioned kernel matrix at small noise."""
    gen = torch.Generator().manual_seed(0)
    X = torch.sort(torch.rand(40, 1, generator=gen) * 5, 0).values
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(40, generator=gen)
    kernel = gpytorch.kernels.RBFKernel().double()
    kernel.lengthscale = 0.7
    return X, y, torch.linspace(-1, 6, 25)[:, None], kernel


def _exact_mean(X, y, X_new, kernel, noise):
    with torch.no_grad():
        K = kernel(X, X).to_dense() + noise * torch.eye(len(X))
        return kernel(X_new, X).to_dense() @ torch.linalg.solve(K, y)


@pytest.mark.parametrize("noise", [1e-4, 1e-6])
def test_refining_block_actions_with_converged_cg_at_a_tiny_noise_reaches_the_exact_gp(float64, noise):
    """Every block action was kept and the CG directions tested after them, in order: the span was nearly
    dependent, and the CG directions dropped were the ones carrying the solution (noise 1e-6: a refined mean
    29 off the exact GP's, whose mean peaks at 27.5). The best-conditioned columns are kept now."""
    X, y, X_new, kernel = _sine_40()
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(5), noise=noise, jitter=0.0)
    with torch.no_grad():
        refined = gp.posterior(X_new, refine=CGPolicy(40, tol=0.0))
    torch.testing.assert_close(refined.mean, _exact_mean(X, y, X_new, kernel, noise), rtol=0, atol=1e-5)


def test_pivoted_column_choice_does_not_depend_on_the_order(float64):
    gen = torch.Generator().manual_seed(1)
    S = torch.randn(30, 6, generator=gen)
    S = torch.cat([S, S[:, :3] @ torch.randn(3, 4, generator=gen)], 1)  # 4 dependent columns
    G = S.T @ S
    kept = pivoted_independent_columns(G)
    assert len(kept) == 6
    order = torch.randperm(10, generator=gen)
    assert len(pivoted_independent_columns(G[order][:, order])) == 6


def test_many_pseudo_inputs_keep_every_direction_float64_resolves(float64):
    """Near-dependent pseudo-input actions were orthonormalised through eigh(S'S), which squares cond(S) and
    dropped every direction below sqrt(eps) sigma_max: 30 pseudo-inputs kept 16 (mean 0.2 off the exact
    GP at noise 1e-4, and more pseudo-inputs stopped helping); the SVD of S keeps 24."""
    X, y, X_new, kernel = _sine_40()
    gp = ComputationAwareGP(X, y, kernel, policy=PseudoInputPolicy(torch.linspace(0, 5, 30)[:, None]), noise=1e-4,
                            jitter=0.0)  # fmt: skip
    with torch.no_grad():
        moments = gp.posterior(X_new)
    torch.testing.assert_close(moments.mean, _exact_mean(X, y, X_new, kernel, 1e-4), rtol=0, atol=1e-3)
