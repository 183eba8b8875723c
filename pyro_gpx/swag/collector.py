"""SWAG for any ``nn.Module`` trained by your own SGD loop.

Call :meth:`SWAGCollector.collect` once per epoch during the averaging phase; afterwards sample
weights into the module (with BatchNorm statistics recomputed), load the SWA mean, or get the SWAG
Gaussian as a distribution.

Example::

    >>> import torch
    >>> net = torch.nn.Linear(3, 1)
    >>> swag = SWAGCollector(net, max_rank=5)
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> X, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> for epoch in range(10):
    ...     for i in range(0, 64, 16):
    ...         optimizer.zero_grad()
    ...         torch.nn.functional.mse_loss(net(X[i:i + 16]), y[i:i + 16]).backward()
    ...         optimizer.step()
    ...     swag.collect()
    >>> swag.num_snapshots, swag.rank
    (10, 5)
    >>> _ = swag.sample_into(net, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.swa_utils import update_bn

from .moments import SWAGMoments, init_moments, swag_distribution, update_moments

__all__ = ["SWAGCollector"]


class SWAGCollector:
    """Running SWAG statistics of a module's trainable parameters.

    :param module: the network (its ``parameters()`` with ``requires_grad`` are tracked).
    :param max_rank: :math:`K`, the number of deviation columns kept (20 in [1]).
    :param dtype: dtype of the statistics (float64 avoids cancellation in the variance).
    """

    def __init__(self, module: torch.nn.Module, max_rank: int = 20, dtype: torch.dtype = torch.float64):
        self.module = module
        self._shapes = self._param_shapes(module)
        num = sum(s.numel() for s in self._shapes.values())
        self.moments: SWAGMoments = init_moments(num, max_rank, dtype)

    @staticmethod
    def _params(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        return ((n, p) for n, p in module.named_parameters() if p.requires_grad)

    @classmethod
    def _param_shapes(cls, module) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in cls._params(module)}

    def _check(self, module: torch.nn.Module) -> None:
        shapes = self._param_shapes(module)
        if shapes.keys() != self._shapes.keys():
            raise ValueError(
                f"the module's parameters changed: {sorted(set(shapes) ^ set(self._shapes))} added or removed"
            )
        for name, shape in shapes.items():
            if shape != self._shapes[name]:
                collected = tuple(self._shapes[name])
                raise ValueError(f"parameter {name!r} has shape {tuple(shape)}; SWAG collected {collected}")

    @property
    def num_snapshots(self) -> int:
        return self.moments.num_snapshots

    @property
    def rank(self) -> int:
        return self.moments.rank

    def flat_parameters(self, module: torch.nn.Module | None = None) -> torch.Tensor:
        module = module if module is not None else self.module
        self._check(module)
        return torch.cat([p.detach().reshape(-1) for _, p in self._params(module)])

    @torch.no_grad()
    def collect(self, module: torch.nn.Module | None = None) -> None:
        """Add the module's current parameters as one iterate (call once per epoch)."""
        self.moments = update_moments(self.moments, self.flat_parameters(module))

    def distribution(self, scale: float = 0.5, diag_only: bool = False):
        """The SWAG Gaussian over the flat parameter vector (see :func:`~pyro_gpx.swag.moments.swag_distribution`)."""
        return swag_distribution(self.moments, scale, diag_only)

    @torch.no_grad()
    def sample(self, scale: float = 0.5, diag_only: bool = False, generator: torch.Generator | None = None):
        r"""One flat parameter vector
        :math:`\bar\theta + \sqrt{s}(\Sigma_{\text{diag}}^{1/2}z_1 + \hat Dz_2/\sqrt{k-1})`."""
        d = self.distribution(scale, diag_only)
        m = self.moments
        z1 = torch.randn(m.mean.shape, generator=generator, dtype=m.mean.dtype)
        if isinstance(d, torch.distributions.LowRankMultivariateNormal):
            z2 = torch.randn(m.rank, generator=generator, dtype=m.mean.dtype)
            return d.loc + d.cov_factor @ z2 + d.cov_diag.sqrt() * z1
        return d.mean + d.stddev * z1

    @torch.no_grad()
    def _load(self, module: torch.nn.Module, flat: torch.Tensor) -> torch.nn.Module:
        self._check(module)
        pos = 0
        for _, p in self._params(module):
            n = p.numel()
            p.copy_(flat[pos : pos + n].view_as(p).to(p.dtype))
            pos += n
        return module

    def swa_into(self, module: torch.nn.Module | None = None, bn_loader=None) -> torch.nn.Module:
        """Load the SWA mean :math:`\\bar\\theta` (and recompute BatchNorm statistics if a loader is given)."""
        if self.num_snapshots < 1:
            raise ValueError("no iterates collected yet")
        module = self._load(module if module is not None else self.module, self.moments.mean)
        if bn_loader is not None:
            update_bn(bn_loader, module)
        return module

    def sample_into(
        self,
        module: torch.nn.Module | None = None,
        scale: float = 0.5,
        diag_only: bool = False,
        bn_loader=None,
        generator: torch.Generator | None = None,
    ) -> torch.nn.Module:
        """Load one SWAG sample into ``module``; with ``bn_loader`` (an iterable of input batches)
        recompute the BatchNorm running statistics for the sampled weights, as [1] prescribes."""
        module = self._load(module if module is not None else self.module, self.sample(scale, diag_only, generator))
        if bn_loader is not None:
            update_bn(bn_loader, module)
        return module

    def state_dict(self) -> dict:
        m = self.moments
        return {
            "num_snapshots": m.num_snapshots,
            "mean": m.mean.clone(),
            "sq_mean": m.sq_mean.clone(),
            "deviations": m.deviations.clone(),
            "max_rank": m.max_rank,
            "shapes": {k: tuple(v) for k, v in self._shapes.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = {k: torch.Size(v) for k, v in state["shapes"].items()}
        if shapes != self._shapes:
            raise ValueError("the saved SWAG state was collected for parameters of other names or shapes")
        self.moments = SWAGMoments(
            int(state["num_snapshots"]), state["mean"].clone(), state["sq_mean"].clone(),
            state["deviations"].clone(), int(state["max_rank"]),
        )  # fmt: skip
