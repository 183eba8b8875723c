"""Kernel combinations, AutoNormal, full predictive covariance, state_dict of learned pseudo-inputs,
the predictive distribution: against dense references (float64)."""

import gpytorch
import pyro
import pyro.contrib.gp as cgp
import pyro.distributions as dist
import pytest
import torch
from gpytorch.priors import LogNormalPrior
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroSample

from pyro_gpx.gp import CGPolicy, ComputationAwareGP, PseudoInputPolicy, UnitVectorPolicy

from .problems import make_problem


def _dense_log_marginal(K, y, noise):
    cov = K + noise * torch.eye(len(y))
    return float(dist.MultivariateNormal(torch.zeros(len(y)), covariance_matrix=cov).log_prob(y))


def _contrib_rbf():
    return cgp.kernels.RBF(2, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.3, 0.5]))


def _kernels():
    linear = gpytorch.kernels.ScaleKernel(gpytorch.kernels.LinearKernel())
    linear.outputscale = 0.2
    rbf = gpytorch.kernels.RBFKernel(ard_num_dims=2)
    rbf.lengthscale = torch.tensor([[0.3, 0.5]])
    periodic = gpytorch.kernels.PeriodicKernel()
    periodic.period_length = 0.7
    return {
        "contrib sum": (cgp.kernels.Sum(_contrib_rbf(), cgp.kernels.Linear(2, variance=torch.tensor(0.2))), None),
        "contrib product": (
            cgp.kernels.Product(_contrib_rbf(), cgp.kernels.Periodic(2, period=torch.tensor(0.7))),
            None,
        ),
        "gpytorch product": (gpytorch.kernels.ScaleKernel(rbf * periodic).double(), "gpytorch"),
        "gpytorch sum of products": ((rbf * periodic + linear).double(), "gpytorch"),
    }


@pytest.mark.parametrize("name", list(_kernels()))
def test_kernel_combinations_give_the_exact_likelihood_and_posterior(float64, name):
    problem = make_problem(n=40)
    kernel, kind = _kernels()[name]  # a fresh copy: a PyroModule kernel may not run outside the GP once in it
    with torch.no_grad():
        K = kernel(problem.X, problem.X)
        K = (K.to_dense() if kind else K).detach()
        K_new = kernel(problem.X_new, problem.X)
        K_new = (K_new.to_dense() if kind else K_new).detach()
    noise = 0.05
    gp = ComputationAwareGP(problem.X, problem.y, _kernels()[name][0], UnitVectorPolicy(), noise=noise, jitter=0.0)
    with torch.no_grad():
        elbo = float(gp.marginal().log_prob(problem.y))
        mean, _ = gp(problem.X_new)
    assert elbo == pytest.approx(_dense_log_marginal(K, problem.y, noise), rel=1e-9)
    ref_mean = K_new @ torch.linalg.solve(K + noise * torch.eye(40), problem.y)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-9)


def test_autonormal_over_gpytorch_and_contrib_hyperparameters(float64):
    problem = make_problem(n=40)
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=2, lengthscale_prior=LogNormalPrior(-1.0, 1.0)),
        outputscale_prior=LogNormalPrior(0.0, 1.0),
    ).double()
    gp = ComputationAwareGP(problem.X, problem.y, kernel, policy=UnitVectorPolicy(20), noise=0.1)
    gp.noise = PyroSample(dist.LogNormal(torch.tensor(-3.0), 1.0))
    contrib = cgp.kernels.Matern32(2)
    contrib.lengthscale = PyroSample(dist.LogNormal(torch.tensor(-1.0), 0.5).expand([2]).to_event(1))
    gp2 = ComputationAwareGP(problem.X, problem.y, contrib, policy=CGPolicy(10), noise=0.1)
    for model, sites in [
        (gp, {"outputscale_prior", "base_kernel.lengthscale_prior", "noise"}),
        (gp2, {"kernel.lengthscale"}),
    ]:
        pyro.clear_param_store()
        guide = AutoNormal(model.model)
        svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        losses = [svi.step() for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert set(guide.median()) == sites


def test_full_predictive_covariance_with_noise_is_the_dense_gp(float64):
    problem = make_problem(n=50)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=UnitVectorPolicy(), noise=0.05, jitter=0.0)
    with torch.no_grad():
        mean, cov = gp(problem.X_new, full_cov=True, noiseless=False)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(mean, ref_mean.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cov, ref_cov.detach() + 0.05 * torch.eye(7), rtol=1e-8, atol=1e-10)


def test_predictive_distribution_with_and_without_noise(float64):
    problem = make_problem(n=50)
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=UnitVectorPolicy(), noise=0.05, jitter=0.0)
    ref_mean, ref_cov = (t.detach() for t in problem.dense_posterior())
    with torch.no_grad():
        marginal = gp.predictive_distribution(problem.X_new)
        latent = gp.predictive_distribution(problem.X_new, full_cov=True, noiseless=True)
    assert isinstance(marginal, dist.Normal) and marginal.batch_shape == (7,)
    torch.testing.assert_close(marginal.mean, ref_mean)
    torch.testing.assert_close(marginal.variance, ref_cov.diagonal() + 0.05)
    assert isinstance(latent, dist.MultivariateNormal) and latent.event_shape == (7,)
    torch.testing.assert_close(latent.covariance_matrix, ref_cov, rtol=1e-6, atol=1e-9)


def test_learned_pseudo_inputs_round_trip_through_state_dict(float64):
    problem = make_problem(n=50)

    def build():
        Z = problem.X[:6].clone()
        return ComputationAwareGP(
            problem.X, problem.y, make_problem().kernel, PseudoInputPolicy(Z, learn=True), noise=0.1
        )

    gp = build()
    svi = SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step()
    state = gp.state_dict()
    assert not torch.equal(state["policy.inducing_points_unconstrained"], problem.X[:6])  # learned
    with torch.no_grad():
        mean, var = gp(problem.X_new)
    pyro.clear_param_store()
    restored = build()
    restored.load_state_dict(state)
    with torch.no_grad():
        mean2, var2 = restored(problem.X_new)
    torch.testing.assert_close(mean2, mean, rtol=0, atol=0)
    torch.testing.assert_close(var2, var, rtol=0, atol=0)
