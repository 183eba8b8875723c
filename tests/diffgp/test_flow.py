"""The flow field and its solver against dense GP algebra and closed-form ODE solutions (float64)."""

import gpytorch
import pyro.distributions as dist
import pytest
import torch

from pyro_gpx.diffgp import (
    FlowKernel,
    GPVectorField,
    GridBrownian,
    KernelState,
    default_flow_kernel,
    integrate_flow,
    jittered_cholesky,
    kmeans_inducing,
)

D, M = 3, 7


def _dense_moments(kernel_fn, x, Z, u, jitter=1e-6):
    """Independent dense reference: per dimension, mean = K_xZ L^-T u, var = k(x,x) - K_xZ K_ZZ^-1 K_Zx."""
    means, vars_ = [], []
    for d in range(D):
        Kzz = kernel_fn(Z, Z, d) + jitter * torch.eye(len(Z))
        Kxz = kernel_fn(x, Z, d)
        L = torch.linalg.cholesky(Kzz)
        means.append(Kxz @ torch.linalg.solve(L.T, u[d]))
        vars_.append(torch.diag(kernel_fn(x, x, d)) - torch.einsum("nm,mk,nk->n", Kxz, torch.linalg.inv(Kzz), Kxz))
    return torch.stack(means, -1), torch.stack(vars_, -1)


def _rbf(ls, os_):
    def k(a, b, d):
        r2 = ((a[:, None] / ls[d] - b[None] / ls[d]) ** 2).sum(-1)
        return os_[d] * torch.exp(-0.5 * r2)

    return k


@pytest.mark.parametrize("bayesian", [False, True])
def test_moments_match_dense_conditional(float64, bayesian):
    torch.manual_seed(0)
    ls = torch.rand(D, D) + 0.5
    os_ = torch.rand(D) + 0.5
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=D, batch_shape=torch.Size([D])), batch_shape=torch.Size([D])
    ).double()
    kernel.base_kernel.lengthscale = ls.unsqueeze(-2)
    kernel.outputscale = os_
    priors = {"lengthscale_prior": dist.LogNormal(0.0, 1.0)} if bayesian else {}
    flow = FlowKernel(D, kernel, **priors)
    if bayesian:
        import pyro.poutine as poutine

        state = poutine.condition(flow.state, {"lengthscale": ls})()
    else:
        state = flow.state()
    Z, x, u = torch.randn(M, D), torch.randn(11, D), torch.randn(D, M)
    mean, var = GPVectorField(state, Z, u.unsqueeze(0)).moments(x.unsqueeze(0))
    ref_mean, ref_var = _dense_moments(_rbf(ls, os_), x, Z, u)
    torch.testing.assert_close(mean[0], ref_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(var[0], ref_var, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bayesian", [False, True])
def test_shared_kernel_matches_dense_conditional(float64, bayesian):
    """One kernel for all D outputs (as in Hegde et al.'s public code): one (n, M) block, D means."""
    torch.manual_seed(2)
    ls, os_ = torch.rand(D) + 0.5, torch.tensor(0.7)
    kernel = default_flow_kernel(D, shared=True)
    kernel.base_kernel.lengthscale = ls
    kernel.outputscale = os_
    priors = {"lengthscale_prior": dist.LogNormal(0.0, 1.0)} if bayesian else {}
    flow = FlowKernel(D, kernel, **priors)
    assert flow.num_kernels == 1
    draws = 2
    if bayesian:
        import pyro.poutine as poutine

        ls_draws = torch.stack([ls, 1.5 * ls]).reshape(draws, 1, 1, 1, D)  # (draws, plate, plate, D_k, D)
        state = poutine.condition(flow.state, {"lengthscale": ls_draws})()
    else:
        state = flow.state()
    Z, x, u = torch.randn(M, D), torch.randn(draws, 9, D), torch.randn(draws, D, M)
    mean, var = GPVectorField(state, Z, u).moments(x)
    for b in range(draws):
        scale = 1.5 if (bayesian and b == 1) else 1.0
        k = _rbf(scale * ls.expand(D, D), os_.expand(D))
        ref_mean, ref_var = _dense_moments(k, x[b], Z, u[b])
        torch.testing.assert_close(mean[b], ref_mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(var[b], ref_var, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shared", [False, True])
def test_outputscale_prior_alone_keeps_each_kernels_lengthscale(float64, shared):
    """A prior on the output scales only: the lengthscales come from the kernel, each kernel its own (a
    per-dimension isotropic kernel's were reshaped into one row, so dimension 0 used dimension 1's)."""
    import pyro.poutine as poutine

    torch.manual_seed(3)
    batch = torch.Size() if shared else torch.Size([D])
    ls = torch.tensor(0.8) if shared else torch.tensor([0.5, 3.0, 1.2])
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch).double()
    kernel.base_kernel.lengthscale = ls.reshape(batch + (1, 1))
    kernel.outputscale = torch.full(batch, 0.7)
    flow = FlowKernel(D, kernel, outputscale_prior=dist.LogNormal(0.0, 1.0))
    state = poutine.condition(flow.state, {"outputscale": torch.full((flow.num_kernels,), 0.7)})()
    Z, x, u = torch.randn(M, D), torch.randn(9, D), torch.randn(D, M)
    mean, var = GPVectorField(state, Z, u.unsqueeze(0)).moments(x.unsqueeze(0))
    ref_mean, ref_var = _dense_moments(_rbf(ls.reshape(-1, 1).expand(D, D), torch.full((D,), 0.7)), x, Z, u)
    torch.testing.assert_close(mean[0], ref_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(var[0], ref_var, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", ["rbf", "matern"])
def test_float32_kernel_is_translation_invariant(family):
    """The fused float32 products centre the inputs: at an offset of 300 the kernel matches float64 (it was
    0.06 off for RBF and up to 0.15 for Matérn)."""
    torch.manual_seed(4)
    base = gpytorch.kernels.RBFKernel if family == "rbf" else gpytorch.kernels.MaternKernel
    kernel = gpytorch.kernels.ScaleKernel(
        base(ard_num_dims=D, batch_shape=torch.Size([D])), batch_shape=torch.Size([D])
    )
    Z, x = torch.randn(M, D, dtype=torch.float64), torch.randn(1, 11, D, dtype=torch.float64)
    state64 = FlowKernel(D, kernel.double()).state()
    reference = state64.cross(x, Z)
    state32 = FlowKernel(D, kernel.float(), dtype=torch.float32).state()
    shifted = state32.cross((x + 300).float(), (Z + 300).float())
    torch.testing.assert_close(shifted.double(), reference, rtol=0, atol=1e-4)


def test_prior_in_another_dtype_than_the_kernel():
    """Priors built in float64 for a float32 flow (or from Python floats for a float64 one) are sampled in
    their own dtype and used in the kernel's (a float32 flow failed with a dtype error)."""
    import pyro.poutine as poutine

    flow = FlowKernel(D, dtype=torch.float32, lengthscale_prior=dist.LogNormal(torch.tensor(0.0).double(), 1.0))
    state = poutine.trace(flow.state).get_trace().nodes["_RETURN"]["value"]
    assert state.lengthscale.dtype == torch.float32
    Z, x, u = torch.randn(M, D), torch.randn(1, 5, D), torch.randn(1, D, M)
    mean, var = GPVectorField(state, Z, u).moments(x)
    assert mean.dtype == var.dtype == torch.float32 and torch.isfinite(mean).all()


def test_generic_gpytorch_kernel_path(float64):
    """A kernel that is not a plain stationary family (a sum) goes through GPyTorch and still matches."""
    torch.manual_seed(1)
    kernel = (gpytorch.kernels.RBFKernel(batch_shape=torch.Size([D])) + gpytorch.kernels.LinearKernel(
        batch_shape=torch.Size([D]))).double()  # fmt: skip
    flow = FlowKernel(D, kernel)
    assert flow.family is None
    Z, x, u = torch.randn(M, D), torch.randn(5, D), torch.randn(D, M)
    mean, var = GPVectorField(flow.state(), Z, u.unsqueeze(0)).moments(x.unsqueeze(0))
    ref_mean, ref_var = _dense_moments(lambda a, b, d: kernel(a, b).to_dense()[d], x, Z, u)
    torch.testing.assert_close(mean[0], ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var[0], ref_var, rtol=1e-6, atol=1e-7)


def _plain_moments(state, Z, u, x, jitter=1e-6):
    """The conditional moments as plain autograd expressions (what GPVectorField.moments computes); an RBF
    state's kernel from the squared distances, independently of its fused rows."""
    cross, gram = state.cross, state.gram(Z)
    if state.family == "rbf":

        def cross(a, b):
            ls = state.lengthscale.unsqueeze(-2)  # (Bk, D_k, 1, D)
            r2 = ((a.unsqueeze(1) / ls).unsqueeze(-2) - (b / ls).unsqueeze(-3)).square().sum(-1)
            return state.outputscale[..., None, None] * torch.exp(-0.5 * r2)

        gram = cross(Z.expand(state.lengthscale.shape[0], -1, -1), Z)
    L = jittered_cholesky(gram, jitter)
    L_inv_T = torch.linalg.solve_triangular(L, torch.eye(Z.shape[0]), upper=False).transpose(-1, -2)
    A = cross(x, Z) @ L_inv_T
    var = (state.diag(x) - torch.linalg.vector_norm(A, dim=-1).square()).clamp_min(0.0)
    if A.shape[1] == 1:
        mean = A[:, 0] @ u.transpose(-1, -2)
    else:
        mean = (A @ u.unsqueeze(-1)).squeeze(-1).transpose(-1, -2)
    return mean, var.transpose(-1, -2).expand_as(mean)


@pytest.mark.parametrize("case", ["rbf", "rbf-draws", "shared", "shared-draws", "matern", "gpytorch"])
def test_moments_gradients_match_plain_autograd(float64, case):
    """The written-out backward passes (fused moments, RBF rows) give autograd's gradients for every
    kernel path: per-dimension and shared kernels, point and drawn hyperparameters, Matérn, GPyTorch."""
    import pyro.poutine as poutine

    torch.manual_seed(5)
    draws = 2 if case.endswith("draws") else 1
    if case == "matern":
        kernel = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.MaternKernel(ard_num_dims=D, batch_shape=torch.Size([D])), batch_shape=torch.Size([D])
        ).double()
    elif case == "gpytorch":
        kernel = (gpytorch.kernels.RBFKernel(batch_shape=torch.Size([D])) + gpytorch.kernels.LinearKernel(
            batch_shape=torch.Size([D]))).double()  # fmt: skip
    else:
        kernel = default_flow_kernel(D, shared=case.startswith("shared"))
    priors = {"lengthscale_prior": dist.LogNormal(0.0, 1.0)} if draws > 1 else {}
    flow = FlowKernel(D, kernel, **priors)
    Dk = flow.num_kernels
    ls = (torch.rand(draws, 1, 1, Dk, D) + 0.5).requires_grad_()
    Z = torch.randn(M, D, requires_grad=True)
    u = torch.randn(draws, D, M, requires_grad=True)
    x = torch.randn(draws, 9, D, requires_grad=True)
    leaves = [Z, u, x] + ([ls] if draws > 1 else list(kernel.parameters()))
    g_mean, g_var = torch.randn(draws, 9, D), torch.rand(draws, 9, D)

    def grads(moments):
        state = poutine.condition(flow.state, {"lengthscale": ls})() if draws > 1 else flow.state()
        mean, var = moments(state)
        return [mean, var] + list(torch.autograd.grad((mean * g_mean + var * g_var).sum(), leaves))

    fused = grads(lambda state: GPVectorField(state, Z, u).moments(x))
    plain = grads(lambda state: _plain_moments(state, Z, u, x))
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_paths_from_one_start_evaluate_the_field_once(float64):
    """copies=S: the first step evaluates the field on one block of inputs and gives the same path (and
    gradients) as evaluating it on all S identical blocks."""
    torch.manual_seed(6)
    S, n, B = 3, 5, 2
    Z, u = torch.randn(M, D, requires_grad=True), torch.randn(B, D, M, requires_grad=True)
    X = torch.randn(n, D)
    x0 = X.expand(B * S, n, D).reshape(B, S * n, D)
    runs = []
    for copies in (1, S):
        field = GPVectorField(FlowKernel(D).state(), Z, u)
        rows = []
        inner = field.moments
        field.moments = lambda x, rows=rows, inner=inner: rows.append(x.shape[1]) or inner(x)
        torch.manual_seed(7)
        path = integrate_flow(field, x0, 1.0, 4, keep_path=True, copies=copies)
        runs.append([path, *torch.autograd.grad(path.sin().sum(), [Z, u])])
        assert rows == [S * n // copies] + [S * n] * 3
        assert field._start is None
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of copies"):
        integrate_flow(field, torch.randn(B, 7, D), 1.0, 2, copies=S)
    with pytest.raises(ValueError, match="copies"):
        integrate_flow(field, x0, 1.0, 2, copies=0)


def test_rbf_features_give_the_cross_kernel(float64):
    state = FlowKernel(D).state()
    Z, x = torch.randn(M, D) + 3, torch.randn(2, 6, D) + 3
    z_aug, x_features = state.rbf_features(Z)
    K = torch.exp(x_features(x) @ z_aug.transpose(-1, -2))
    ref = torch.stack([_rbf(torch.full((D, D), 3**0.5), torch.full((D,), 0.1))(x[b], Z, d) for b in range(2)
                       for d in range(D)]).reshape(2, D, 6, M)  # fmt: skip
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-12)
    assert state.rbf_features(Z[:0]) is None
    assert KernelState(kernel=gpytorch.kernels.RBFKernel()).rbf_features(Z) is None


def _linear_field(A):
    """A GP field whose drift is exactly x -> A x with zero diffusion: a linear kernel k_d(x, z) = x.z
    with D inducing inputs spanning R^D, and f_d(Z) = Z a_d (whitened)."""
    kernel = gpytorch.kernels.LinearKernel(batch_shape=torch.Size([D])).double()
    kernel.variance = torch.ones(D, 1, 1)
    flow = FlowKernel(D, kernel)
    Z = torch.eye(D) + 0.3 * torch.randn(D, D)
    L = torch.linalg.cholesky(Z @ Z.T)
    u = torch.stack([torch.linalg.solve_triangular(L, (Z @ A[d]).unsqueeze(-1), upper=False)[:, 0] for d in range(D)])
    return GPVectorField(flow.state(), Z, u.unsqueeze(0), jitter=0.0)


def test_linear_drift_matches_closed_form_ode(float64):
    torch.manual_seed(2)
    A = 0.5 * torch.randn(D, D)
    field = _linear_field(A)
    x0 = torch.randn(1, 4, D)
    mean, var = field.moments(x0)
    torch.testing.assert_close(mean, x0 @ A.T, rtol=1e-8, atol=1e-8)
    assert var.abs().max() < 1e-8
    T = 1.0
    exact = x0 @ torch.linalg.matrix_exp(A * T).T
    errors = []
    for K in (25, 50, 100):
        xT = integrate_flow(field, x0, T, K)
        euler = x0 @ torch.linalg.matrix_power(torch.eye(D) + A * T / K, K).T  # the discrete recursion, exactly
        torch.testing.assert_close(xT, euler, rtol=1e-6, atol=1e-8)
        errors.append(float((xT - exact).abs().max().detach()))
    # Euler-Maruyama is first order: halving the step halves the error
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3


def test_solver_takes_exactly_num_steps_and_paths_are_kept(float64):
    torch.manual_seed(3)
    field = GPVectorField(FlowKernel(D).state(), torch.randn(M, D), torch.randn(2, D, M))
    calls = []
    inner = field.moments
    field.moments = lambda x: calls.append(1) or inner(x)
    path = integrate_flow(field, torch.randn(2, 5, D), 2.0, 13, keep_path=True)
    assert len(calls) == 13
    assert path.shape == (14, 2, 5, D)


def test_grid_brownian_increments(float64):
    torch.manual_seed(4)
    bm = GridBrownian(2.0, 8, (20000, 2))
    inc = bm(0.5, 0.75)
    assert inc.shape == (20000, 2)
    assert abs(float(inc.var()) - 0.25) < 0.02
    torch.testing.assert_close(bm(0.0, 2.0), bm(0.0, 1.0) + bm(1.0, 2.0))
    assert float(bm(0.3, 0.3).abs().max()) == 0.0


def test_kmeans_inducing_and_bad_input(float64):
    X = torch.cat([torch.randn(30, 2) * 0.01, torch.randn(30, 2) * 0.01 + 5])
    Z = kmeans_inducing(X, 2)
    assert sorted(Z.sum(-1).round().tolist()) == [0.0, 10.0]
    with pytest.raises(ValueError, match="num_inducing"):
        kmeans_inducing(X, 100)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_inducing(torch.full((3, 2), float("nan")), 2)


def test_flow_kernel_validation():
    with pytest.raises(ValueError, match="batch shape"):
        FlowKernel(3, gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])))
    with pytest.raises(ValueError, match="RBF or Matern"):
        FlowKernel(3, gpytorch.kernels.LinearKernel(), lengthscale_prior=dist.LogNormal(0.0, 1.0))
    with pytest.raises(ValueError, match="scalar"):
        FlowKernel(3, lengthscale_prior=dist.LogNormal(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match=r"event shape \(2,\)"):
        FlowKernel(2, lengthscale_prior=dist.LogNormal(torch.zeros(2), 1.0).to_event(1))
    with pytest.raises(ValueError, match="outputscale_prior must have positive support"):
        FlowKernel(2, outputscale_prior=dist.Normal(0.0, 1.0))
    FlowKernel(2, lengthscale_prior=dist.HalfNormal(1.0), outputscale_prior=dist.Gamma(2.0, 1.0))  # accepted


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jittered_cholesky(3 * torch.eye(2), -1.0), "jitter"),
        (lambda: jittered_cholesky(torch.eye(2), True), "jitter"),
        (lambda: GridBrownian(0.0, 4, (2, 1)), "horizon"),
        (lambda: GridBrownian(float("nan"), 4, (2, 1)), "horizon"),
        (lambda: GridBrownian(1.0, 0, (2, 1)), "num_steps"),
        (lambda: GridBrownian(1.0, True, (2, 1)), "num_steps"),
        (lambda: GridBrownian(1.0, 2.5, (2, 1)), "num_steps"),
        (lambda: kmeans_inducing(torch.randn(5, 2), 2.5), "num_inducing"),
        (lambda: kmeans_inducing(torch.randn(5, 2), 2, iters=0), "iters"),
        (lambda: default_flow_kernel(0), "dim"),
        (lambda: default_flow_kernel(2, outputscale=-0.1), "outputscale"),
        (lambda: FlowKernel(2.5), "dim"),
    ],
)
def test_bad_input_is_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()
