r"""The SWA/SWAG learning-rate schedule [1].

Constant :math:`\eta_0` for the first half of the pre-averaging phase, a linear decay to the
averaging rate :math:`\eta_{\text{swa}}` until 90% of it, then constant :math:`\eta_{\text{swa}}`:

.. math::

    \eta(t) = \eta_0 \cdot \begin{cases} 1 & t \le 0.5 \\
        1 - (1 - \eta_{\text{swa}}/\eta_0)\frac{t - 0.5}{0.4} & 0.5 < t \le 0.9 \\
        \eta_{\text{swa}}/\eta_0 & t > 0.9 \end{cases},
    \qquad t = \frac{\text{epoch}}{\text{swa\_start}}.

From ``swa_start`` on the rate equals what ``torch.optim.swa_utils.SWALR(swa_lr=...)`` settles at,
so either can drive the averaging phase.

References:

[1] P. Izmailov, D. Podoprikhin, T. Garipov, D. Vetrov, A. Wilson. Averaging weights leads to wider
    optima and better generalization. UAI 2018.
"""

from __future__ import annotations

import torch

from .._validation import check_positive_int, is_finite_at_least

__all__ = ["swag_learning_rate", "swag_scheduler"]


def swag_learning_rate(epoch: float, lr_init: float, swa_lr: float, swa_start: float) -> float:
    """Learning rate at ``epoch`` (fractional epochs allowed)."""
    for name, value in (("swa_start", swa_start), ("lr_init", lr_init), ("swa_lr", swa_lr)):
        if not is_finite_at_least(value, 0.0, strict=True):
            raise ValueError(f"{name} must be a finite positive number, got {value}")
    if not is_finite_at_least(epoch, 0.0):
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch}")
    t = epoch / swa_start
    ratio = swa_lr / lr_init
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    else:
        factor = ratio
    return lr_init * factor


def swag_scheduler(
    optimizer: torch.optim.Optimizer, swa_lr: float, swa_start: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch ``LambdaLR`` implementing :func:`swag_learning_rate` from each parameter group's
    initial rate: every group decays from its own rate to ``swa_lr``, as ``SWALR(swa_lr=...)`` sets
    every group to ``swa_lr``."""
    swa_start = check_positive_int("swa_start", swa_start)  # epochs, counted by LambdaLR

    def factor(lr_init: float):
        return lambda epoch: swag_learning_rate(epoch, lr_init, swa_lr, swa_start) / lr_init

    lambdas = [factor(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
