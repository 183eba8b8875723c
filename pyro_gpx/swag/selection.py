r"""Choosing the SWAG sampling scale on held-out data.

SWAG samples :math:`\theta = \bar\theta + \sqrt{s}\,\big(\Sigma_{\rm diag}^{1/2} z_1 +
\hat D z_2 / \sqrt{K-1}\big)`, with covariance :math:`s\,(\Sigma_{\rm diag} + \hat D\hat D^\top/(K-1))`;
the scale :math:`s` (0.5 in [1], which gives the paper's :math:`\Sigma = \tfrac12(\Sigma_{\rm diag} +
\hat D\hat D^\top/(K-1))`) sets how far the samples spread around the SWA mean. How wide the SGD
iterates wander depends on the learning rate, the batch size and the momentum, so :math:`s` is a
hyperparameter: :func:`select_scale` picks it from a grid
by a held-out loss of the stacked predictions (for regression, the validation NLL of the predictive
mixture). Every scale is scored with the same standard-normal draws (common random numbers), so the
comparison is not swamped by Monte Carlo noise.

References:

[1] W. Maddox, T. Garipov, P. Izmailov, D. Vetrov, A. Wilson. A simple baseline for Bayesian
    uncertainty in deep learning. NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._validation import is_finite_at_least, is_integer
from .collector import SWAGCollector
from .multiswag import MultiSWAG

__all__ = ["ScaleSelection", "select_scale"]


@dataclass(frozen=True)
class ScaleSelection:
    """The chosen scale and the held-out loss of every scale tried."""

    scale: float
    losses: dict[float, float]


def select_scale(
    collectors: SWAGCollector | Sequence[SWAGCollector],
    predict: Callable[[torch.nn.Module], torch.Tensor],
    loss: Callable[[torch.Tensor], float],
    scales: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    num_samples: int = 30,
    diag_only: bool = False,
    bn_loaders: Sequence | None = None,
    seed: int | None = 0,
) -> ScaleSelection:
    """The scale in ``scales`` with the lowest ``loss`` of the SWAG (or, for a list of collectors,
    MultiSWAG) predictions on held-out data.

    :param collectors: one :class:`SWAGCollector`, or several (MultiSWAG: ``num_samples``, a multiple
        of their number, is split evenly among them).
    :param predict: ``module -> tensor``, the held-out predictions of the module's current weights.
    :param loss: ``(num_samples, ...) -> float``, lower is better (e.g. a mixture NLL).
    :param bn_loaders: one BatchNorm loader per collector (or ``None``).
    :param scales: the candidate scales; :param num_samples: SWAG draws per scale;
        :param diag_only: SWAG-diagonal; :param seed: the draws' seed, shared by every scale (common
        random numbers, so the comparison is not decided by sampling noise); ``None``: one seed drawn
        from torch's global generator, shared by every scale all the same.

    Example::

        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> swag = SWAGCollector(net, max_rank=3)
        >>> for _ in range(5):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn(1, 2))
        ...     swag.collect()
        >>> X = torch.randn(20, 2)
        >>> choice = select_scale(swag, lambda m: m(X)[:, 0], lambda out: float(out.var(0).mean()), num_samples=8)
        >>> choice.scale  # the narrowest spread has the lowest variance
        0.1
    """
    group = [collectors] if isinstance(collectors, SWAGCollector) else list(collectors)
    if not group or not all(isinstance(c, SWAGCollector) for c in group):
        raise TypeError("collectors must be a SWAGCollector or a non-empty sequence of them")
    grid = scales.reshape(-1).tolist() if isinstance(scales, torch.Tensor | np.ndarray) else list(scales)
    if not grid or not all(is_finite_at_least(s, 0.0, strict=True) for s in grid):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    scales = [float(s) for s in grid]  # NumPy and 0-d tensor scales too
    if not is_integer(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if seed is None:  # one seed for every scale all the same: the comparison needs common random numbers
        seed = int(torch.randint(2**31, ()))
    elif not is_integer(seed):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    per_model, left_over = divmod(int(num_samples), len(group))
    if per_model < 1 or left_over:
        raise ValueError(
            f"num_samples ({num_samples}) must be a multiple of the number of collectors ({len(group)}): "
            "MultiSWAG weighs its members equally"
        )
    ensemble = MultiSWAG(group)
    losses: dict[float, float] = {}
    for scale in scales:
        outputs = ensemble.predict(predict, per_model, scale, diag_only, bn_loaders, seed=seed)
        value = float(loss(outputs))
        if not math.isfinite(value):
            raise ValueError(f"the held-out loss at scale {scale} is {value}; check predict and loss")
        losses[float(scale)] = value
    best = min(losses, key=losses.__getitem__)
    return ScaleSelection(scale=best, losses=losses)
