"""Regressions: float32 dense actions, errors that reach the user, priors, stale parameters, bad input."""

import math
import warnings

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
from gpytorch.priors import LogNormalPrior
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.nn import PyroSample

from pyro_gpx.gp import (
    BlockSparsePolicy,
    CGPolicy,
    CholeskyError,
    ComputationAwareGP,
    DenseActions,
    KernelFn,
    NonFiniteError,
    NumericalWarning,
    PolicyContext,
    PseudoInputPolicy,
    UnitVectorPolicy,
    conjugate_gradients,
    exact_log_marginal_likelihood,
    project,
)

from .problems import make_problem


def _sine_1d(n=400, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 10
    y = torch.sin(X[:, 0]) + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(dtype)
    kernel.base_kernel.lengthscale = 0.7
    return X.to(dtype), y.to(dtype), kernel


def _elbo_and_split(X, y, kernel, policy, noise):
    gp = ComputationAwareGP(X, y, kernel, policy=policy, noise=noise, jitter=0.0)
    X_new = X[:30] * 0.9 + 0.05
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # no silent jitter
        elbo = float(gp.marginal().log_prob(y))
        post = gp.posterior(X_new, split=True)
    return elbo, post


@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_float32_cg_elbo_matches_float64_and_does_not_decrease_with_more_iterations(noise):
    """float32 CG past float32's resolution used to repeat directions: a singular projected Gram
    matrix, silent jitter, and an ELBO falling as actions were added (1993 -> 1277 at n = 1500)."""
    X, y, kernel = _sine_1d(n=300)
    reference, _ = _elbo_and_split(X, y, kernel, CGPolicy(60, tol=1e-10), noise)  # converges
    X, y, kernel = _sine_1d(n=300, dtype=torch.float32)
    for num_actions in (60, 120):
        pyro.clear_param_store()
        elbo, post = _elbo_and_split(X, y, kernel, CGPolicy(num_actions, tol=1e-10), noise)
        assert elbo == pytest.approx(reference, rel=1e-4)
        assert post.computational.min() > -1e-5  # combined >= mathematical (float32 rounding)


def test_float32_cg_stops_at_the_resolution_of_its_products():
    X, y, kernel = _sine_1d(dtype=torch.float32)
    policy = CGPolicy(120, tol=1e-10)
    with torch.no_grad():
        result = policy.solve(PolicyContext(X, y, KernelFn(kernel), torch.tensor(1e-2)))
    assert result.stop_reason == "breakdown" and result.iterations < 60
    S = result.directions / result.directions.norm(dim=0)
    assert torch.linalg.matrix_rank(S).item() == result.iterations  # no repeated directions


def test_float32_projection_drops_cg_directions_below_float32_resolution():
    """Independently of CG's own stop: float32 directions computed past float32's resolution (CG
    told its products are float64) are repeated; the projection keeps what float32 resolves."""
    X, y, kernel = _sine_1d(dtype=torch.float32)
    kfn, noise = KernelFn(kernel), torch.tensor(1e-2, dtype=torch.float64)
    with torch.no_grad():
        result = conjugate_gradients(lambda v: kfn(X, X).double() @ v + noise * v, y, 80, tol=1e-10)
        assert result.iterations == 80  # no early stop: many directions are rounding error
        S = result.directions / result.directions.norm(dim=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NumericalWarning)
            projection = project(DenseActions(S.float()), kfn, X, y, noise)
        elbo = float(projection.elbo(kfn.diag(X)))
        X64, y64, kernel64 = _sine_1d()
        kfn64 = KernelFn(kernel64)
        reference = float(project(DenseActions(S[:, :30]), kfn64, X64, y64, noise).elbo(kfn64.diag(X64)))
    assert projection.num_actions < 60
    assert elbo == pytest.approx(reference, rel=1e-4)


def test_float32_pseudo_inputs_match_float64_with_nonnegative_computational_variance():
    """Nearby inducing points give near-dependent actions; float32 used to over-estimate the ELBO
    and give negative computational variance. Both dtypes now agree with the ELBO of the same span in
    an orthonormal basis (which float64 with the raw columns also missed: cond(G) ~ 1e13)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(400, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * X[:, 0]) * X[:, 1] + 0.1 * torch.randn(400, generator=gen, dtype=torch.float64)
    Z = X[:32].clone()
    elbos = {}
    for dtype in (torch.float64, torch.float32):
        pyro.clear_param_store()
        kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=3)).to(dtype)
        kernel.base_kernel.lengthscale = torch.tensor([[0.3, 0.5, 1.0]], dtype=dtype)
        elbos[dtype], post = _elbo_and_split(X.to(dtype), y.to(dtype), kernel, PseudoInputPolicy(Z), 0.01)
        assert post.computational.min() > -1e-6
    kfn = KernelFn(kernel.double())
    noise = torch.tensor(0.01, dtype=torch.float64)
    U = torch.linalg.svd(kfn(X, Z).detach(), full_matrices=False)[0]  # the same span, orthonormal
    reference = float(project(DenseActions(U), kfn, X, y, noise).elbo(kfn.diag(X)))
    assert elbos[torch.float64] == pytest.approx(reference, rel=1e-6)
    assert elbos[torch.float32] == pytest.approx(reference, rel=1e-4)
    assert reference <= float(exact_log_marginal_likelihood(kfn, X, y, noise))


def test_cholesky_failure_reaches_svi_and_names_the_jitter(float64):
    problem = make_problem(n=20)

    def indefinite(X1, X2):
        return -torch.exp(-(torch.cdist(X1, X2) ** 2))

    gp = ComputationAwareGP(problem.X, problem.y, indefinite, policy=UnitVectorPolicy(), noise=0.05)
    svi = SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    with pytest.raises(CholeskyError, match=r"input is not positive-definite even with jitter \[.*e-0"):
        svi.step()


def test_nan_lengthscale_with_cg_names_the_hyperparameters(float64):
    problem = make_problem(n=30)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=CGPolicy(10), noise=0.05)
    with torch.no_grad():
        problem.kernel.base_kernel.raw_lengthscale.fill_(float("nan"))
    svi = SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    with pytest.raises(NonFiniteError, match="NaN or inf; check the hyperparameters"):
        svi.step()


class _IndefiniteAboveHalf(pyro.contrib.gp.kernels.RBF):
    """An RBF kernel that turns indefinite for lengthscales above 0.45 (a numerically failing region
    inside the posterior's bulk)."""

    def forward(self, X, Z=None, diag=False):
        K = super().forward(X, Z, diag)
        return -K if self.lengthscale > 0.45 else K


def test_nuts_rejects_proposals_whose_cholesky_fails(float64):
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(15, 1, generator=gen)
    y = torch.sin(4 * X[:, 0]) + 0.1 * torch.randn(15, generator=gen)
    kernel = _IndefiniteAboveHalf(1)
    kernel.lengthscale = PyroSample(dist.LogNormal(torch.tensor(-1.0), torch.tensor(0.5)))
    gp = ComputationAwareGP(X, y, kernel, policy=UnitVectorPolicy(), noise=0.01)
    with pytest.raises(CholeskyError):  # the failing region, as SVI would see it
        with pyro.poutine.condition(data={"kernel.lengthscale": torch.tensor(0.6)}):
            gp.marginal().log_prob(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        mcmc = MCMC(NUTS(gp.model, max_tree_depth=3), num_samples=10, warmup_steps=10, disable_progbar=True)
        mcmc.run()
    lengthscale = mcmc.get_samples()["kernel.lengthscale"]
    assert lengthscale.shape == (10,) and (lengthscale <= 0.45).all()
    assert mcmc.diagnostics()["divergences"]["chain 0"]  # the failed proposals, rejected


def test_jitter_warns(float64):
    problem = make_problem(n=20)
    X = torch.cat([problem.X, problem.X[:1]])  # a repeated input, no noise: K + 0 I is singular
    gp = ComputationAwareGP(X, torch.cat([problem.y, problem.y[:1]]), problem.kernel, UnitVectorPolicy(),
                            noise=1e-30, jitter=0.0)  # fmt: skip
    with pytest.warns(NumericalWarning, match="added jitter"):
        assert torch.isfinite(gp.marginal().log_prob(gp.y))


def test_a_prior_shared_by_two_hyperparameters_gives_two_sites(float64):
    problem = make_problem(n=30)
    prior = LogNormalPrior(torch.tensor(-1.0), torch.tensor(0.5))
    kernel = (
        gpytorch.kernels.RBFKernel(lengthscale_prior=prior)
        + gpytorch.kernels.MaternKernel(nu=1.5, lengthscale_prior=prior)
    ).double()
    gp = ComputationAwareGP(problem.X, problem.y, kernel, policy=UnitVectorPolicy(), noise=0.05)
    sites = [name for name, site in pyro.poutine.trace(gp.model).get_trace().nodes.items() if site["type"] == "sample"]
    assert sites == ["kernels.0.lengthscale_prior", "kernels.1.lengthscale_prior", "y"]

    def log_lik(first, second):
        data = {sites[0]: torch.tensor([[first]]), sites[1]: torch.tensor([[second]])}
        trace = pyro.poutine.trace(pyro.poutine.condition(gp.model, data)).get_trace()
        return float(trace.nodes["y"]["fn"].log_prob(problem.y))

    assert abs(log_lik(0.3, 0.1) - log_lik(0.3, 1.0)) > 1.0
    assert abs(log_lik(0.1, 0.3) - log_lik(1.0, 0.3)) > 1.0


def test_two_models_with_gpytorch_priors_in_one_pyro_model_keep_their_sites_apart(float64):
    problem = make_problem(n=30)

    class Two(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            for name in ("first", "second"):
                kernel = gpytorch.kernels.RBFKernel(lengthscale_prior=LogNormalPrior(-1.0, 0.5)).double()
                setattr(self, name, ComputationAwareGP(problem.X, problem.y, kernel, policy=UnitVectorPolicy()))

        def forward(self):
            self.first.model()
            self.second.model()

    trace = pyro.poutine.trace(Two()).get_trace()  # was: "Multiple sample sites named 'lengthscale_prior'"
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    assert sites == ["first.lengthscale_prior", "first.y", "second.lengthscale_prior", "second.y"]


def test_predictions_with_gpytorch_priors_use_the_stored_values(float64):
    problem = make_problem(n=40)
    kernel = gpytorch.kernels.RBFKernel(ard_num_dims=2, lengthscale_prior=LogNormalPrior(-1.0, 1.0)).double()
    kernel.lengthscale = torch.tensor([[0.3, 0.5]])
    gp = ComputationAwareGP(problem.X, problem.y, kernel, policy=UnitVectorPolicy(), noise=0.05)
    first, second = gp(problem.X_new), gp(problem.X_new)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    plain = gpytorch.kernels.RBFKernel(ard_num_dims=2).double()
    plain.lengthscale = torch.tensor([[0.3, 0.5]])
    pyro.clear_param_store()
    reference = ComputationAwareGP(problem.X, problem.y, plain, policy=UnitVectorPolicy(), noise=0.05)(problem.X_new)
    torch.testing.assert_close(first, reference)
    with pyro.poutine.condition(data={"lengthscale_prior": torch.tensor([[0.1, 0.1]])}):
        conditioned = gp(problem.X_new)  # a draw of the latent hyperparameters, when given
    assert (conditioned[0] - first[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_rejected_naming_the_argument(dtype):
    problem = make_problem(n=20)
    with pytest.raises(TypeError, match=f"X has dtype {dtype}; computation-aware GPs need float32 or float64"):
        ComputationAwareGP(problem.X.to(dtype), problem.y, problem.kernel)
    with pytest.raises(TypeError, match=f"y has dtype {dtype}"):
        ComputationAwareGP(problem.X, problem.y.to(dtype), problem.kernel)


def test_bad_policy_and_noise_arguments_raise(float64):
    problem = make_problem(n=20)
    X, y, k = problem.X, problem.y, problem.kernel
    with pytest.raises(ValueError, match="inducing_points contains NaN"):
        PseudoInputPolicy(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="inducing_points have 3 features; X has 2"):
        ComputationAwareGP(X, y, k, policy=PseudoInputPolicy(torch.rand(4, 3)))
    with pytest.raises(ValueError, match="tol must be"):
        CGPolicy(5, tol=-1.0)
    with pytest.raises(ValueError, match="preconditioner_rank must be a positive integer"):
        CGPolicy(5, preconditioner_rank=0)
    with pytest.raises(ValueError, match=r"noise must be a scalar variance .* shape \(2,\)"):
        ComputationAwareGP(X, y, k, noise=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="policy must be a Policy"):
        ComputationAwareGP(X, y, k, policy="cg")
    for jitter in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="jitter must be a finite number >= 0"):
            ComputationAwareGP(X, y, k, jitter=jitter)
    with pytest.raises(ValueError, match="num_actions must be an integer"):
        ComputationAwareGP(X, y, k, policy=UnitVectorPolicy(2.5)).marginal()


def test_cg_with_zero_residual_gives_the_prior(float64):
    problem = make_problem(n=30)
    gp = ComputationAwareGP(problem.X, torch.zeros(30), problem.kernel, policy=CGPolicy(10), noise=0.05, jitter=0.0)
    elbo = float(gp.marginal().log_prob(gp.y))
    trace_K = float(problem.kernel(problem.X, diag=True).sum())
    assert elbo == pytest.approx(-0.5 * (30 * math.log(2 * math.pi * 0.05) + trace_K / 0.05), rel=1e-10)
    mean, var = gp(problem.X_new)
    assert (mean == 0).all()
    torch.testing.assert_close(var, problem.kernel(problem.X_new, diag=True).detach())


def test_default_policy_follows_set_data_to_fewer_points(float64):
    big, small = make_problem(n=300), make_problem(n=40, seed=1)
    gp = ComputationAwareGP(big.X, big.y, big.kernel, noise=0.05, jitter=0.0)
    assert gp.policy.num_actions == 256
    gp.set_data(small.X, small.y)
    assert gp.policy.num_actions == 40  # one point per block: the exact GP
    exact = exact_log_marginal_likelihood(KernelFn(big.kernel), small.X, small.y, torch.tensor(0.05))
    assert float(gp.marginal().log_prob(small.y)) == pytest.approx(float(exact), rel=1e-9)
    with pytest.raises(ValueError, match=r"num_actions \(30\) exceeds"):  # an explicit policy is kept
        ComputationAwareGP(big.X, big.y, big.kernel, policy=CGPolicy(30)).set_data(small.X[:20], small.y[:20])


def test_block_entries_of_another_model_in_the_param_store(float64):
    first, second = make_problem(n=80), make_problem(n=70, seed=1)
    ComputationAwareGP(first.X, first.y, first.kernel, policy=BlockSparsePolicy(10)).marginal()
    other = ComputationAwareGP(second.X, second.y, second.kernel, policy=BlockSparsePolicy(10))
    with pytest.raises(ValueError, match=r"'policy.blocks' with shape \(10, 8\).*pyro.clear_param_store\(\)"):
        other.marginal()
    same_shape = ComputationAwareGP(first.X, first.y, second.kernel, policy=BlockSparsePolicy(10))
    with pytest.warns(UserWarning, match="already holds 'policy.blocks'"):
        same_shape.marginal()
    pyro.clear_param_store()
    gp = ComputationAwareGP(first.X, first.y, first.kernel, policy=BlockSparsePolicy(10))
    gp.marginal()
    gp.set_data(second.X, second.y)  # the model's own blocks are re-initialised for the new partition
    assert gp.marginal().actions.blocks.shape == (10, 7)


def test_exact_objective_predicts_with_the_exact_posterior_by_default(float64):
    problem = make_problem(n=300)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, noise=problem.noise, objective="exact", jitter=0.0)
    assert isinstance(gp.policy, UnitVectorPolicy)  # not the untrained default blocks
    mean, var = gp(problem.X_new)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, ref_cov.diagonal(), rtol=1e-8, atol=1e-10)


def test_pivot_actions_that_span_every_point_are_made_independent(float64):
    problem = make_problem(n=50)  # the preconditioner's rank (100) exceeds n: every point is a pivot
    policy = CGPolicy(10, preconditioner="pivoted", pivot_actions=True)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=policy, noise=problem.noise, jitter=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # no jitter: the actions are independent
        elbo = float(gp.marginal().log_prob(problem.y))
        mean, var = gp(problem.X_new)
    assert elbo == pytest.approx(float(problem.gpytorch_log_marginal()), rel=1e-9)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(var, ref_cov.diagonal(), rtol=1e-6, atol=1e-8)


def test_target_initialised_blocks_on_zero_targets_start_constant(float64):
    X = torch.linspace(0, 1, 40)[:, None]
    y = torch.where(X[:, 0] < 0.5, 0.0, torch.sin(6 * X[:, 0]))  # exactly zero on the blocks left of 0.5
    gp = ComputationAwareGP(X, y, _sine_1d()[2].double(), policy=BlockSparsePolicy(8, init="targets"), noise=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        assert math.isfinite(float(gp.marginal().log_prob(y)))


def test_new_inputs_of_another_dtype_and_float32_noiseless_predictive(float64):
    problem = make_problem(n=40)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=CGPolicy(10), noise=problem.noise)
    mean64, _ = gp(problem.X_new)
    mean32, _ = gp(problem.X_new.float())  # cast to the model's dtype, returned in the caller's
    assert mean32.dtype == torch.float32
    torch.testing.assert_close(mean32, mean64.float())
    pyro.clear_param_store()  # the store holds the first model's noise
    X = torch.rand(400, 1, generator=torch.Generator().manual_seed(0)).float()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    kernel.base_kernel.lengthscale = 0.3
    gp32 = ComputationAwareGP(X, torch.sin(6 * X[:, 0]), kernel, policy=UnitVectorPolicy(), noise=1e-6, jitter=0.0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        assert bool((gp32(X[:50])[1] <= 0).any())  # float32 variances at training inputs round to 0
        predictive = gp32.predictive_distribution(X[:50], noiseless=True)
    assert bool((predictive.scale > 0).all())


def test_stalled_cg_with_pivot_actions_keeps_the_exact_limit(float64):
    # tol 0 and a tiny noise: CG runs to max_iter past a stalled residual, and its late directions lose
    # conjugacy; stacked with the pivots they made the Gram matrix singular (mean 4e-4 off the exact GP)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(60, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * X[:, 0]) + 0.05 * torch.randn(60, generator=gen, dtype=torch.float64)
    kernel = gpytorch.kernels.RBFKernel().double()
    kernel.lengthscale = 0.2
    policy = CGPolicy(40, tol=0.0, preconditioner="rpcholesky", preconditioner_rank=10, pivot_actions=True)
    gp = ComputationAwareGP(X, y, kernel, policy=policy, noise=1e-6, jitter=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no jitter added
        with torch.no_grad():
            mean, _ = gp(X)
    K = kernel(X, X).to_dense()
    exact = K @ torch.linalg.solve(K + 1e-6 * torch.eye(60, dtype=torch.float64), y)
    assert policy.last_result.stop_reason == "max_iter"
    torch.testing.assert_close(mean, exact, rtol=0, atol=1e-8)


@pytest.mark.parametrize("objective", ["elbo", "exact"])
def test_nuts_rejects_a_non_finite_kernel_raised_from_log_prob(float64, objective):
    """A NonFiniteError raised while Pyro scores the site reaches the integrator wrapped in a plain ValueError
    (Pyro's trace names the site), which its default handler did not match: the NUTS run aborted. The
    registered handler follows the cause, so the proposal gets a NaN potential, as a failed Cholesky does."""
    from pyro.infer.mcmc.util import initialize_model
    from pyro.ops.integrator import potential_grad

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(20, 1, generator=gen)
    y = torch.sin(4 * X[:, 0]) + 0.1 * torch.randn(20, generator=gen)
    kernel = gpytorch.kernels.RBFKernel(lengthscale_prior=LogNormalPrior(-1.0, 1.0))
    gp = ComputationAwareGP(X, y, kernel, policy=UnitVectorPolicy(), noise=0.01, objective=objective)
    _, potential_fn, _, _ = initialize_model(gp.model, num_chains=1)
    far = {"lengthscale_prior": torch.full((1, 1), -400.0)}  # X / lengthscale overflows
    _, energy = potential_grad(potential_fn, far)
    assert math.isnan(float(energy))
    _, energy = potential_grad(potential_fn, {"lengthscale_prior": torch.full((1, 1), -1.0)})
    assert math.isfinite(float(energy))


def test_a_non_finite_mean_is_named(float64):
    """A mean function that is NaN somewhere gave a NaN log_prob and mean (CG blamed the kernel's
    hyperparameters); NaN targets gave a NaN log_prob."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(20, 1, generator=gen)
    y = torch.sin(4 * X[:, 0])
    for policy in (UnitVectorPolicy(), CGPolicy(5)):
        gp = ComputationAwareGP(X, y, gpytorch.kernels.RBFKernel(), policy=policy, noise=0.01,
                                mean_function=lambda x: torch.log(x[:, 0] - 0.5))  # fmt: skip
        with pytest.raises(NonFiniteError, match="mean function's values contain NaN"):
            gp.marginal().log_prob(y)
    gp = ComputationAwareGP(X, y, gpytorch.kernels.RBFKernel(), policy=UnitVectorPolicy(), noise=0.01)
    with pytest.raises(ValueError, match="y contains NaN"):
        gp.marginal().log_prob(torch.full_like(y, float("nan")))


def test_a_callable_kernel_that_ignores_diag_gets_its_diagonal(float64):
    """A plain callable ``k(X, Z=None, **kwargs)`` swallows ``diag=True`` and returns the whole matrix, which was
    used as the diagonal (ELBO -5670 against the exact 3.93, variances (4, 4))."""

    def kernel(X, Z=None, **kwargs):
        Z = X if Z is None else Z
        return torch.exp(-0.5 * torch.cdist(X / 0.3, Z / 0.3) ** 2)

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(15, 1, generator=gen)
    y = torch.sin(4 * X[:, 0])
    gp = ComputationAwareGP(X, y, kernel, policy=UnitVectorPolicy(), noise=0.01, jitter=0.0)
    exact = exact_log_marginal_likelihood(KernelFn(kernel), X, y, torch.tensor(0.01))
    assert float(gp.marginal().log_prob(y)) == pytest.approx(float(exact), rel=1e-8)
    assert gp(torch.rand(4, 1, generator=gen))[1].shape == (4,)


def test_a_learned_policy_inside_a_users_model_is_trained(float64):
    """ComputationAwareMarginal chose a learned policy's actions in log_prob, outside the policy's Pyro
    context, so its blocks never reached the param store and SVI never moved them."""
    from pyro_gpx.gp import ComputationAwareMarginal

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(60, 1, generator=gen)
    y = torch.sin(8 * X[:, 0]) + 0.1 * torch.randn(60, generator=gen)
    policy = BlockSparsePolicy(6)

    def model():
        ls = pyro.param("ls", torch.tensor(0.2), constraint=dist.constraints.positive)
        kernel = KernelFn(lambda a, b: torch.exp(-0.5 * torch.cdist(a / ls, b / ls) ** 2))
        pyro.sample("y", ComputationAwareMarginal(X, kernel, torch.tensor(0.01), torch.zeros(60), policy), obs=y)

    svi = SVI(model, lambda: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    first = svi.step()
    before = pyro.get_param_store()["blocks"].detach().clone()
    last = [svi.step() for _ in range(30)][-1]
    assert not torch.equal(before, pyro.get_param_store()["blocks"].detach()) and last < first


def test_a_plain_object_with_actions_serves_as_a_policy(float64):
    """Policies are called as modules (for their Pyro context); an object with only ``actions`` still works."""
    from pyro_gpx.gp import ComputationAwareMarginal

    class Plain:
        def actions(self, context):
            return UnitVectorPolicy().actions(context)

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(20, 1, generator=gen)
    y = torch.sin(4 * X[:, 0])
    kernel = KernelFn(gpytorch.kernels.RBFKernel().double())
    plain = ComputationAwareMarginal(X, kernel, torch.tensor(0.01), torch.zeros(20), Plain()).log_prob(y)
    module = ComputationAwareMarginal(X, kernel, torch.tensor(0.01), torch.zeros(20), UnitVectorPolicy()).log_prob(y)
    assert float(plain) == pytest.approx(float(module), rel=1e-12)


def test_gpytorch_mean_priors_are_sample_sites(float64):
    """A GPyTorch mean's prior was dropped (its constant trained as a plain parameter); it is a sample site
    now, as a kernel's are, and predictions use the same draw."""
    from gpytorch.priors import NormalPrior

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(20, 1, generator=gen)
    y = 5 + torch.sin(5 * X[:, 0])
    mean = gpytorch.means.ConstantMean(constant_prior=NormalPrior(0.0, 1.0))
    gp = ComputationAwareGP(X, y, gpytorch.kernels.RBFKernel(), policy=UnitVectorPolicy(), mean_function=mean,
                            noise=0.01)  # fmt: skip
    trace = pyro.poutine.trace(gp.model).get_trace()
    assert "mean_function.mean_prior" in trace.nodes
    site = trace.nodes["mean_function.mean_prior"]
    assert float(site["fn"].log_prob(torch.tensor(0.0))) == pytest.approx(-0.5 * math.log(2 * math.pi))
    with pyro.poutine.condition(data={"mean_function.mean_prior": torch.tensor(100.0)}):
        far = pyro.poutine.trace(gp.model).get_trace()
        moments = gp(torch.tensor([[5.0]]))  # far from the data: the prior mean, the conditioned constant
    assert float(moments[0]) == pytest.approx(100.0, abs=1e-4)
    assert far.log_prob_sum() < trace.log_prob_sum()


def test_settings_refuse_non_finite_values_and_survive_out_of_order_exits():
    from pyro_gpx.gp import settings

    for make, value in ((settings.cg_tolerance, float("nan")), (settings.cholesky_jitter, float("inf")),
                        (settings.cholesky_jitter, float("nan")), (settings.chunk_size, 2.7)):  # fmt: skip
        with pytest.raises(ValueError):
            make(value)  # NaN switched the CG tolerance off; 2.7 became 2
    assert settings.cholesky_jitter((1e-6, 3.0))._value == (1e-6, 3)  # a whole float is a count, as chunk_size's
    with pytest.raises(ValueError):
        settings.cholesky_jitter((1e-6, 2.5))
    outer, inner = settings.chunk_size(100), settings.chunk_size(200)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # out of order: each block removes its own entry
    assert settings.chunk_size.value() == 200
    inner.__exit__(None, None, None)
    assert settings.chunk_size.value() is None
