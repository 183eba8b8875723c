"""Re-selecting the outputscale and noise by the exact log marginal likelihood (``refit_mll``)."""

import math

import gpytorch
import pytest
import torch

from pyro_gpx.gp import BlockSparsePolicy, CGPolicy, ComputationAwareGP, KernelFn, partial_cholesky
from pyro_gpx.gp.mll_refit import MLLRefit, refit_outputscale_noise, subset_refit_outputscale_noise


@pytest.fixture
def data(float64):
    """400 points from a GP with outputscale 5 and noise 0.05; the kernel is given outputscale 1."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    X = torch.rand(n, 2, generator=gen)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=2))
    kernel.base_kernel.lengthscale = torch.tensor([[0.3, 0.6]])
    kernel.outputscale = 1.0
    with torch.no_grad():
        K = kernel(X, X).to_dense()
        cov = 5.0 * K + 0.05 * torch.eye(n)
        y = torch.linalg.cholesky(cov) @ torch.randn(n, generator=gen)
    return X, y, kernel, K


def _dense_maximiser(K, y):
    """(multiplier, noise) maximising log N(y; 0, a K + s I) by a fine grid over tau = s / a."""
    evals, evecs = torch.linalg.eigh(K)
    rho, n = evecs.T @ y, len(y)

    def profile(tau):
        a = float((rho**2 / (evals + tau)).sum()) / n
        return -0.5 * (n * math.log(a) + float(torch.log(evals + tau).sum())), a

    taus = torch.logspace(-5, 1, 3001).tolist()
    tau = max(taus, key=lambda t: profile(t)[0])
    a = profile(tau)[1]
    return a, a * tau


def _log_likelihood(K, y, a, noise):
    cov = a * K + noise * torch.eye(len(y))
    return float(torch.distributions.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y))


def test_subset_refit_with_all_points_is_the_dense_maximiser(data):
    X, y, kernel, K = data
    fit = subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y))
    a, noise = _dense_maximiser(K, y)
    assert fit.multiplier == pytest.approx(a, rel=0.01)
    assert fit.noise == pytest.approx(noise, rel=0.01)
    # a stationary point of the exact likelihood in both directions
    best = _log_likelihood(K, y, fit.multiplier, fit.noise)
    for da, dn in ((1.03, 1), (0.97, 1), (1, 1.03), (1, 0.97)):
        assert _log_likelihood(K, y, fit.multiplier * da, fit.noise * dn) <= best + 1e-6


def test_stochastic_refit_matches_the_dense_maximiser(data):
    """Block PCG + Hutchinson with the preconditioner as control variate: within a few percent of the
    dense answer, from a start far on either side."""
    X, y, kernel, K = data
    a, noise = _dense_maximiser(K, y)
    L, _ = partial_cholesky(KernelFn(kernel), X, 60, pivoting="rpcholesky", generator=torch.Generator().manual_seed(0))
    for start in (1.0, 1e-3):
        fit = refit_outputscale_noise(lambda V: K @ V, y, L, noise=start, generator=torch.Generator().manual_seed(1))
        assert fit.converged
        assert fit.multiplier == pytest.approx(a, rel=0.05)
        assert fit.noise == pytest.approx(noise, rel=0.05)
        assert fit.products > 0


def test_subset_estimate_is_consistent(data):
    """Subsets of half the points land near the full-data maximiser (same kernel shape)."""
    X, y, kernel, K = data
    a, noise = _dense_maximiser(K, y)
    fit = subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=0.3, num_points=200, num_subsets=4,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert fit.multiplier == pytest.approx(a, rel=0.3)
    assert fit.noise == pytest.approx(noise, rel=0.3)


def test_posterior_with_refit_mll_is_the_exact_gp_at_the_selected_hyperparameters(data):
    """CaGP-Opt actions + CG refinement to convergence at the re-selected (a, noise) give the dense exact
    posterior mean of a K + noise I, and a variance no smaller than its (the CG directions solve for
    the mean, not for every test point); the model's own parameters are not changed."""
    X, y, kernel, K = data
    X_new = torch.rand(9, 2, generator=torch.Generator().manual_seed(5))
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(8), noise=0.4, jitter=0.0)
    post = gp.posterior(X_new, refine=CGPolicy(400, tol=1e-10), refit_mll="subset")
    fit = gp.last_mll_refit
    a, noise = _dense_maximiser(K, y)
    assert fit.multiplier == pytest.approx(a, rel=0.01) and fit.noise == pytest.approx(noise, rel=0.01)
    with torch.no_grad():
        Kx = fit.multiplier * kernel(X_new, X).to_dense()
        chol = torch.linalg.cholesky(fit.multiplier * K + fit.noise * torch.eye(len(y)))
        mean = Kx @ torch.cholesky_solve(y[:, None], chol)[:, 0]
        V = torch.linalg.solve_triangular(chol, Kx.T, upper=False)
        var = fit.multiplier * kernel(X_new, diag=True) - (V**2).sum(0)
    torch.testing.assert_close(post.mean, mean, rtol=1e-5, atol=1e-6)
    assert bool((post.covariance >= var - 1e-8).all())
    assert float(post.noise) == pytest.approx(fit.noise)
    assert float(gp.kernel.outputscale) == pytest.approx(1.0) and float(gp.noise) == pytest.approx(0.4)
    # a precomputed choice is reused as given
    again = gp.posterior(X_new, refine=CGPolicy(400, tol=1e-10), refit_mll=fit)
    torch.testing.assert_close(again.mean, post.mean)


def test_refit_mll_rejects_bad_arguments(data):
    X, y, kernel, K = data
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(8), noise=0.4)
    with pytest.raises(ValueError, match="refit_mll"):
        gp.posterior(X[:3], refine=CGPolicy(5), refit_mll="grid")
    with pytest.raises(ValueError, match="exclusive"):
        gp.posterior(X[:3], refine=CGPolicy(5), refit_noise=True, refit_mll="subset")
    with pytest.raises(ValueError, match="noise"):
        subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=-1.0)
    with pytest.raises(ValueError, match="bounds"):
        refit_outputscale_noise(lambda V: K @ V, y, X[:, :1], noise=0.1, bounds=(2.0, 3.0))
    with pytest.raises(ValueError, match="num_points"):
        subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=0.1, num_points=0)
    assert isinstance(gp.refit_mll("subset"), MLLRefit)


def test_model_stochastic_refit_agrees_with_the_exact_subset_refit(data):
    """``gp.refit_mll("stochastic")`` (matrix-free over all the data) lands within a few percent of
    ``"subset"``, which with 2000 > n points is the exact maximiser."""
    X, y, kernel, K = data
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(8), noise=0.4, jitter=0.0)
    exact, stochastic = gp.refit_mll("subset"), gp.refit_mll("stochastic")
    assert stochastic.products > 0 and exact.products == 0
    assert stochastic.multiplier == pytest.approx(exact.multiplier, rel=0.05)
    assert stochastic.noise == pytest.approx(exact.noise, rel=0.05)


def test_an_optimum_outside_the_search_returns_the_bound_and_says_so(data):
    """The likelihood's maximiser (tau = noise / multiplier near 0.01) lies below the searched tau in
    [0.1, 10]: every slope tried has one sign, so the best point tried is the last one reached, the
    lower bound (the smallest |slope| was picked instead: 162 nats worse in the review's case)."""
    X, y, kernel, K = data
    L, _ = partial_cholesky(KernelFn(kernel), X, 60, pivoting="rpcholesky", generator=torch.Generator().manual_seed(0))
    fit = refit_outputscale_noise(lambda V: K @ V, y, L, noise=1.0, bounds=(0.1, 10.0),
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert not fit.converged
    assert fit.noise / fit.multiplier == pytest.approx(0.1, rel=1e-9)
    at_start = _log_likelihood(K, y, fit.multiplier, fit.multiplier * 1.0)  # tau = 1, same multiplier
    assert _log_likelihood(K, y, fit.multiplier, fit.noise) > at_start
    subset = subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=1.0, num_points=len(y), bounds=(0.1, 10.0))
    assert not subset.converged  # was True at the bound
    assert subset.noise / subset.multiplier == pytest.approx(0.1, rel=1e-2)
    assert subset_refit_outputscale_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y)).converged
