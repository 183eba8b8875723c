"""How wide is SWAG's weight spread against the posterior's? SWAG beside a linearised Laplace reference.

Constant-rate SGD with minibatches of size B and rate eta on the mean loss L has (in the Ornstein-Uhlenbeck
limit, gradient noise covariance C / B with C close to the Hessian H at the optimum) the stationary
covariance solving

.. math:: H \\Sigma + \\Sigma H = \\frac{\\eta}{B} C, \\qquad \\Sigma \\approx \\frac{\\eta}{2B} I,

(Mandt et al., 2017), isotropic whatever the data, while the Laplace posterior is
:math:`(N H + \\lambda I)^{-1}`, whose spread in function space shrinks with N / sigma^2. So SWAG's predictive
spread should exceed the posterior's most on the large, low-noise sets, where SWAG loses to SWA.

For each set and split this trains the network of ``benchmarks/swag.py`` exactly as that benchmark does (same
seed, schedule and SWAG statistics), then compares at the test inputs, in standardised units:

* SWAG's epistemic variance (the variance over 200 SWAG draws of the network's mean, scale 0.5);
* the linearised Laplace (generalised Gauss-Newton) variance at the SWA mean,
  :math:`J_x (J^\\top J / \\sigma^2 + N w I)^{-1} J_x^\\top` with the SWA network's learned noise sigma^2 and the
  prior precision N w from SGD's weight decay w (the noise parameter held fixed);

and the test NLL of SWA, SWAG and the Laplace predictive N(f_SWA(x), sigma^2 + Laplace variance). With the weak
weight-decay prior the Laplace variance is far too wide on the smallest sets, so the same is repeated with the
prior precision that maximises the Laplace evidence (:func:`evidence_prior_precision`).

    python benchmarks/swag_spread_probe.py --splits 0,1,2 --out benchmarks/results/swag_spread_probe.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import swag as swag_benchmark  # noqa: E402

from pyro_gpx.datasets import load_uci  # noqa: E402


def network_jacobian(net: torch.nn.Module, X: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """d f(x) / d theta for every row of ``X`` (the mean network's parameters, flattened): (n, P), float64."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, x):
        return functional_call(net, p, (x[None],))[0, 0]

    rows = []
    for i in range(0, X.shape[0], chunk):
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, X[i : i + chunk])
        rows.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], 1).double())
    return torch.cat(rows)


def laplace_variance(ggn: torch.Tensor, J_test: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """Diagonal of :math:`J_* (G + \\lambda I)^{-1} J_*^T`, with the GGN :math:`G = J^T J / \\sigma^2`, by one
    Cholesky factor."""
    L = torch.linalg.cholesky(ggn + prior_precision * torch.eye(ggn.shape[0], dtype=ggn.dtype))
    A = torch.linalg.solve_triangular(L, J_test.T, upper=False)
    return (A**2).sum(0)


def evidence_prior_precision(ggn: torch.Tensor, theta: torch.Tensor) -> float:
    """The prior precision that maximises the Laplace evidence at ``theta`` on a log grid (10^-4 .. 10^4), given
    the GGN :math:`G = J^\\top J / \\sigma^2`.

    .. math:: \\log Z(\\alpha) = \\log p(y \\mid \\theta) - \\tfrac{\\alpha}{2}\\lVert\\theta\\rVert^2
        + \\tfrac{P}{2}\\log\\alpha - \\tfrac12 \\log\\det(J^\\top J / \\sigma^2 + \\alpha I),

    the usual post-hoc choice for a linearised Laplace (the likelihood term does not depend on alpha).
    """
    eigenvalues = torch.linalg.eigvalsh(ggn).clamp(min=0.0)
    grid = torch.logspace(-4, 4, 161, dtype=torch.float64)
    sq_norm = float((theta.double() ** 2).sum())
    log_z = [-0.5 * a * sq_norm + 0.5 * len(eigenvalues) * torch.log(a) - 0.5 * torch.log(eigenvalues + a).sum()
             for a in grid]  # fmt: skip
    return float(grid[int(torch.stack(log_z).argmax())])


def run_split(dataset: str, split_id: int, args, records: list) -> None:
    split = load_uci(dataset, split_id, args.data_dir, dtype=torch.float32)
    # homoscedastic network: the Laplace comparison below reads one noise variance off the SWA network
    cfg = {**swag_benchmark._config(dataset, split.n_train, args.quick), "heteroscedastic": False}
    _, swag, timing = swag_benchmark.train_swag(split, cfg, seed=args.seed)
    swa_net = swag.swa_into(swag_benchmark.Regressor(split.dim, cfg["hidden"]))
    with torch.no_grad():
        swa_mean, swa_var = swa_net(split.X_test)
    noise = float(swa_var[0])
    means, variances = swag_benchmark._swag_samples([swag], split.X_test, 200, False, 0.5, seed=1)
    swag_var = means.double().var(0)
    J_train = network_jacobian(swa_net.net, split.X_train)
    J_test = network_jacobian(swa_net.net, split.X_test)
    ggn = J_train.T @ J_train / noise  # once: both prior precisions and the evidence use it
    lap_var = laplace_variance(ggn, J_test, split.n_train * cfg["weight_decay"])
    ratio = (swag_var / lap_var).median().item()
    theta = torch.cat([p.detach().reshape(-1) for p in swa_net.net.parameters()])
    alpha = evidence_prior_precision(ggn, theta)
    ev_var = laplace_variance(ggn, J_test, alpha)
    out = {
        "n_train": split.n_train,
        "num_params": J_train.shape[1],
        "noise_variance": noise,
        "swag_var_over_noise": (swag_var / noise).median().item(),
        "laplace_var_over_noise": (lap_var / noise).median().item(),
        "swag_over_laplace": ratio,
        "nll_swa": swag_benchmark._evaluate(split, swa_mean[None], swa_var[None])["nll"],
        "nll_swag": swag_benchmark._evaluate(split, means, variances)["nll"],
        "nll_laplace": swag_benchmark._evaluate(split, swa_mean[None], (noise + lap_var.float())[None])["nll"],
        "prior_precision_evidence": alpha,
        "swag_over_laplace_evidence": (swag_var / ev_var).median().item(),
        "nll_laplace_evidence": swag_benchmark._evaluate(split, swa_mean[None], (noise + ev_var.float())[None])["nll"],
        "train_seconds": timing["train_seconds"],
    }
    records.append(harness.record("swag_spread_probe", dataset, split_id, "SWAG vs linearised Laplace", "ours", **out))
    print(f"{dataset:>24} {split_id}: noise {noise:.2e}  SWAG var / noise {out['swag_var_over_noise']:.3g}  "
          f"Laplace var / noise {out['laplace_var_over_noise']:.3g}  SWAG / Laplace {ratio:.3g}  NLL SWA "
          f"{out['nll_swa']:.3f} SWAG {out['nll_swag']:.3f} Laplace {out['nll_laplace']:.3f}; evidence prior "
          f"{alpha:.3g}: SWAG / Laplace {out['swag_over_laplace_evidence']:.3g} NLL {out['nll_laplace_evidence']:.3f}",
          flush=True)  # fmt: skip


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], default_datasets=swag_benchmark.GAL + swag_benchmark.LARGE,
                              default_splits=[0, 1, 2], quick_datasets=["yacht"], quick_splits=[0],
                              argv=argv)  # fmt: skip
    torch.set_num_threads(1)
    records: list[dict] = []
    for dataset in args.datasets:
        for split_id in args.splits:
            run_split(dataset, split_id, args, records)
            harness.write_json(records, args.out)
    for dataset in args.datasets:
        rows = [r for r in records if r["dataset"] == dataset]
        ratio = statistics.median(r["swag_over_laplace"] for r in rows)
        print(f"{dataset:>24}: median SWAG / Laplace variance {ratio:.3g}")
    return records


if __name__ == "__main__":
    main()
