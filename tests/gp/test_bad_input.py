"""The GP package's public helpers name a malformed argument (from a sweep of the public API: integer
inputs gave NaN kernels, NaN residuals NaN refits with converged=True, bools counted as 1, 2.5 as 2)."""

import warnings

import gpytorch
import pyro
import pytest
import torch

from pyro_gpx.gp import (
    BlockSparsePolicy,
    CGPolicy,
    ComputationAwareGP,
    IndexActions,
    KernelFn,
    PseudoInputPolicy,
    RandomSketchPolicy,
    UnitVectorPolicy,
    conjugate_gradients,
    exact_log_marginal_likelihood,
    independent_columns,
    kernel_diag,
    kernel_matmul,
    partial_cholesky,
    random_partition,
    refit_outputscale_noise,
    subset_refit_kernel_noise,
    subset_refit_outputscale_noise,
)

GEN = torch.Generator().manual_seed(0)
X = torch.rand(20, 2, generator=GEN, dtype=torch.float64)
Y = torch.sin(X.sum(1))
KFN = KernelFn(gpytorch.kernels.RBFKernel().double())
NAN_Y = Y.clone()
NAN_Y[3] = float("nan")
NAN_X = X.clone()
NAN_X[0, 0] = float("nan")


def _gram(V):
    return (KFN(X, X) + 0.1 * torch.eye(20, dtype=torch.float64)) @ V


CASES = [
    (lambda: KFN(X.long(), X.long()), TypeError, "X1 has dtype torch.int64"),
    (lambda: kernel_diag(KFN, X.long()), TypeError, "X has dtype torch.int64"),
    (lambda: kernel_matmul(KFN, NAN_X, X, torch.ones(20, 1, dtype=torch.float64)), ValueError, "X1 contains NaN"),
    (
        lambda: kernel_matmul(KFN, X, X, torch.full((20, 1), float("nan"), dtype=torch.float64)),
        ValueError,
        "V contains",
    ),
    (lambda: KFN.scaled(True), ValueError, "multiplier must be a positive finite number"),
    (lambda: partial_cholesky(KFN, X, True), ValueError, "rank must be a positive integer"),
    (lambda: partial_cholesky(KFN, X, 2.5), ValueError, "rank must be a positive integer"),
    (lambda: partial_cholesky(KFN, X, 5, tol=-1.0), ValueError, "tol must be a finite number >= 0"),
    (lambda: partial_cholesky(KFN, NAN_X, 5), ValueError, "X contains NaN"),
    (lambda: conjugate_gradients(_gram, Y, True), ValueError, "max_iter must be a positive integer"),
    (lambda: conjugate_gradients(_gram, Y, 5, tol=float("nan")), ValueError, "tol must be a finite number"),
    (lambda: exact_log_marginal_likelihood(KFN, X, NAN_Y, torch.tensor(0.1)), ValueError, "residual contains NaN"),
    (lambda: exact_log_marginal_likelihood(KFN, X, Y[:-1], torch.tensor(0.1)), ValueError, r"residual has shape"),
    (lambda: exact_log_marginal_likelihood(KFN, X, Y, True), ValueError, "noise must be a positive finite"),
    (lambda: subset_refit_outputscale_noise(KFN, X, NAN_Y, 0.1), ValueError, "residual contains NaN"),
    (lambda: refit_outputscale_noise(_gram, Y, X, 0.1, max_iter=0), ValueError, "max_iter must be a positive"),
    # zero targets: a ZeroDivisionError, a 'math domain error', and converged=True from the kernel refit
    (lambda: refit_outputscale_noise(_gram, 0 * Y, X, 0.1), ValueError, "the residual y - mean is zero"),
    (lambda: subset_refit_outputscale_noise(KFN, X, 0 * Y, 0.1), ValueError, "the residual y - mean is zero"),
    (lambda: subset_refit_kernel_noise(KFN, X, 0 * Y, 0.1), ValueError, "the residual y - mean is zero"),
    (lambda: IndexActions(torch.tensor([0, 25]), 20), ValueError, r"indices must lie in \[0, 20\)"),
    (lambda: IndexActions(torch.tensor([0.0, 2.5]), 20), TypeError, "indices must hold integer row numbers"),
    (lambda: IndexActions(torch.tensor([1, 1]), 20), ValueError, "indices must not repeat"),
    (lambda: IndexActions(torch.tensor([1]), True), ValueError, "num_data must be a positive integer"),
    (lambda: random_partition(20, True), ValueError, "num_blocks must be a positive integer"),
    (lambda: independent_columns(torch.eye(3, dtype=torch.float64), rtol=float("nan")), ValueError, "rtol must"),
    (lambda: PseudoInputPolicy(10), ValueError, r"inducing_points must be a \(m, d\) tensor, got int"),
    (lambda: ComputationAwareGP(X, Y, "rbf"), TypeError, "kernel must be a kernel"),
    (lambda: ComputationAwareGP(X, Y, KFN.kernel, mean_function=1.0), TypeError, "mean_function must be callable"),
    (lambda: ComputationAwareGP(X, Y, KFN.kernel, noise=True), ValueError, "noise must be a positive finite"),
    (lambda: ComputationAwareGP(X, Y, KFN.kernel, policy=UnitVectorPolicy())(None), ValueError, "Xnew must be a"),
]


@pytest.mark.parametrize("call, error, match", CASES, ids=range(len(CASES)))
def test_malformed_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("policy", [UnitVectorPolicy(), CGPolicy(5), BlockSparsePolicy(5), RandomSketchPolicy(5)])
def test_a_batched_or_misshapen_kernel_is_named(policy):
    # a GPyTorch kernel with a batch shape failed with a raw IndexError ('index 2 is out of bounds') or a
    # matmul shape error, depending on the policy; a callable of the wrong shape likewise
    pyro.clear_param_store()
    batched = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])).double()
    with pytest.raises(ValueError, match=r"expected \(20, 20\) \(a batched kernel, batch_shape \(2,\)"):
        ComputationAwareGP(X, Y, batched, policy=policy).marginal().log_prob(Y)
    with pytest.raises(ValueError, match=r"returned shape \(3, 3\) for inputs of 20 and 20 rows"):
        KernelFn(lambda a, b: torch.ones(3, 3, dtype=torch.float64))(X, X)


def test_the_checks_of_a_learnable_noise_do_not_warn():
    # float() of a parameter that requires grad warns on every step ('Converting a tensor with
    # requires_grad=True to a scalar'): the checks read it detached
    X = torch.linspace(0, 1, 30, dtype=torch.float64)[:, None]
    y = torch.sin(6 * X[:, 0])
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    gp = ComputationAwareGP(X, y, kernel, policy=CGPolicy(num_actions=10), noise=0.01)
    svi = pyro.infer.SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step()
        gp(X[:3])


def _latent_lengthscale_gp(d=1):
    from pyro.contrib.gp.kernels import RBF
    from pyro.nn import PyroSample

    X2 = torch.rand(20, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = RBF(d)
    kernel.lengthscale = PyroSample(pyro.distributions.LogNormal(-1.0, 0.5))
    return ComputationAwareGP(X2, torch.sin(6 * X2[:, 0]), kernel, policy=UnitVectorPolicy(), noise=0.01)


@pytest.mark.parametrize("d", [1, 2])
def test_batched_hyperparameter_draws_are_refused(d):
    # P draws of a lengthscale were read as P ARD lengthscales (a product kernel) and the scalar
    # marginal counted once: with 8 vectorised particles the loss read -7.8 against 141.4, silently;
    # with d = 2 inputs and 2 particles the shapes even fit
    pyro.clear_param_store()
    gp = _latent_lengthscale_gp(d)
    guide = pyro.infer.autoguide.AutoNormal(gp.model)
    loss = pyro.infer.Trace_ELBO(num_particles=2, max_plate_nesting=0).loss(gp.model, guide)
    assert torch.isfinite(torch.tensor(loss))
    with pytest.raises(NotImplementedError, match=r"vectorize_particles=False or Predictive\(\.\.\., parallel=False\)"):
        pyro.infer.Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=0).loss(gp.model, guide)
    samples = {"kernel.lengthscale": torch.tensor([0.1, 0.3, 1.0])}
    with pytest.raises(NotImplementedError, match=r"_num_predictive_samples\(3\)"):
        pyro.infer.Predictive(gp.model, samples, parallel=True)()
    assert pyro.infer.Predictive(gp.model, samples)()["y"].shape == (3, 20)
    conditioned = pyro.poutine.condition(gp.forward, data={"kernel.lengthscale": torch.tensor([0.1, 0.3, 1.0])})
    with pytest.raises(ValueError, match=r"lengthscale has shape \(3,\): expected 1 or 2 value|expected 1 value"):
        conditioned(gp.X[:4])


def test_independent_gps_in_a_sequential_plate_run():
    # a sequential plate adds no batch dim: only vectorised ones are refused
    from pyro.contrib.autoname import scope

    gps = [_latent_lengthscale_gp() for _ in range(2)]

    def model():
        for i in pyro.plate("tasks", 2):
            with scope(prefix=f"task{i}"):
                gps[i].model()

    trace = pyro.poutine.trace(model).get_trace()
    assert {"task0/y", "task1/y"} <= set(trace.nodes)
