"""Re-selecting the noise by the CaGP ELBO with the actions fixed (``refit_noise``, ``posterior(refit_noise=True)``)."""

import math

import pytest
import torch

from pyro_gpx.gp import (
    BlockSparsePolicy,
    CGPolicy,
    ComputationAwareGP,
    IndexActions,
    PolicyContext,
    exact_log_marginal_likelihood,
    project,
    refit_noise,
)

from .problems import make_problem


@pytest.fixture
def problem(float64):
    return make_problem(n=80, seed=3, noise=0.05)


def test_complete_actions_give_the_exact_marginal_likelihood_maximiser(problem):
    """With all n unit vectors the ELBO is the exact log marginal likelihood, so the refit noise is
    its maximiser in the noise at the fixed kernel (checked against a dense grid and the stationarity
    of the exact likelihood)."""
    n = len(problem.y)
    start = project(IndexActions(torch.arange(n), n), problem.kfn, problem.X, problem.y, torch.tensor(1.0))
    refitted = refit_noise(start, problem.kfn.diag(problem.X))
    noise = float(refitted.noise)

    def exact(s: float) -> float:
        with torch.no_grad():
            return float(exact_log_marginal_likelihood(problem.kfn, problem.X, problem.y, torch.tensor(s)))

    grid = torch.logspace(-3, 0.5, 176).tolist()
    best = max(grid, key=exact)
    assert noise == pytest.approx(best, rel=0.03)
    assert exact(noise) >= max(exact(noise * 0.98), exact(noise * 1.02))
    torch.testing.assert_close(refitted.elbo(problem.kfn.diag(problem.X)), torch.tensor(exact(noise)))


def test_refit_never_lowers_the_elbo_and_maximises_it_locally(problem):
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(6), noise=0.5, jitter=0.0)
    marginal = gp.marginal(sample_priors=False)
    diag_K = marginal.kernel.diag(problem.X)
    before = marginal.project(problem.y)
    after = refit_noise(before, diag_K)
    assert float(after.elbo(diag_K)) > float(before.elbo(diag_K))
    for factor in (0.97, 1.03):
        nearby = project(after.actions, marginal.kernel, problem.X, problem.y, after.noise * factor)
        assert float(nearby.elbo(diag_K)) <= float(after.elbo(diag_K)) + 1e-9
    # a projection already at the optimum comes back unchanged
    again = refit_noise(after, diag_K)
    assert again is after or math.isclose(float(again.noise), float(after.noise), rel_tol=2e-3)


def test_refined_posterior_selects_a_smaller_noise_and_reports_it(problem):
    """Four learned actions explain little of the data, so the ELBO trained with them would put the
    rest into the noise; appending CG actions explains more, and the refit noise falls. The predictive
    adds the noise the posterior conditioned on."""
    gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=BlockSparsePolicy(4), noise=0.3, jitter=0.0)
    refine = CGPolicy(30, tol=1e-8)
    kept = gp.posterior(problem.X_new, refine=refine)
    refit = gp.posterior(problem.X_new, refine=refine, refit_noise=True)
    assert float(kept.noise) == pytest.approx(0.3)
    assert float(refit.noise) < 0.3
    projection = gp.refined_projection(refine, refit_noise=True)
    torch.testing.assert_close(projection.noise, refit.noise)
    mean, var = gp(problem.X_new, noiseless=False, refine=refine, refit_noise=True)
    torch.testing.assert_close(var.double(), refit.covariance + refit.noise)
    torch.testing.assert_close(mean.double(), refit.mean)
    assert float(gp.noise) == pytest.approx(0.3)  # the model's parameter is not changed


def test_refit_noise_rejects_bad_arguments(problem):
    context = PolicyContext(problem.X, problem.y, problem.kfn, problem.noise)
    start = project(BlockSparsePolicy(4).actions(context), problem.kfn, problem.X, problem.y, problem.noise)
    with pytest.raises(ValueError, match="bounds"):
        refit_noise(start, problem.kfn.diag(problem.X), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="rtol"):
        refit_noise(start, problem.kfn.diag(problem.X), rtol=0.0)
