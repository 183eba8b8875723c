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

from .moments import (
    SWAGMoments,
    init_moments,
    moments_from_state,
    moments_state_dict,
    swag_distribution,
    update_moments,
)

__all__ = ["SWAGCollector"]


def _update_bn(bn_loader, module: torch.nn.Module) -> None:
    """``update_bn``, after checking that ``bn_loader`` can be read again (it is read once per sample)."""
    if iter(bn_loader) is bn_loader:
        raise TypeError(
            "bn_loader must be re-iterable (a list of batches or a DataLoader), not a one-shot iterator or "
            "generator: it is read once per sample, and an exhausted one would leave BatchNorm statistics at zero"
        )
    update_bn(bn_loader, module)


class SWAGCollector:
    r"""Running SWAG statistics of a module's trainable parameters.

    :param module: the network: its parameters with ``requires_grad`` at construction are tracked (by
        name; sampling into a copy with frozen parameters is fine).
    :param max_rank: :math:`K`, the number of deviation columns kept (20 in [1]).
    :param dtype: dtype of the statistics (float64 by default; float32 halves their memory, and the
        variance, updated from deviations, keeps its relative accuracy there too: see
        :mod:`~pyro_gpx.swag.moments`).

    The statistics live on the parameters' device (the device at the first :meth:`collect`, so
    moving the module with ``.to(device)`` before collecting is fine); samples come back on the
    module's device.
    """

    def __init__(self, module: torch.nn.Module, max_rank: int = 20, dtype: torch.dtype = torch.float64):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self._shapes = {name: p.shape for name, p in module.named_parameters() if p.requires_grad}
        if not self._shapes:
            raise ValueError("module has no trainable parameters (requires_grad=True) to collect")
        num = sum(s.numel() for s in self._shapes.values())
        self.moments: SWAGMoments = init_moments(num, max_rank, dtype, self._device(module))

    def _params(self, module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        """The tracked parameters (those trainable when the collector was built), by name, whether or not
        they are trainable now: a frozen evaluation copy of the network takes samples too."""
        return ((n, p) for n, p in module.named_parameters() if n in self._shapes)

    def _device(self, module: torch.nn.Module) -> torch.device | None:
        return next((p.device for _, p in self._params(module)), None)

    def _check(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        missing = [name for name in self._shapes if name not in params]
        untracked = [name for name, p in params.items() if p.requires_grad and name not in self._shapes]
        if missing or untracked:
            raise ValueError(
                f"the module's parameters changed: SWAG tracks the parameters that were trainable when it was "
                f"built; {missing} are missing, {untracked} are trainable and not tracked"
            )
        shapes = {name: p.shape for name, p in self._params(module)}
        for name, shape in shapes.items():
            if shape != self._shapes[name]:
                collected = tuple(self._shapes[name])
                raise ValueError(f"parameter {name!r} has shape {tuple(shape)}; SWAG collected {collected}")
        if list(shapes) != list(self._shapes):  # the flat vector follows the registration order
            raise ValueError(
                f"the module's parameters are in the order {list(shapes)}; SWAG collected {list(self._shapes)}"
            )

    @property
    def num_snapshots(self) -> int:
        return self.moments.num_snapshots

    @property
    def rank(self) -> int:
        return self.moments.rank

    def flat_parameters(self, module: torch.nn.Module | None = None) -> torch.Tensor:
        module = module if module is not None else self.module
        self._check(module)
        params = list(self._params(module))
        flat = torch.cat([p.detach().reshape(-1) for _, p in params])
        if flat.device.type != "meta" and not torch.isfinite(flat).all():  # (meta tensors have no values)
            bad = [name for name, p in params if not torch.isfinite(p.detach()).all()]
            raise ValueError(f"the module's parameters {bad} contain NaN or inf (did SGD diverge?)")
        return flat

    @torch.no_grad()
    def collect(self, module: torch.nn.Module | None = None) -> None:
        """Add the module's current parameters as one iterate (call once per epoch)."""
        flat = self.flat_parameters(module)
        m = self.moments
        if m.num_snapshots == 0 and m.mean.device != flat.device:  # the module moved since __init__
            self.moments = init_moments(m.mean.numel(), m.max_rank, m.mean.dtype, flat.device)
        self.moments = update_moments(self.moments, flat)

    def distribution(self, scale: float = 0.5, diag_only: bool = False):
        """The SWAG Gaussian over the flat parameter vector (see :func:`~pyro_gpx.swag.moments.swag_distribution`)."""
        return swag_distribution(self.moments, scale, diag_only)

    @torch.no_grad()
    def sample(
        self,
        scale: float = 0.5,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
        sample_shape: torch.Size | tuple[int, ...] = (),
    ) -> torch.Tensor:
        r"""Flat parameter vectors
        :math:`\bar\theta + \sqrt{s}(\Sigma_{\text{diag}}^{1/2}z_1 + \hat Dz_2/\sqrt{k-1})`, shape
        ``sample_shape + (P,)``, in the statistics' dtype on the module's device.

        The normal draws come from ``generator`` on its own device (the default generator of the
        statistics' device if ``None``), so a CPU generator also seeds samples of a GPU module.
        """
        d = self.distribution(scale, diag_only)
        m = self.moments
        shape = torch.Size(sample_shape)
        device = generator.device if generator is not None else m.mean.device

        def randn(*size: int) -> torch.Tensor:
            return torch.randn(shape + size, generator=generator, dtype=m.mean.dtype, device=device).to(m.mean.device)

        z1 = randn(m.mean.numel())
        if isinstance(d, torch.distributions.LowRankMultivariateNormal):
            z2 = randn(m.rank)
            low_rank = d.cov_factor @ z2 if not shape else z2 @ d.cov_factor.T
            theta = d.loc + low_rank + d.cov_diag.sqrt() * z1
        else:
            theta = d.mean + d.stddev * z1
        return theta.to(self._device(self.module) or theta.device)

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
            _update_bn(bn_loader, module)
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
            _update_bn(bn_loader, module)
        return module

    def state_dict(self) -> dict:
        """The statistics and the parameter shapes: ints, tuples and tensors, for ``torch.save``."""
        return moments_state_dict(self.moments) | {"shapes": {k: tuple(v) for k, v in self._shapes.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (moved to the module's device); the saved ``max_rank``
        replaces this collector's.

        :raises ValueError: if entries are missing or inconsistent, or the state was collected for
            parameters of other names or shapes.
        """
        if not isinstance(state, dict) or "shapes" not in state:
            raise ValueError("state must be a SWAGCollector.state_dict() with a 'shapes' entry")
        shapes = {k: torch.Size(v) for k, v in state["shapes"].items()}
        if shapes != self._shapes:
            changed = sorted(k for k in set(shapes) | set(self._shapes) if shapes.get(k) != self._shapes.get(k))
            raise ValueError(f"the saved SWAG state was collected for parameters of other names or shapes: {changed}")
        if list(shapes) != list(self._shapes):  # the flat vector follows the registration order
            raise ValueError(
                f"the saved SWAG state was collected for the parameter order {list(shapes)}; "
                f"the module has {list(self._shapes)}"
            )
        num = sum(s.numel() for s in self._shapes.values())
        self.moments = moments_from_state(state, num, self._device(self.module))
