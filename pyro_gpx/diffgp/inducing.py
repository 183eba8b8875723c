r"""Inducing-point helpers shared by the flow and output layers: initial locations and the whitened
sparse-GP conditional.

With inducing inputs :math:`Z` (:math:`M` rows), :math:`K_{ZZ} = LL^\top` and whitened inducing
outputs :math:`u = L^{-1} f(Z) \sim \mathcal N(0, I)`, the GP at :math:`x` given :math:`u` is

.. math::

    f(x)\mid u \sim \mathcal N\big(k_{xZ} L^{-\top} u,\; k(x, x) - k_{xZ} K_{ZZ}^{-1} k_{Zx}\big).
"""

from __future__ import annotations

import torch

from .._validation import check_finite, check_positive_int, is_finite_at_least
from ..gp.cholesky import safe_cholesky

__all__ = ["kmeans_inducing", "jittered_cholesky", "whitened_conditional"]


def kmeans_inducing(X: torch.Tensor, num_inducing: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """``num_inducing`` k-means centres of the rows of ``X`` (Lloyd's algorithm from a seeded random
    subset; empty clusters keep their previous centre).

    >>> import torch
    >>> X = torch.cat([torch.zeros(10, 2), torch.ones(10, 2)])
    >>> Z = kmeans_inducing(X, 2)
    >>> sorted(Z.sum(-1).tolist())
    [0.0, 2.0]
    """
    if X.dim() != 2:
        raise ValueError(f"X must be (n, d), got shape {tuple(X.shape)}")
    num_inducing, iters = check_positive_int("num_inducing", num_inducing), check_positive_int("iters", iters)
    if not 1 <= num_inducing <= X.shape[0]:
        raise ValueError(f"num_inducing must be in [1, {X.shape[0]}] (the number of rows of X), got {num_inducing}")
    check_finite("X", X)
    gen = torch.Generator().manual_seed(seed)
    X = X.detach()
    centres = X[torch.randperm(X.shape[0], generator=gen)[:num_inducing]].clone()
    for _ in range(iters):
        assign = torch.cdist(X, centres).argmin(-1)
        counts = torch.bincount(assign, minlength=num_inducing).to(X.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, X)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.allclose(moved, centres):
            break
        centres = moved
    return centres


def jittered_cholesky(K: torch.Tensor, jitter: float) -> torch.Tensor:
    """Cholesky factor of ``K + jitter I`` (batched): the fixed SVGP jitter, then the escalation and
    the non-finite check of :func:`~pyro_gpx.gp.cholesky.safe_cholesky` if that still fails."""
    if not is_finite_at_least(jitter, 0.0):  # a Python number: cheap per step
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return safe_cholesky(K + jitter * eye, name="inducing kernel matrix")


def whitened_conditional(
    Kxz: torch.Tensor, kxx: torch.Tensor, L: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of :math:`f(x)\mid u` for whitened ``u``.

    :param Kxz: ``(..., n, M)``; :param kxx: ``(..., n)`` prior variances; :param L: ``(..., M, M)``
        Cholesky factor of :math:`K_{ZZ}`; :param u: ``(..., M)``.
    :returns: mean ``(..., n)`` and variance ``(..., n)`` (clamped at 0).
    """
    A = torch.linalg.solve_triangular(L, Kxz.transpose(-1, -2), upper=False)  # (..., M, n) = L^{-1} K_Zx
    mean = (A * u.unsqueeze(-1)).sum(-2)
    var = (kxx - (A * A).sum(-2)).clamp_min(0.0)
    return mean, var
