"""Small GP regression problems with dense references (float64)."""

from dataclasses import dataclass

import gpytorch
import torch

from pyro_gpx.gp import KernelFn, safe_cholesky


@dataclass
class Problem:
    X: torch.Tensor
    y: torch.Tensor
    X_new: torch.Tensor
    kernel: gpytorch.kernels.Kernel
    noise: torch.Tensor

    @property
    def kfn(self) -> KernelFn:
        return KernelFn(self.kernel)

    def dense_posterior(self):
        """Exact GP posterior mean and covariance at X_new by dense Cholesky."""
        K = self.kernel(self.X, self.X).to_dense() + self.noise * torch.eye(len(self.X))
        L = safe_cholesky(K)
        Kx = self.kernel(self.X_new, self.X).to_dense()
        alpha = torch.cholesky_solve(self.y[:, None], L)[:, 0]
        V = torch.linalg.solve_triangular(L, Kx.T, upper=False)
        return Kx @ alpha, self.kernel(self.X_new, self.X_new).to_dense() - V.T @ V

    def gpytorch_log_marginal(self):
        kernel = self.kernel

        class Exact(gpytorch.models.ExactGP):
            def __init__(self, X, y, likelihood):
                super().__init__(X, y, likelihood)
                self.mean = gpytorch.means.ZeroMean()

            def forward(self, x):
                return gpytorch.distributions.MultivariateNormal(self.mean(x), kernel(x))

        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = self.noise
        model = Exact(self.X, self.y, likelihood).double()
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        with gpytorch.settings.max_cholesky_size(100_000):
            return mll(model(self.X), self.y) * len(self.y)


def make_problem(n=60, d=2, seed=0, noise=0.05, lengthscale=(0.3, 0.5), outputscale=1.3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=dtype)
    y = torch.sin(4 * X[:, 0]) + X[:, -1] ** 2 + 0.2 * torch.randn(n, generator=gen, dtype=dtype)
    X_new = torch.rand(7, d, generator=gen, dtype=dtype) * 1.4 - 0.2
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d)).to(dtype)
    kernel.base_kernel.lengthscale = torch.tensor([list(lengthscale)[:d]], dtype=dtype)
    kernel.outputscale = torch.tensor(outputscale, dtype=dtype)
    return Problem(X, y, X_new, kernel, torch.tensor(noise, dtype=dtype))
