"""A thin, optional SVI loop with a progress bar and a loud failure on non-finite losses."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

__all__ = ["fit_svi"]


def fit_svi(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    optim: pyro.optim.PyroOptim | None = None,
    loss: ELBO | None = None,
    progress: bool = True,
    **kwargs,
) -> list[float]:
    """Run ``num_steps`` of :class:`pyro.infer.SVI` and return the losses.

    This is plain Pyro (``SVI(model, guide, optim, loss).step(*args, **kwargs)`` in a loop),
    with a tqdm bar and a :class:`FloatingPointError` naming the step when the loss stops being
    finite, instead of silently training on NaN.

    :param optim: a Pyro optimiser; ``Adam(lr=0.01)`` by default.
    :param loss: an ELBO; ``Trace_ELBO()`` by default.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> losses = fit_svi(model, AutoNormal(model), torch.zeros(3), num_steps=5, progress=False)
        >>> len(losses)
        5
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    svi = SVI(model, guide, optim or pyro.optim.Adam({"lr": 0.01}), loss or Trace_ELBO())
    losses: list[float] = []
    bar = tqdm(range(num_steps), disable=not progress, desc="SVI", mininterval=0.5)
    for step in bar:
        value = svi.step(*args, **kwargs)
        if not math.isfinite(value):
            raise FloatingPointError(f"SVI loss became {value} at step {step}")
        losses.append(value)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4g}")
    return losses
