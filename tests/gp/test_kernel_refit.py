"""Re-selecting all kernel hyperparameters and the noise by the exact likelihood of data subsets."""

import gpytorch
import pyro.contrib.gp as contrib_gp
import pytest
import torch

from pyro_gpx.gp import BlockSparsePolicy, CGPolicy, ComputationAwareGP, KernelFn, subset_refit_kernel_noise


@pytest.fixture
def data(float64):
    """300 points from a GP with lengthscales (0.3, 0.6), outputscale 5 and noise 0.05; the kernel to
    refit starts at lengthscales (1, 1) and outputscale 1."""
    gen = torch.Generator().manual_seed(0)
    n = 300
    X = torch.rand(n, 2, generator=gen)
    truth = gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=2)
    truth.lengthscale = torch.tensor([[0.3, 0.6]])
    with torch.no_grad():
        cov = 5.0 * truth(X, X).to_dense() + 0.05 * torch.eye(n)
        y = torch.linalg.cholesky(cov) @ torch.randn(n, generator=gen)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=2))
    kernel.base_kernel.lengthscale = torch.tensor([[1.0, 1.0]])
    kernel.outputscale = 1.0
    return X, y, kernel


def _log_likelihood(log_lengthscale, log_outputscale, log_noise, X, y):
    d = (X[:, None, :] - X[None, :, :]) / log_lengthscale.exp()
    r = (d.square().sum(-1) + 1e-300).sqrt() * 3**0.5
    K = log_outputscale.exp() * (1 + r) * torch.exp(-r)
    cov = K + log_noise.exp() * torch.eye(len(y))
    return torch.distributions.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y)


def test_with_all_points_the_fit_is_a_stationary_point_of_the_exact_likelihood(data):
    """num_points >= n: the dense likelihood of all the data; its gradient (autograd through an
    independent Matérn-3/2 implementation) vanishes at the result, and the likelihood rose."""
    X, y, kernel = data
    fit = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y))
    assert fit.converged and fit.multiplier == 1.0 and fit.products == 0
    params = [
        fit.kernel.spec.lengthscale.log().clone().requires_grad_(),
        fit.kernel.spec.outputscale.log().clone().requires_grad_(),
        torch.tensor(fit.noise).log().requires_grad_(),
    ]
    value = _log_likelihood(*params, X, y)
    grads = torch.autograd.grad(value, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-3 * len(y) ** 0.5
    start = _log_likelihood(torch.zeros(2), torch.zeros(()), torch.tensor(0.3).log(), X, y)
    assert float(value.detach()) > float(start) + 10
    # near the generating values (300 points: loose)
    assert fit.noise == pytest.approx(0.05, rel=0.5)
    torch.testing.assert_close(fit.kernel.spec.lengthscale, torch.tensor([0.3, 0.6]), rtol=0.5, atol=0.0)


def test_an_isotropic_kernel_on_several_inputs_is_a_stationary_point(data):
    """One lengthscale for both inputs: its gradient is the sum of the per-dimension terms (it raised a
    broadcast error for every single-lengthscale kernel on d >= 2)."""
    X, y, _ = data
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5))
    fit = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y))
    assert fit.converged and fit.kernel.spec.lengthscale.numel() == 1
    params = [
        fit.kernel.spec.lengthscale.log().reshape(()).clone().requires_grad_(),
        fit.kernel.spec.outputscale.log().clone().requires_grad_(),
        torch.tensor(fit.noise).log().requires_grad_(),
    ]
    grads = torch.autograd.grad(_log_likelihood(*params, X, y), params)
    assert max(float(g.abs().max()) for g in grads) < 1e-3 * len(y) ** 0.5


def test_pyro_contrib_kernel_gives_the_same_fit(data):
    X, y, kernel = data
    contrib = contrib_gp.kernels.Matern32(2, variance=torch.tensor(1.0), lengthscale=torch.tensor([1.0, 1.0]))
    ours = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y))
    theirs = subset_refit_kernel_noise(KernelFn(contrib), X, y, noise=0.3, num_points=len(y))
    torch.testing.assert_close(theirs.kernel.spec.lengthscale, ours.kernel.spec.lengthscale, rtol=1e-4, atol=0.0)
    assert theirs.noise == pytest.approx(ours.noise, rel=1e-4)


def test_posterior_with_subset_kernel_refit_is_the_exact_gp_at_the_selected_kernel(data):
    """refit_mll="subset-kernel" + CG to convergence: the dense exact posterior mean at the re-selected
    kernel and noise, variance no smaller; the model's parameters are unchanged."""
    X, y, kernel = data
    X_new = torch.rand(7, 2, generator=torch.Generator().manual_seed(5))
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(8), noise=0.3, jitter=0.0)
    post = gp.posterior(X_new, refine=CGPolicy(300, tol=1e-10), refit_mll="subset-kernel")
    fit = gp.last_mll_refit
    assert fit.kernel is not None and fit.converged
    with torch.no_grad():
        K, Kx = fit.kernel(X, X), fit.kernel(X_new, X)
        chol = torch.linalg.cholesky(K + fit.noise * torch.eye(len(y)))
        mean = Kx @ torch.cholesky_solve(y[:, None], chol)[:, 0]
        var = fit.kernel.diag(X_new) - torch.linalg.solve_triangular(chol, Kx.T, upper=False).square().sum(0)
    torch.testing.assert_close(post.mean, mean, rtol=1e-5, atol=1e-6)
    assert bool((post.covariance >= var - 1e-8).all())
    assert float(post.noise) == pytest.approx(fit.noise)
    torch.testing.assert_close(gp.kernel.base_kernel.lengthscale, torch.tensor([[1.0, 1.0]]))
    assert float(gp.noise) == pytest.approx(0.3)
    # the subsets' estimate differs from the all-data one but stays a likelihood improvement
    small = gp.refit_mll("subset-kernel", num_points=150, num_subsets=2)
    assert small.kernel is not None and small.noise != pytest.approx(fit.noise, rel=1e-6)


def test_limits_stop_the_search_at_the_best_point(data):
    X, y, kernel = data
    timed = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, max_seconds=0.0)
    assert timed.evaluations == 1 and not timed.converged  # the starting point
    torch.testing.assert_close(timed.kernel.spec.lengthscale, torch.tensor([1.0, 1.0]))
    assert timed.noise == pytest.approx(0.3)
    short = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, max_evaluations=3)
    assert short.evaluations == 3 and not short.converged


def test_bad_input_names_the_argument(data):
    X, y, kernel = data
    with pytest.raises(ValueError, match="stationary kernel"):
        subset_refit_kernel_noise(KernelFn(gpytorch.kernels.LinearKernel()), X, y, noise=0.1)
    with pytest.raises(ValueError, match="num_points"):
        subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.1, num_points=0)
    with pytest.raises(ValueError, match="noise"):
        subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=float("nan"))
    with pytest.raises(ValueError, match="residual"):
        subset_refit_kernel_noise(KernelFn(kernel), X, y[:-1], noise=0.1)
    with pytest.raises(ValueError, match="lengthscale must have shape"):
        KernelFn(kernel).with_hyperparameters(torch.ones(3), torch.ones(()))
    gp = ComputationAwareGP(X, y, gpytorch.kernels.LinearKernel(), policy=BlockSparsePolicy(8), noise=0.3)
    with pytest.raises(ValueError, match="stationary kernel"):
        gp.posterior(X[:3], refine=CGPolicy(5), refit_mll="subset-kernel")


def test_repeated_rows_are_dropped_so_the_noise_stays_away_from_zero(data):
    """Identical (x, y) rows make a subset's likelihood unbounded as the noise goes to zero; the refit
    drops them, so 40 repeated rows leave the fit unchanged."""
    X, y, kernel = data
    Xd, yd = torch.cat([X, X[:40]]), torch.cat([y, y[:40]])
    clean = subset_refit_kernel_noise(KernelFn(kernel), X, y, noise=0.3, num_points=len(y))
    repeated = subset_refit_kernel_noise(KernelFn(kernel), Xd, yd, noise=0.3, num_points=len(yd))
    assert repeated.noise == pytest.approx(clean.noise, rel=1e-6) and repeated.noise > 0.01
    torch.testing.assert_close(repeated.kernel.spec.lengthscale, clean.kernel.spec.lengthscale)


def test_a_refit_after_svi_pickles_and_reloads_to_the_same_posterior(data):
    """A GPyTorch kernel trained under Pyro cannot be pickled (the parameter store's weak references);
    the re-selected kernel holds its hyperparameters, so the refit saves, reloads and predicts the same."""
    import pickle

    import pyro
    from pyro.infer import SVI, Trace_ELBO

    X, y, kernel = data
    gp = ComputationAwareGP(X, y, kernel, policy=BlockSparsePolicy(8), noise=0.3)
    svi = SVI(gp.model, lambda: None, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step()
    with pytest.raises(TypeError, match="weakref"):
        pickle.dumps(kernel)
    fit = gp.refit_mll("subset-kernel", num_points=100, max_evaluations=5)
    loaded = pickle.loads(pickle.dumps(fit))
    assert loaded.kernel is not None and loaded.kernel.kernel is None
    X_new = X[:5] + 0.01
    refine = CGPolicy(20)
    before, after = (
        gp.posterior(X_new, refine=refine, refit_mll=fit),
        gp.posterior(X_new, refine=refine, refit_mll=loaded),
    )
    torch.testing.assert_close(after.mean, before.mean, rtol=0, atol=0)
    torch.testing.assert_close(after.covariance, before.covariance, rtol=0, atol=0)
