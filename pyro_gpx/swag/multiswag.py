"""MultiSWAG: an equal-weight mixture of independent SWAG runs [1], and Monte Carlo prediction.

References:

[1] A. Wilson, P. Izmailov. Bayesian deep learning and a probabilistic perspective of
    generalization. NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .collector import SWAGCollector

__all__ = ["swag_predict", "MultiSWAG"]


@torch.no_grad()
def swag_predict(
    collector: SWAGCollector,
    predict: Callable[[torch.nn.Module], torch.Tensor],
    num_samples: int = 30,
    module: torch.nn.Module | None = None,
    scale: float = 0.5,
    diag_only: bool = False,
    bn_loader=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stack ``predict(module)`` over ``num_samples`` SWAG weight samples: ``(num_samples, ...)``.

    The module's parameters are restored afterwards.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    module = module if module is not None else collector.module
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        outputs = []
        for _ in range(num_samples):
            collector.sample_into(module, scale, diag_only, bn_loader, generator)
            outputs.append(predict(module))
        return torch.stack(outputs)
    finally:
        module.load_state_dict(saved)


class MultiSWAG:
    """An ensemble of :class:`SWAGCollector` runs (independent initialisations), sampled equally."""

    def __init__(self, collectors: Sequence[SWAGCollector]):
        if not collectors:
            raise ValueError("MultiSWAG needs at least one SWAG run")
        self.collectors = list(collectors)

    def predict(
        self,
        predict: Callable[[torch.nn.Module], torch.Tensor],
        samples_per_model: int = 10,
        scale: float = 0.5,
        diag_only: bool = False,
        bn_loaders: Sequence | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """``(len(collectors) * samples_per_model, ...)`` predictions, each run's module in turn.

        :param seed: if given, run ``i`` draws from its own generator seeded ``seed + i`` (so calls that
            differ only in ``scale`` use common random numbers); otherwise all runs share ``generator``.
        """
        loaders = list(bn_loaders) if bn_loaders is not None else [None] * len(self.collectors)
        if len(loaders) != len(self.collectors):
            raise ValueError(f"bn_loaders has {len(loaders)} entries for {len(self.collectors)} SWAG runs")
        return torch.cat([
            swag_predict(c, predict, samples_per_model, scale=scale, diag_only=diag_only, bn_loader=loader,
                         generator=generator if seed is None else torch.Generator().manual_seed(seed + i))
            for i, (c, loader) in enumerate(zip(self.collectors, loaders))
        ])  # fmt: skip
