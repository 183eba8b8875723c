"""Complete actions reproduce the exact GP (dense Cholesky and GPyTorch) to ~1e-8 relative."""

import gpytorch
import pyro
import pyro.contrib.gp as contrib_gp
import pytest
import torch

from pyro_gpx.gp import (
    BlockSparsePolicy,
    ComputationAwareGP,
    PolicyContext,
    RandomSketchPolicy,
    UnitVectorPolicy,
    exact_log_marginal_likelihood,
    posterior_moments,
    project,
)

from .problems import make_problem

COMPLETE = [UnitVectorPolicy(), BlockSparsePolicy(60), RandomSketchPolicy(60)]


@pytest.fixture
def problem(float64):
    return make_problem()


def test_dense_reference_matches_gpytorch(problem):
    ours = exact_log_marginal_likelihood(problem.kfn, problem.X, problem.y, problem.noise)
    assert float(ours) == pytest.approx(float(problem.gpytorch_log_marginal()), rel=1e-10)


@pytest.mark.parametrize("policy", COMPLETE, ids=lambda p: type(p).__name__)
def test_complete_actions_equal_exact_gp(problem, policy):
    kfn = problem.kfn
    projection = project(policy.actions(PolicyContext(problem.X, problem.y, kfn, problem.noise)), kfn,
                         problem.X, problem.y, problem.noise)  # fmt: skip
    exact = float(problem.gpytorch_log_marginal())
    rel = 1e-6 if isinstance(policy, RandomSketchPolicy) else 1e-9  # a random sketch is ill-conditioned
    assert float(projection.elbo(kfn.diag(problem.X))) == pytest.approx(exact, rel=rel)
    assert float(projection.projected_log_likelihood()) == pytest.approx(exact, rel=rel)
    mean, cov = posterior_moments(projection, kfn, problem.X, problem.X_new, torch.zeros(7), full_cov=True)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8 if rel < 1e-6 else 1e-5, atol=1e-8)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-8 if rel < 1e-6 else 1e-5, atol=1e-8)


@pytest.mark.parametrize("objective", ["elbo", "projected", "exact"])
def test_model_log_prob_and_forward(problem, objective):
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=UnitVectorPolicy(),
                            noise=problem.noise, objective=objective, jitter=0.0)  # fmt: skip
    log_prob = gp.marginal().log_prob(problem.y)
    assert float(log_prob) == pytest.approx(float(problem.gpytorch_log_marginal()), rel=1e-9)
    mean, var = gp(problem.X_new)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, ref_cov.diagonal(), rtol=1e-8, atol=1e-10)
    _, var_noisy = gp(problem.X_new, noiseless=False)
    torch.testing.assert_close(var_noisy - var, problem.noise.expand(7))


def test_pyro_contrib_kernel_equals_gpytorch_kernel(problem):
    rbf = contrib_gp.kernels.RBF(input_dim=2, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.3, 0.5]))
    ours = ComputationAwareGP(problem.X, problem.y, rbf, policy=UnitVectorPolicy(), noise=problem.noise, jitter=0.0)
    ref = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=UnitVectorPolicy(), noise=problem.noise,
                             jitter=0.0)  # fmt: skip
    assert float(ours.marginal().log_prob(problem.y)) == pytest.approx(float(ref.marginal().log_prob(problem.y)),
                                                                       rel=1e-10)  # fmt: skip
    torch.testing.assert_close(ours(problem.X_new)[0], ref(problem.X_new)[0])


@pytest.mark.parametrize("noise", [1e-6, 1e-7, 1e-8])
def test_the_elbo_stays_a_lower_bound_at_small_noise(noise):
    """tr(G^-1 S^T K K S) by a solve against the formed S^T K K S squared G's conditioning: at noise 1e-7
    the bound was 21 nats above log p(y) with 150 block actions and 74 with 150 unit vectors, 3 with all n."""
    n = 300
    X = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel.base_kernel.lengthscale, kernel.outputscale = 0.1, 1.5
    with torch.no_grad():
        K_hat = kernel(X, X).to_dense() + noise * torch.eye(n, dtype=torch.float64)
    y = torch.linalg.cholesky(K_hat) @ torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), K_hat).log_prob(y))
    for policy, complete in (
        (BlockSparsePolicy(150), False),
        (UnitVectorPolicy(150), False),
        (UnitVectorPolicy(), True),
    ):
        pyro.clear_param_store()
        gp = ComputationAwareGP(X, y, kernel, policy=policy, noise=noise, jitter=0.0)
        with torch.no_grad():
            elbo = float(gp.marginal().log_prob(y))
        if complete:  # the exact log marginal likelihood
            assert elbo == pytest.approx(exact, abs=1e-3)
        else:
            assert elbo < exact
