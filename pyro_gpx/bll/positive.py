"""A positive scalar of a module: a learned ``PyroParam`` or a fixed buffer."""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from .._validation import is_finite_at_least

__all__ = ["register_positive"]


def register_positive(module: PyroModule, name: str, value: float, learn: bool) -> None:
    """Set ``module.<name>`` to ``value`` (finite, > 0), learned by SVI if ``learn``; in float64, the Python
    number's own precision (:class:`~pyro_gpx.bll.model.BayesianLastLayer` converts its head and prior to its
    features' dtype; made in a float32 default dtype, a float64 model's noise 0.1 was 0.10000000149)."""
    if not is_finite_at_least(value, 0.0, strict=True):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    tensor = torch.tensor(float(value), dtype=torch.float64)
    if learn:
        setattr(module, name, PyroParam(tensor, constraint=constraints.positive))
    else:
        module.register_buffer(name, tensor)
