"""Predictive metrics for regression (in whatever units the caller passes: use original units) and
classification (accuracy, NLL, calibration, out-of-distribution AUROC).

All functions validate their inputs (shapes, finite values, positive variances, labels in range,
probabilities that sum to one) and raise ``ValueError`` naming the argument instead of returning NaN.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from ._validation import check_finite, check_positive_int, is_finite_at_least

__all__ = [
    "rmse",
    "gaussian_nll",
    "mixture_gaussian_nll",
    "gaussian_coverage",
    "sample_coverage",
    "classification_metrics",
    "expected_calibration_error",
    "auroc",
]


def _as_float(name: str, x) -> torch.Tensor:
    """``x`` (a tensor, NumPy array, sequence or number) as a float64 tensor (metrics are computed in float64:
    a float32 squared residual of 1e20 would overflow)."""
    try:
        if isinstance(x, int | float):
            x = torch.tensor(float(x), dtype=torch.float64)
        elif not torch.is_tensor(x):  # a list through torch.as_tensor would be rounded to float32 first
            x = torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}") from None
    if x.dtype.is_complex:
        raise ValueError(f"{name} must be real, got {x.dtype}")
    return x.to(torch.float64)


def _check(name: str, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` as floating vectors of one length, finite; ``ValueError`` naming the argument."""
    y = _as_float("y", y)
    if y.dim() != 1 or y.numel() == 0:
        raise ValueError(f"y must be a non-empty vector (n,), got shape {tuple(y.shape)}")
    x = _as_float(name, x)
    if x.shape != y.shape:
        hint = " (for posterior draws (S, n) use mixture_gaussian_nll / sample_coverage)" if x.dim() == 2 else ""
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({y.shape[0]},) like y{hint}")
    check_finite("y", y)
    check_finite(name, x)
    return x, y


def _check_variance(name: str, var, y) -> torch.Tensor:
    var = _check(name, var, y)[0]
    if (var <= 0).any():
        raise ValueError(f"{name} must be positive")
    return var


def _check_level(level) -> float:
    if not is_finite_at_least(level, 0.0, strict=True) or not float(level) < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared error of a point prediction ``(n,)`` (for draws, pass their mean)."""
    mean, y = _check("mean", mean, y)
    return float(((mean - y) ** 2).mean().sqrt())


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    r"""Average negative log density of ``y`` under :math:`N(\mu_i, \sigma_i^2)` (``mean``, ``var``
    and ``y`` all ``(n,)``; for an average over posterior draws use :func:`mixture_gaussian_nll`)."""
    mean, y = _check("mean", mean, y)
    var = _check_variance("var", var, y)
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean())


def mixture_gaussian_nll(means: torch.Tensor, vars: torch.Tensor, y: torch.Tensor) -> float:
    r"""NLL under an equal-weight mixture over draws :math:`s`:
    :math:`-\frac1n\sum_i \log \frac1S \sum_s N(y_i \mid \mu_{si}, \sigma^2_{si})`.

    :param means: ``(S, n)`` predictive means per posterior draw.
    :param vars: ``(S, n)`` (or broadcastable) predictive variances per draw, noise included.
    """
    means = _as_float("means", means)
    if means.dim() != 2 or means.shape[0] == 0:
        raise ValueError(f"means must be (S, n) with S >= 1, got shape {tuple(means.shape)}")
    y = _as_float("y", y)
    if y.dim() != 1 or y.numel() == 0 or means.shape[1] != y.shape[0]:
        raise ValueError(f"means must be (S, n) and y (n,), got {tuple(means.shape)} and {tuple(y.shape)}")
    check_finite("y", y)
    check_finite("means", means)
    vars = _as_float("vars", vars)
    try:
        vars = vars.expand_as(means)
    except RuntimeError:
        raise ValueError(f"vars of shape {tuple(vars.shape)} do not broadcast to means' {tuple(means.shape)}") from None
    check_finite("vars", vars)
    if (vars <= 0).any():
        raise ValueError("vars must be positive")
    log_p = -0.5 * torch.log(2 * math.pi * vars) - 0.5 * (y - means) ** 2 / vars
    return float(-(torch.logsumexp(log_p, 0) - math.log(means.shape[0])).mean())


def gaussian_coverage(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, level: float = 0.95) -> float:
    r"""Fraction of ``y`` inside the central ``level`` interval of :math:`N(\mu_i, \sigma_i^2)`."""
    mean, y = _check("mean", mean, y)
    var = _check_variance("var", var, y)
    level = _check_level(level)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float(((y - mean).abs() <= z * var.sqrt()).double().mean())


def sample_coverage(samples: torch.Tensor, y: torch.Tensor, level: float = 0.95) -> float:
    """Fraction of ``y`` inside the central ``level`` interval of predictive ``samples`` ``(S, n)``."""
    samples = _as_float("samples", samples)
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be (S, n) draws with S >= 1, got shape {tuple(samples.shape)}")
    y = _as_float("y", y)
    if y.dim() != 1 or y.numel() == 0 or samples.shape[1] != y.shape[0]:
        raise ValueError(f"samples must be (S, n) and y (n,), got {tuple(samples.shape)} and {tuple(y.shape)}")
    check_finite("y", y)
    check_finite("samples", samples)
    level = _check_level(level)
    q = torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=samples.dtype)
    lo, hi = torch.quantile(samples, q, dim=0)
    return float(((y >= lo) & (y <= hi)).double().mean())


def _check_probs(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    probs = _as_float("probs", probs)
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be integer class indices, got {type(labels).__name__}") from None
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"probs must be (n, C) and labels (n,) with n >= 1, got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if (probs.sum(-1) - 1).abs().max() > 1e-3:
        raise ValueError("probs must sum to 1 over the classes (each row)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[-1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[-1]}), got values in [{labels.min()}, {labels.max()}]")
    return probs, labels.long()  # gather needs int64 (uint8 / int16 labels)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    r"""ECE with equal-width confidence bins: :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`."""
    probs, labels = _check_probs(probs, labels)
    num_bins = check_positive_int("num_bins", num_bins)
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    bins = torch.clamp((conf * num_bins).long(), max=num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            total += float(inside.sum()) / len(labels) * abs(float(correct[inside].mean() - conf[inside].mean()))
    return total


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL (nats per point) and ECE of predictive class probabilities ``(n, C)``. A point whose
    true class has probability 0 makes the NLL infinite (no floor is applied)."""
    probs, labels = _check_probs(probs, labels)
    picked = probs.gather(-1, labels[:, None])[:, 0]
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-picked.log().mean()) + 0.0,  # + 0.0: no "-0.0" for perfect predictions
        "ece": expected_calibration_error(probs, labels),
    }


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling out-of-distribution points (higher score) from in-distribution
    ones: the probability that a random out-point outscores a random in-point (ties count half)."""
    scores_in, scores_out = _as_float("scores_in", scores_in), _as_float("scores_out", scores_out)
    if scores_in.dim() != 1 or scores_out.dim() != 1 or not len(scores_in) or not len(scores_out):
        raise ValueError("scores_in and scores_out must be non-empty vectors")
    check_finite("scores_in", scores_in)
    check_finite("scores_out", scores_out)
    # for each out-point, the in-points below it and those tied with it (sorted search, no n_in x n_out matrix)
    ordered = torch.sort(scores_in.double()).values
    out = scores_out.double()
    below = torch.searchsorted(ordered, out, right=False)
    not_above = torch.searchsorted(ordered, out, right=True)
    wins = below.double().sum() + 0.5 * (not_above - below).double().sum()
    return float(wins / (len(scores_in) * len(scores_out)))
