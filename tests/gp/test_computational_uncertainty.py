"""CG actions: error shrinks to zero with more actions; the uncertainty split behaves as theory says."""

import time

import numpy as np
import pytest
import torch

from pyro_gpx.gp import (
    CGPolicy,
    ComputationAwareGP,
    PolicyContext,
    conjugate_gradients,
    exact_log_marginal_likelihood,
    project,
)

from .problems import make_problem


@pytest.fixture
def problem(float64):
    return make_problem(n=80, seed=1)


def _gp(problem, num_actions, **kwargs):
    policy = CGPolicy(num_actions, tol=1e-14, **kwargs)
    return ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=policy, noise=problem.noise, jitter=0.0)


def test_cg_error_decreases_to_zero(problem):
    ref_mean, ref_cov = problem.dense_posterior()
    mean_err, var_gap = [], []
    for i in (2, 5, 10, 20, 40, 80):
        post = _gp(problem, i).posterior(problem.X_new, split=True)
        mean_err.append(float((post.mean - ref_mean).norm() / ref_mean.norm()))
        var_gap.append(float(post.computational.max()))
    # "monotonically-ish": each step at most slightly worse, overall a large reduction
    assert all(b <= a * 1.5 + 1e-12 for a, b in zip(mean_err, mean_err[1:]))
    assert mean_err[-1] < 1e-8 and mean_err[0] > 1e-3
    # the computational variance never grows and falls by orders of magnitude; CG stops once its
    # Krylov space is exhausted (here after ~25 directions), leaving ~1e-5 of the prior variance 1.3
    assert all(b <= a + 1e-12 for a, b in zip(var_gap, var_gap[1:]))
    assert var_gap[-1] < 1e-4 and var_gap[-1] < 1e-2 * var_gap[0]


def test_computational_variance_vanishes_for_complete_unit_vectors(problem):
    from pyro_gpx.gp import UnitVectorPolicy

    gaps = []
    for i in (10, 40, 79, 80):
        gp = ComputationAwareGP(problem.X, problem.y, problem.kernel, policy=UnitVectorPolicy(i), noise=problem.noise,
                                jitter=0.0)  # fmt: skip
        post = gp.posterior(problem.X_new, split=True)
        assert (post.computational >= -1e-12).all()
        gaps.append(float(post.computational.max()))
    assert gaps[-1] < 1e-12 and gaps[0] > 1e-3


def test_split_of_uncertainty(problem):
    post = _gp(problem, 6).posterior(problem.X_new, split=True, full_cov=True)
    ref_mean, ref_cov = problem.dense_posterior()
    torch.testing.assert_close(post.mathematical, ref_cov, rtol=1e-8, atol=1e-10)
    # computational covariance is positive semi-definite: combined >= mathematical
    eig = torch.linalg.eigvalsh(post.computational)
    assert eig.min() > -1e-10
    assert (post.covariance.diagonal() >= post.mathematical.diagonal() - 1e-12).all()
    assert post.computational.diagonal().max() > 1e-4  # 6 actions leave real uncertainty


def test_elbo_is_a_lower_bound_tight_for_complete_actions(problem):
    kfn = problem.kfn
    exact = float(exact_log_marginal_likelihood(kfn, problem.X, problem.y, problem.noise))
    elbos = []
    for i in (1, 3, 10, 30, 80):
        policy = CGPolicy(i, tol=1e-14)
        ctx = PolicyContext(problem.X, problem.y, kfn, problem.noise)
        elbos.append(
            float(project(policy.actions(ctx), kfn, problem.X, problem.y, problem.noise).elbo(kfn.diag(problem.X)))
        )
    assert all(e <= exact + 1e-9 for e in elbos)
    assert np.all(np.diff(elbos) >= -1e-9)  # Krylov spaces are nested: the bound tightens
    assert elbos[-1] == pytest.approx(exact, rel=1e-3)  # CG's Krylov space is exhausted before n actions


@pytest.mark.parametrize("preconditioner, block", [(None, 1), ("pivoted", 1), ("rpcholesky", 1), ("rpcholesky", 5)])
def test_cg_policy_residuals_and_preconditioning(problem, preconditioner, block):
    policy = CGPolicy(80, tol=1e-10, preconditioner=preconditioner, preconditioner_rank=15,
                      preconditioner_block_size=block)  # fmt: skip
    ctx = PolicyContext(problem.X, problem.y, problem.kfn, problem.noise)
    result = policy.solve(ctx)
    K = problem.kernel(problem.X, problem.X).to_dense() + problem.noise * torch.eye(80)
    torch.testing.assert_close(result.solution, torch.linalg.solve(K, problem.y), rtol=1e-7, atol=1e-9)
    # directions are K-hat conjugate
    gram = result.directions.T @ K @ result.directions
    off = gram - torch.diag(gram.diagonal())
    assert off.abs().max() < 1e-8 * gram.diagonal().max()


def test_cg_time_limit_stops_early_with_valid_directions(problem):
    """``max_seconds`` stops after the iteration that crosses it; the directions found are the
    first iterations of the unlimited run (same Krylov space), and at least one always runs."""
    K = problem.kernel(problem.X, problem.X).to_dense() + problem.noise * torch.eye(80)

    def slow_matvec(v):  # every iteration takes >= 20 ms, so a 50 ms limit allows at most 3
        time.sleep(0.02)
        return K @ v

    limited = conjugate_gradients(slow_matvec, problem.y, 80, tol=1e-14, max_seconds=0.05)
    full = conjugate_gradients(lambda v: K @ v, problem.y, 80, tol=1e-14)
    assert limited.stop_reason == "max_seconds"
    assert 1 <= limited.iterations <= 3
    j = limited.iterations
    torch.testing.assert_close(limited.directions, full.directions[:, :j], rtol=1e-8, atol=1e-10)
    assert limited.residual_norms == pytest.approx(full.residual_norms[:j], rel=1e-8)
    one = conjugate_gradients(slow_matvec, problem.y, 80, tol=1e-14, max_seconds=1e-9)
    assert one.iterations == 1 and one.stop_reason == "max_seconds"
    policy = CGPolicy(80, tol=1e-14, max_seconds=1e-9)
    assert policy.solve(PolicyContext(problem.X, problem.y, problem.kfn, problem.noise)).iterations == 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_seconds"):
            conjugate_gradients(slow_matvec, problem.y, 5, max_seconds=bad)
        with pytest.raises(ValueError, match="max_seconds"):
            CGPolicy(5, max_seconds=bad)
