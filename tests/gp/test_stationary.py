"""Fused stationary products and their hand-written backward pass against GPyTorch + autograd."""

import gpytorch
import pyro.contrib.gp as contrib_gp
import pytest
import torch

from pyro_gpx.gp import KernelFn, settings
from pyro_gpx.gp.stationary import stationary_block_matmul, stationary_matmul, stationary_spec

FAMILIES = {
    "rbf": lambda d: gpytorch.kernels.RBFKernel(ard_num_dims=d),
    "matern12": lambda d: gpytorch.kernels.MaternKernel(nu=0.5, ard_num_dims=d),
    "matern32": lambda d: gpytorch.kernels.MaternKernel(nu=1.5, ard_num_dims=d),
    "matern52": lambda d: gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=d),
}


def _kernel(family, d=3):
    kernel = gpytorch.kernels.ScaleKernel(FAMILIES[family](d)).double()
    kernel.base_kernel.lengthscale = torch.tensor([[0.4, 0.9, 1.7]], dtype=torch.float64)
    kernel.outputscale = 1.7
    return kernel


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["dense", "block"])
def test_fused_product_values_and_gradients(float64, family, kind):
    gen = torch.Generator().manual_seed(0)
    X1 = torch.rand(23, 3, generator=gen, dtype=torch.float64)
    X2 = torch.rand(30, 3, generator=gen, dtype=torch.float64)
    X2[4] = X1[2]  # a zero distance (the Matern-1/2 derivative is singular there)
    kernel = _kernel(family)
    params = [kernel.raw_outputscale, kernel.base_kernel.raw_lengthscale]
    if kind == "dense":
        V = torch.randn(30, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        S = V
    else:
        V = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)  # 5 blocks of 6 points
        S = torch.block_diag(*[v[:, None] for v in V])  # (30, 5)
    weight = torch.randn(23, S.shape[1], generator=gen, dtype=torch.float64)
    ref = kernel(X1, X2).to_dense() @ S
    ref_grads = torch.autograd.grad((ref * weight).sum(), params + [V])
    spec = stationary_spec(kernel)
    assert spec is not None and spec.family == family
    with settings.chunk_size(7):
        out = stationary_matmul(spec, X1, X2, V) if kind == "dense" else stationary_block_matmul(spec, X1, X2, V)
    grads = torch.autograd.grad((out * weight).sum(), params + [V])
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_specs_of_supported_and_unsupported_kernels(float64):
    rbf = contrib_gp.kernels.Matern52(input_dim=2, lengthscale=torch.tensor([0.3, 0.6]))
    spec = stationary_spec(rbf)
    X = torch.rand(6, 2, dtype=torch.float64)
    torch.testing.assert_close(spec.dense(X, X), rbf(X).detach())
    assert stationary_spec(gpytorch.kernels.PeriodicKernel()) is None
    assert stationary_spec(gpytorch.kernels.RBFKernel(active_dims=[0])) is None
    assert stationary_spec(gpytorch.kernels.RBFKernel() + gpytorch.kernels.LinearKernel()) is None
    # unsupported kernels still work, through the generic path
    kernel = (gpytorch.kernels.RBFKernel() + gpytorch.kernels.LinearKernel()).double()
    kfn = KernelFn(kernel)
    assert kfn.spec is None
    torch.testing.assert_close(kfn(X, X), kernel(X, X).to_dense())
