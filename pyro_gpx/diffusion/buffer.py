r"""A replay buffer of end points and a Langevin local search, for off-policy log-variance training.

Reverse-KL training of a diffusion sampler only sees where the sampler already goes, and once it has
let a mode go it gets no signal to bring it back (on the 32-d many-well every sampler here loses the
lighter well of every pair). The log-variance loss is zero for a perfect sampler *on any paths*, so
it may also be evaluated on paths that end where the sampler puts too little mass: the reference
process run backwards from end points kept in a buffer [1]. The buffer keeps what forward (exploring)
paths found, refined by a few Metropolis-adjusted Langevin steps on the target (local search), and
replays them with a rank-based priority, :math:`P(i) \propto 1/(cN + \operatorname{rank}_i)`, rank 0 the
highest :math:`\log\rho` [1, 2].

References:

[1] M. Sendera, M. Kim, S. Mittal, P. Lemos, L. Scimeca, J. Rector-Brooks, A. Adam, Y. Bengio,
    N. Malkin. Improved off-policy training of diffusion samplers. NeurIPS 2024.

[2] A. Tripp, E. Daxberger, J. M. Hernández-Lobato. Sample-efficient optimization in the latent space
    of deep generative models via weighted retraining. NeurIPS 2020.

[3] G. O. Roberts, R. L. Tweedie. Exponential convergence of Langevin distributions and their discrete
    approximations. Bernoulli 2, 1996.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._validation import is_finite_at_least, is_integer

__all__ = ["ReplayBuffer", "langevin_search"]


class ReplayBuffer:
    """End points ``z`` with their :math:`\\log\\rho(z)`, first in first out at ``capacity``, replayed
    with a rank-based priority.

    :param capacity: the most points kept (the oldest are dropped).
    :param rank_weight: :math:`c` in :math:`P(i) \\propto 1/(cN + \\operatorname{rank}_i)`: small values favour
        the highest-density points, large ones approach uniform replay.

    Example::

        >>> buffer = ReplayBuffer(capacity=4)
        >>> buffer.add(torch.arange(6.0).reshape(6, 1), torch.arange(6.0))
        >>> len(buffer), buffer.z[:, 0].tolist()  # the two oldest were dropped
        (4, [2.0, 3.0, 4.0, 5.0])
        >>> buffer.sample(3, generator=torch.Generator().manual_seed(0))[0].shape
        torch.Size([3, 1])
    """

    def __init__(self, capacity: int = 10_000, rank_weight: float = 0.01):
        if not is_integer(capacity) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not is_finite_at_least(rank_weight, 0.0, strict=True):
            raise ValueError(f"rank_weight must be a positive finite number, got {rank_weight!r}")
        self.capacity, self.rank_weight = int(capacity), float(rank_weight)
        self.z: torch.Tensor | None = None
        self.log_target: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.z is None else len(self.z)

    def add(self, z: torch.Tensor, log_target: torch.Tensor) -> None:
        """Append the rows of ``z`` ``(B, D)`` with ``log_target`` ``(B,)``; rows with a non-finite value
        are skipped (they are points the target rules out, not data)."""
        if z.dim() != 2 or log_target.shape != z.shape[:1]:
            shapes = f"{tuple(z.shape)} and {tuple(log_target.shape)}"
            raise ValueError(f"z must be (B, D) and log_target (B,), got {shapes}")
        if self.z is not None and z.shape[1] != self.z.shape[1]:
            raise ValueError(f"z has {z.shape[1]} columns, the buffer holds points of dimension {self.z.shape[1]}")
        keep = torch.isfinite(z).all(-1) & torch.isfinite(log_target)
        z, log_target = z.detach()[keep], log_target.detach()[keep]
        if self.z is not None:
            z, log_target = torch.cat([self.z, z]), torch.cat([self.log_target, log_target])
        self.z, self.log_target = z[-self.capacity :], log_target[-self.capacity :]

    def sample(self, num: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` points (with replacement) and their :math:`\\log\\rho`, drawn by rank priority."""
        if len(self) == 0:
            raise RuntimeError("the replay buffer is empty: add points before sampling")
        n = len(self)
        rank = torch.empty(n, dtype=torch.float64)
        rank[torch.argsort(self.log_target, descending=True)] = torch.arange(n, dtype=torch.float64)
        priority = 1.0 / (self.rank_weight * n + rank)
        index = torch.multinomial(priority, num, replacement=True, generator=generator)
        return self.z[index], self.log_target[index]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rank_weight": self.rank_weight, "z": self.z, "log_target": self.log_target}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.rank_weight = int(state["capacity"]), float(state["rank_weight"])
        self.z, self.log_target = state["z"], state["log_target"]


def langevin_search(
    log_density: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, num_steps: int, step_size: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    r"""Metropolis-adjusted Langevin steps from each row of ``z`` [3]: propose
    :math:`z' = z + \tfrac{h}{2}\nabla\log\rho(z) + \sqrt h\,\xi` and accept with the Metropolis-Hastings
    ratio, so every row stays a valid draw of a chain that keeps :math:`\rho` invariant.

    :param log_density: maps ``(B, D)`` to :math:`\log\rho` ``(B,)``, differentiable.
    :param num_steps: steps (an integer >= 0). :param step_size: :math:`h > 0`.
    :returns: the final rows, their :math:`\log\rho`, and the mean acceptance probability (to adapt ``h``).

    Example::

        >>> def log_density(z):
        ...     return -0.5 * z.square().sum(-1)
        >>> z, log_rho, accept = langevin_search(log_density, torch.full((500, 2), 5.0), 200, 0.5)
        >>> bool(z.mean().abs() < 0.3), 0.5 < accept <= 1.0
        (True, True)
    """
    if not is_integer(num_steps) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
    if not is_finite_at_least(step_size, 0.0, strict=True):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")

    def value_and_grad(x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            value = log_density(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach()

    def log_proposal(to, frm, grad_frm):  # log q(to | frm) up to a constant
        return -(to - frm - 0.5 * step_size * grad_frm).square().sum(-1) / (2 * step_size)

    z = z.detach()
    value, grad = value_and_grad(z)
    accepted = 0.0
    for _ in range(int(num_steps)):
        proposal = z + 0.5 * step_size * grad + math.sqrt(step_size) * torch.randn_like(z)
        new_value, new_grad = value_and_grad(proposal)
        log_ratio = new_value - value + log_proposal(z, proposal, new_grad) - log_proposal(proposal, z, grad)
        log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
        accept = torch.rand_like(value).log() < log_ratio
        z = torch.where(accept[:, None], proposal, z)
        value = torch.where(accept, new_value, value)
        grad = torch.where(accept[:, None], new_grad, grad)
        accepted += float(log_ratio.clamp(max=0.0).exp().mean())
    return z, value, accepted / max(int(num_steps), 1)
