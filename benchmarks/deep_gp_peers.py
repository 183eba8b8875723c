r"""GPyTorch peer methods for the Differential-GP benchmark: a sparse variational GP and a two-layer
doubly-stochastic deep GP, trained and scored the same way so ``diffgp.py`` can put them side by side.

* :func:`run_svgp`: the stochastic variational GP of Hensman, Fusi & Lawrence (2013), "Gaussian
  processes for big data" (UAI): :math:`M` learnt inducing inputs, a full-covariance Gaussian
  :math:`q(u)` over whitened inducing outputs, ARD RBF kernel, minibatch ELBO with Adam.
* :func:`run_dgp`: the doubly-stochastic deep GP of Salimbeni & Deisenroth (2017), "Doubly stochastic
  variational inference for deep Gaussian processes" (NeurIPS), built from GPyTorch's ``DeepGP`` /
  ``DeepGPLayer`` as in GPyTorch's "Deep Gaussian Processes" example. Two layers: a hidden layer of
  :math:`h = \min(d, 30)` independent GPs (the paper's width) with a linear mean function initialised
  to the identity (to the top-:math:`h` principal directions when :math:`d > 30`, the paper's PCA
  mean), then one output GP with a constant mean. Every :math:`q(u)` starts at the whitened prior, as
  in GPyTorch (the paper shrinks the hidden layer's ``q_sqrt`` by :math:`10^{-5}`; set
  ``INNER_QSQRT_FACTOR = 1e-5`` for that: on yacht, 277 training points, the resulting initial KL of
  about 24 nats per point left the ELBO ~3 nats per point worse after 1000 epochs). The ELBO's
  expected log likelihood is estimated with ``num_samples`` Monte Carlo samples propagated through the
  layers; predictions use the same number of samples and are the equal-weight mixture of the
  per-sample Gaussians.

Both use k-means centres of the training inputs (:func:`pyro_gpx.diffgp.inducing.kmeans_inducing`) as
initial inducing inputs (the output layer of the DGP gets them mapped through the hidden layer's
initial mean), noise variance 0.01 on standardised targets, and report test RMSE, NLL per point and
95% coverage in original target units.

    python benchmarks/deep_gp_peers.py   # smoke run on yacht split 0
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import gpytorch
import torch
from linear_operator.utils.errors import NotPSDError

from pyro_gpx.datasets import RegressionSplit
from pyro_gpx.diffgp.inducing import kmeans_inducing
from pyro_gpx.metrics import gaussian_coverage, gaussian_nll, mixture_gaussian_nll, rmse

__all__ = ["run_svgp", "run_dgp"]

INITIAL_NOISE = 0.01  # likelihood noise variance, standardised targets
MAX_HIDDEN_WIDTH = 30  # Salimbeni & Deisenroth (2017): hidden width min(d, 30)
INNER_QSQRT_FACTOR = 1.0  # hidden layer's initial q_sqrt / prior's; Salimbeni & Deisenroth (2017) use 1e-5
PREDICT_CHUNK = 1024  # test rows per prediction call


# -- models -------------------------------------------------------------------------------------------
class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, Z: torch.Tensor) -> None:
        distribution = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(self, Z, distribution, learn_inducing_locations=True)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=Z.shape[-1]))

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _DGPLayer(gpytorch.models.deep_gps.DeepGPLayer):
    """One layer of independent GPs (``output_dims`` of them, or a single squeezed one if ``None``)
    sharing the initial inducing inputs ``Z`` ``(M, input_dims)``."""

    def __init__(self, Z: torch.Tensor, output_dims: int | None, mean: gpytorch.means.Mean) -> None:
        input_dims = Z.shape[-1]
        batch_shape = torch.Size([]) if output_dims is None else torch.Size([output_dims])
        inducing = Z.clone() if output_dims is None else Z.expand(output_dims, *Z.shape).clone()
        distribution = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0], batch_shape=batch_shape)
        strategy = gpytorch.variational.VariationalStrategy(self, inducing, distribution, learn_inducing_locations=True)
        super().__init__(strategy, input_dims, output_dims)
        self.mean_module = mean
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(batch_shape=batch_shape, ard_num_dims=input_dims), batch_shape=batch_shape
        )

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _DGP2(gpytorch.models.deep_gps.DeepGP):
    """Two-layer doubly-stochastic deep GP: hidden layer of ``W.shape[1]`` GPs with linear mean
    ``x @ W`` at initialisation, then one output GP with a constant mean."""

    def __init__(self, Z: torch.Tensor, W: torch.Tensor) -> None:
        super().__init__()
        d, h = W.shape
        hidden_mean = gpytorch.means.LinearMean(d, batch_shape=torch.Size([h]))
        with torch.no_grad():
            hidden_mean.weights.copy_(W.T.unsqueeze(-1))  # (h, d, 1)
            hidden_mean.bias.zero_()
        self.hidden_layer = _DGPLayer(Z, h, hidden_mean)
        self.last_layer = _DGPLayer(Z @ W, None, gpytorch.means.ConstantMean())
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood()

        if INNER_QSQRT_FACTOR != 1.0:  # start the hidden q(u) at N(~0, factor^2 I) (whitened), not the prior
            strategy = self.hidden_layer.variational_strategy
            distribution = strategy._variational_distribution
            distribution.initialize_variational_distribution(strategy.prior_distribution)
            strategy.variational_params_initialized.fill_(1)
            with torch.no_grad():
                distribution.chol_variational_covar.mul_(INNER_QSQRT_FACTOR)

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return self.last_layer(self.hidden_layer(x))


def _hidden_projection(X: torch.Tensor, width: int) -> torch.Tensor:
    """``(d, width)`` initial weights of the hidden layer's linear mean: the identity when ``width == d``,
    else the top-``width`` principal directions of ``X``."""
    d = X.shape[1]
    if width == d:
        return torch.eye(d, dtype=X.dtype)
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    return Vh[:width].T.contiguous()


# -- shared training / scoring --------------------------------------------------------------------------
def _check_args(split: RegressionSplit, epochs: int, batch: int, lr: float, num_inducing: int) -> int:
    if epochs < 1 or batch < 1 or num_inducing < 1 or not lr > 0:
        raise ValueError(
            f"epochs, batch, num_inducing must be >= 1 and lr > 0; got {epochs=}, {batch=}, {num_inducing=}, {lr=}"
        )
    return min(num_inducing, split.n_train)


def _train(
    name: str,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> tuple[float, float]:
    """Adam on ``loss_fn(X_batch, y_batch)`` over ``epochs`` shuffled passes; returns (seconds, last epoch's
    mean loss). Raises :class:`FloatingPointError` naming ``name`` on a non-finite loss or a failed Cholesky."""
    optim = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    epoch_loss = math.nan
    start = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        perm = torch.randperm(n, generator=gen)
        for pos in range(0, n, batch):
            idx = perm[pos : pos + batch]
            optim.zero_grad()
            try:
                loss = loss_fn(X[idx], y[idx])
            except NotPSDError as err:
                raise FloatingPointError(f"{name}: Cholesky failed at epoch {epoch} ({err})") from err
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: training loss became non-finite ({value}) at epoch {epoch}")
            loss.backward()
            optim.step()
            total += value * len(idx)
        epoch_loss = total / n
    return time.perf_counter() - start, epoch_loss


def _chunks(X: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(X, PREDICT_CHUNK))


def _result(metrics: dict, seconds: float, epochs: int, final_loss: float, num_inducing: int) -> dict:
    return {
        **metrics,
        "train_seconds": seconds,
        "seconds_per_epoch": seconds / epochs,
        "epochs": epochs,
        "final_loss": final_loss,
        "num_inducing": num_inducing,
    }


# -- the two peers --------------------------------------------------------------------------------------
def run_svgp(
    split: RegressionSplit,
    *,
    epochs: int,
    batch: int,
    lr: float,
    num_inducing: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Train GPyTorch's SVGP (Hensman et al. 2013) on ``split`` and score it on the test set.

    :returns: ``rmse``, ``nll`` (per test point), ``coverage95`` (original units), ``train_seconds``,
        ``seconds_per_epoch``, ``epochs``, ``final_loss`` (last epoch's mean negative ELBO per point),
        ``num_inducing`` (after capping at ``n_train``).
    :raises FloatingPointError: if training diverges.
    """
    num_inducing = _check_args(split, epochs, batch, lr, num_inducing)
    torch.manual_seed(seed)
    X, y = split.X_train.to(dtype), split.y_train.to(dtype)
    model = _SVGP(kmeans_inducing(X, num_inducing, seed=seed)).to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    likelihood.noise = INITIAL_NOISE
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))
    model.train()
    likelihood.train()
    seconds, final_loss = _train(
        "GPyTorch SVGP (run_svgp)",
        [*model.parameters(), *likelihood.parameters()],
        lambda xb, yb: -mll(model(xb), yb),
        X,
        y,
        epochs=epochs,
        batch=batch,
        lr=lr,
        seed=seed,
    )

    model.eval()
    likelihood.eval()
    means, variances = [], []
    with torch.no_grad():
        for xb in _chunks(split.X_test.to(dtype)):
            pred = likelihood(model(xb))
            means.append(pred.mean)
            variances.append(pred.variance)
    mean = split.y_scaler.inverse(torch.cat(means).double())
    var = split.y_scaler.inverse_variance(torch.cat(variances).double())
    y_test = split.y_test_original.double()
    metrics = {
        "rmse": rmse(mean, y_test),
        "nll": gaussian_nll(mean, var, y_test),
        "coverage95": gaussian_coverage(mean, var, y_test),
    }
    return _result(metrics, seconds, epochs, final_loss, num_inducing)


def run_dgp(
    split: RegressionSplit,
    *,
    epochs: int,
    batch: int,
    lr: float,
    num_inducing: int,
    num_samples: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Train a two-layer doubly-stochastic deep GP (Salimbeni & Deisenroth 2017) with GPyTorch's
    ``DeepGP`` on ``split`` and score it on the test set.

    ``num_samples`` Monte Carlo samples are propagated through the hidden layer both in training (ELBO
    estimate) and at test time. The test NLL is that of the equal-weight mixture of the per-sample
    Gaussian predictives (log-mean-exp of their densities, in original units); coverage uses the Gaussian
    with the mixture's mean and variance.

    :returns: as :func:`run_svgp`, plus ``hidden_width``.
    :raises FloatingPointError: if training diverges.
    """
    num_inducing = _check_args(split, epochs, batch, lr, num_inducing)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    torch.manual_seed(seed)
    X, y = split.X_train.to(dtype), split.y_train.to(dtype)
    width = min(split.dim, MAX_HIDDEN_WIDTH)
    model = _DGP2(kmeans_inducing(X, num_inducing, seed=seed), _hidden_projection(X, width)).to(dtype)
    model.likelihood.noise = INITIAL_NOISE
    mll = gpytorch.mlls.DeepApproximateMLL(gpytorch.mlls.VariationalELBO(model.likelihood, model, num_data=len(y)))
    model.train()
    with gpytorch.settings.num_likelihood_samples(num_samples):
        seconds, final_loss = _train(
            "GPyTorch DGP-2 (run_dgp)",
            list(model.parameters()),
            lambda xb, yb: -mll(model(xb), yb),
            X,
            y,
            epochs=epochs,
            batch=batch,
            lr=lr,
            seed=seed,
        )

    model.eval()
    means, variances = [], []
    with torch.no_grad(), gpytorch.settings.num_likelihood_samples(num_samples):
        for xb in _chunks(split.X_test.to(dtype)):
            pred = model.likelihood(model(xb))  # batch (num_samples,) of Gaussians over the chunk
            means.append(pred.mean)
            variances.append(pred.variance)
    means_o = split.y_scaler.inverse(torch.cat(means, -1).double())  # (S, n_test)
    vars_o = split.y_scaler.inverse_variance(torch.cat(variances, -1).double())
    mean = means_o.mean(0)
    var = vars_o.mean(0) + means_o.var(0, unbiased=False)  # law of total variance
    y_test = split.y_test_original.double()
    metrics = {
        "rmse": rmse(mean, y_test),
        "nll": mixture_gaussian_nll(means_o, vars_o, y_test),
        "coverage95": gaussian_coverage(mean, var, y_test),
    }
    return {**_result(metrics, seconds, epochs, final_loss, num_inducing), "hidden_width": width}


if __name__ == "__main__":
    from harness import DEFAULT_DATA_DIR

    from pyro_gpx.datasets import load_uci

    yacht = load_uci("yacht", 0, data_dir=DEFAULT_DATA_DIR)
    print("svgp", run_svgp(yacht, epochs=5, batch=256, lr=0.01, num_inducing=50, seed=0))
    print("dgp", run_dgp(yacht, epochs=5, batch=256, lr=0.01, num_inducing=50, num_samples=5, seed=0))
