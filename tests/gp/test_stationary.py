"""Fused stationary products and their hand-written backward pass against GPyTorch + autograd."""

import copy

import gpytorch
import pyro
import pyro.contrib.gp as contrib_gp
import pytest
import torch

from pyro_gpx.gp import ComputationAwareGP, KernelFn, UnitVectorPolicy, kd_partition, settings
from pyro_gpx.gp.actions import BlockSparseActions
from pyro_gpx.gp.kernel_ops import kernel_matmul, kernel_matmul_accumulate, training_matmul
from pyro_gpx.gp.stationary import stationary_block_matmul, stationary_matmul, stationary_spec
from pyro_gpx.gp.symmetric import symmetric_matmul, training_block_matmul, training_stacked_matmul

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
    assert stationary_spec(gpytorch.kernels.RBFKernelGrad()) is None  # a subclass computes something else


class WarpedRBF(gpytorch.kernels.RBFKernel):
    """A user's subclass of a supported kernel: its own ``forward`` must be used, not the fused RBF."""

    def forward(self, x1, x2, **params):
        return super().forward(x1.square(), x2.square(), **params)


def test_subclasses_and_contrib_active_dims_are_computed_as_the_kernel_does(float64):
    X = torch.rand(50, 2, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * X[:, 0]) + 0.1 * torch.randn(50, dtype=torch.float64)
    noise = torch.tensor(0.05, dtype=torch.float64)

    def dense_lml(K):
        return torch.distributions.MultivariateNormal(torch.zeros(50), K + noise * torch.eye(50)).log_prob(y)

    warped = gpytorch.kernels.ScaleKernel(WarpedRBF()).double()
    assert stationary_spec(warped) is None
    gp = ComputationAwareGP(X, y, warped, policy=UnitVectorPolicy(), noise=noise, jitter=0.0)
    K = warped(X, X).to_dense().detach()
    assert float(gp.marginal().log_prob(y)) == pytest.approx(float(dense_lml(K)), rel=1e-9)
    # pyro.contrib.gp kernels act on their active_dims (by default the first input_dim columns)
    first = contrib_gp.kernels.RBF(input_dim=1, lengthscale=torch.tensor(0.4))
    second = contrib_gp.kernels.Matern32(input_dim=1, active_dims=[1], lengthscale=torch.tensor(0.4))
    for kernel in (first, second):
        pyro.clear_param_store()
        spec = stationary_spec(kernel)
        torch.testing.assert_close(spec.dense(X, X), kernel(X).detach(), rtol=1e-12, atol=1e-12)
        gp = ComputationAwareGP(X, y, kernel, noise=noise, objective="exact", jitter=0.0)
        K = kernel(X).detach()
        assert float(gp.marginal().log_prob(y)) == pytest.approx(float(dense_lml(K)), rel=1e-9)
        reference = contrib_gp.models.GPRegression(X, y, kernel, noise=noise, jitter=0.0)
        X_new = torch.rand(5, 2, dtype=torch.float64)
        torch.testing.assert_close(gp(X_new)[0], reference(X_new)[0].detach(), rtol=1e-8, atol=1e-10)
    # unsupported kernels still work, through the generic path
    kernel = (gpytorch.kernels.RBFKernel() + gpytorch.kernels.LinearKernel()).double()
    kfn = KernelFn(kernel)
    assert kfn.spec is None
    torch.testing.assert_close(kfn(X, X), kernel(X, X).to_dense())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tile", [5, 12, 1000])  # several tiles (off-diagonal ones included), or one
def test_symmetric_training_product_matches_row_chunked(float64, family, tile):
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(29, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index, mask = kd_partition(X.detach(), 6)  # 6 blocks of 4-5 points: padding on the short ones
    blocks = torch.randn(index.shape, generator=gen, dtype=torch.float64).mul(mask).requires_grad_()
    kernel = _kernel(family)
    params = [kernel.raw_outputscale, kernel.base_kernel.raw_lengthscale, X, blocks]
    weight = torch.randn(29, 6, generator=gen, dtype=torch.float64)
    ref = stationary_block_matmul(stationary_spec(kernel), X, X[index].reshape(-1, 3), blocks)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params)
    with settings.chunk_size(tile):
        out = training_block_matmul(stationary_spec(kernel), X, index, mask, blocks)
    grads = torch.autograd.grad((out * weight).sum(), params)
    # (Matern-1/2's self-distances are exactly zero in both products: they used to round differently, ~1e-8
    # in the values through exp(-sqrt(rho)), and needed tolerances of 1e-7 here)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads[-1].mul_(mask), ref_grads[-1].mul_(mask)  # padding entries are masked out of the actions
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_symmetric_training_product_is_used_for_training_and_matches_dense(float64):
    gen = torch.Generator().manual_seed(2)
    X = torch.rand(40, 3, generator=gen, dtype=torch.float64)
    index, mask = kd_partition(X, 7)
    blocks = torch.randn(index.shape, generator=gen, dtype=torch.float64)
    actions = BlockSparseActions(index, blocks, mask, 40)
    kernel = _kernel("matern32")
    with settings.chunk_size(9):
        KS = actions.kernel_product(KernelFn(kernel), X, X)
    torch.testing.assert_close(KS, kernel(X, X).to_dense() @ actions.dense(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["rbf", "matern32"])
@pytest.mark.parametrize("tile", [5, 12, 1000])
def test_one_pass_products_without_gradient_match_dense(float64, family, tile):
    """The no-gradient products of prediction-time refinement: K [S, V] (block-sparse and dense
    columns from one triangle of tiles), K V from one triangle, and the row-chunked K(X1, X) V."""
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(29, 3, generator=gen, dtype=torch.float64)
    X1 = torch.rand(11, 3, generator=gen, dtype=torch.float64)
    index, mask = kd_partition(X, 6)  # padding on the short blocks
    blocks = torch.randn(index.shape, generator=gen, dtype=torch.float64).mul(mask)
    V = torch.randn(29, 3, generator=gen, dtype=torch.float64)
    kernel = _kernel(family)
    spec, K = stationary_spec(kernel), kernel(X, X).to_dense().detach()
    S = BlockSparseActions(index, blocks, mask, 29).dense()
    with settings.chunk_size(tile):
        stacked = training_stacked_matmul(spec, X, index, mask, blocks, V)
        symmetric = symmetric_matmul(spec, X, V)
        rows = kernel_matmul_accumulate(KernelFn(kernel), X1, X, V)
    torch.testing.assert_close(stacked, K @ torch.cat([S, V], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(symmetric, K @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, kernel(X1, X).to_dense().detach() @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel_kind", ["stationary", "sum"])
def test_float32_entries_accumulate_in_float64(kernel_kind):
    """float32 inputs with float64 columns: float64 results off from the float64 product by the
    rounding of the kernel entries only. (How much closer that is than float32 sums over 3000
    columns depends on the CPU's summation: 2x on one machine, 1.7x on another.)"""
    gen = torch.Generator().manual_seed(4)
    X = torch.rand(3000, 3, generator=gen)
    V = torch.randn(3000, 2, generator=gen, dtype=torch.float64)
    kernel = _kernel("matern32").float()
    if kernel_kind == "sum":
        kernel = kernel + gpytorch.kernels.LinearKernel()
    kfn = KernelFn(kernel)
    with torch.no_grad():
        ref = copy.deepcopy(kernel).double()(X.double(), X.double()).to_dense() @ V
        float32_sums = kernel_matmul(kfn, X, X, V.float()).double()
        out = kernel_matmul_accumulate(kfn, X, X, V)
        pieces = [out] if kfn.spec is None else [out, symmetric_matmul(kfn.spec, X, V)]

    def error(product):
        return float((product - ref).abs().max() / ref.abs().max())

    for product in pieces:
        assert product.dtype == torch.float64
        assert error(product) < min(1.5e-6, error(float32_sums))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_matern12_entries_do_not_carry_the_square_root_of_the_rounding(dtype, tol):
    """exp(-sqrt(rho)) turned the expansion's rounding, eps |z|^2 in rho, into sqrt(eps) |z| in the
    entries: 2e-3 on float32's diagonal and 4e-3 in its products (8e-8 in float64), against a kernel
    from explicit differences."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    X = torch.cat([X, X[:10]])  # repeated inputs
    V = torch.randn(310, 3, generator=gen, dtype=torch.float64)
    kernel = gpytorch.kernels.MaternKernel(nu=0.5).to(dtype)
    kernel.lengthscale = torch.tensor(0.7, dtype=dtype)
    ell = float(kernel.lengthscale.detach())
    exact = torch.exp(-torch.cdist(X / ell, X / ell, compute_mode="donot_use_mm_for_euclid_dist"))
    kfn = KernelFn(kernel)
    K = kfn(X.to(dtype), X.to(dtype)).double()
    assert torch.equal(K.diagonal(), torch.ones(310, dtype=torch.float64))
    torch.testing.assert_close(K, exact, rtol=0, atol=tol)
    for product in (
        training_matmul(kfn, X.to(dtype), V.to(dtype)),
        kernel_matmul(kfn, X.to(dtype), X.to(dtype), V.to(dtype)),
    ):
        torch.testing.assert_close(product.double(), exact @ V, rtol=0, atol=20 * tol)
