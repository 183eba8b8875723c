"""Autograd gradients of the objectives against central finite differences (float64)."""

import pytest
import torch

from pyro_gpx.gp import BlockSparsePolicy, DenseActions, KernelFn, PolicyContext, project, settings

from .problems import make_problem


def _objective(problem, theta, actions_fn, which):
    """Objective as a function of theta = (raw lengthscales (2), raw outputscale, log noise)."""
    kernel = problem.kernel
    base = kernel.base_kernel
    # route theta through the kernel's own constraints, keeping the graph
    del kernel.raw_outputscale, base.raw_lengthscale
    kernel.raw_outputscale = theta[2]
    base.raw_lengthscale = theta[:2][None]
    noise = theta[3].exp()
    kfn = KernelFn(kernel)
    actions = actions_fn(kfn, noise)
    with settings.chunk_size(16):  # exercise the recomputed chunks in the backward pass
        projection = project(actions, kfn, problem.X, problem.y, noise)
    return projection.elbo(kfn.diag(problem.X)) if which == "elbo" else projection.projected_log_likelihood()


def _finite_difference(f, theta, eps=1e-6):
    grad = torch.zeros_like(theta)
    for k in range(len(theta)):
        step = torch.zeros_like(theta)
        step[k] = eps
        grad[k] = (f(theta + step) - f(theta - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("which", ["elbo", "projected"])
@pytest.mark.parametrize("kind", ["dense", "block"])
def test_hyperparameter_gradients(float64, which, kind):
    problem = make_problem(n=40, seed=3)
    S = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    policy = BlockSparsePolicy(6, init="random")

    def actions_fn(kfn, noise):
        if kind == "dense":
            return DenseActions(S)
        return policy.actions(PolicyContext(problem.X, problem.y, kfn, noise))

    def f(theta):
        with torch.no_grad():
            return _objective(problem, theta, actions_fn, which)

    theta = torch.tensor([-0.8, -0.3, 0.5, -2.5], dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(_objective(problem, theta, actions_fn, which), theta)[0]
    torch.testing.assert_close(grad, _finite_difference(f, theta.detach()), rtol=1e-5, atol=1e-6)


def test_gradient_with_respect_to_block_entries(float64):
    problem = make_problem(n=30, seed=4)
    kfn, noise = problem.kfn, problem.noise
    policy = BlockSparsePolicy(5, init="random")
    actions = policy.actions(PolicyContext(problem.X, problem.y, kfn, noise))
    blocks = actions.blocks.detach().clone().requires_grad_(True)

    def elbo(b):
        from pyro_gpx.gp import BlockSparseActions

        a = BlockSparseActions(actions.index, b, actions.mask, 30)
        return project(a, kfn, problem.X, problem.y, noise).elbo(kfn.diag(problem.X))

    grad = torch.autograd.grad(elbo(blocks), blocks)[0]
    fd = torch.zeros_like(blocks)
    for idx in [(0, 0), (2, 3), (4, 1)]:
        step = torch.zeros_like(blocks)
        step[idx] = 1e-6
        with torch.no_grad():
            fd[idx] = (elbo(blocks + step) - elbo(blocks - step)) / 2e-6
        assert float(grad[idx]) == pytest.approx(float(fd[idx]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_exact_likelihood_gradient_with_matern_kernels_is_finite_and_matches_gpytorch(float64, nu):
    """The dense fused Matérn path has r = sqrt(rho) = 0 on the diagonal of K(X, X); its gradient
    must not become 0 * inf = NaN (it did: NaN lengthscale gradients for the exact objective)."""
    import gpytorch

    from pyro_gpx.gp import exact_log_marginal_likelihood

    problem = make_problem(n=40, seed=5)
    grads = []
    for fused in (True, False):
        kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=nu, ard_num_dims=2)).double()
        kernel.base_kernel.lengthscale = torch.tensor([[0.3, 0.5]], dtype=torch.float64)
        kfn = KernelFn(kernel, fused=fused)
        loss = exact_log_marginal_likelihood(kfn, problem.X, problem.y, problem.noise)
        grads.append(torch.cat([p.flatten() for p in torch.autograd.grad(loss, list(kernel.parameters()))]))
    assert torch.isfinite(grads[0]).all()
    # Matérn-1/2 is not differentiable at r = 0: the two paths round the self-distances differently (~1e-8)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def test_exact_likelihood_closed_form_gradient_equals_autograd_through_cholesky(float64):
    """The exact likelihood's gradient comes from (alpha alpha^T - K^-1) / 2, not from autograd
    through the Cholesky factor; both must agree for the kernel, the noise and the residual."""
    from pyro_gpx.gp import exact_log_marginal_likelihood

    problem = make_problem(n=60, seed=7)
    kfn = KernelFn(problem.kernel)
    params = list(problem.kernel.parameters())
    noise = problem.noise.clone().requires_grad_()
    residual = problem.y.clone().requires_grad_()
    inputs = [*params, noise, residual]

    ours = exact_log_marginal_likelihood(kfn, problem.X, residual, noise)
    grads = torch.autograd.grad(ours, inputs)

    C = KernelFn(problem.kernel)(problem.X, problem.X) + noise * torch.eye(60, dtype=torch.float64)
    L = torch.linalg.cholesky(C)
    alpha = torch.linalg.solve_triangular(L, residual[:, None], upper=False)[:, 0]
    reference = -0.5 * (alpha @ alpha) - L.diagonal().log().sum() - 30 * torch.log(torch.tensor(2 * torch.pi))
    expected = torch.autograd.grad(reference, inputs)

    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-12, atol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
