"""MultiSWAG: an equal-weight mixture of independent SWAG runs [1], and Monte Carlo prediction.

:class:`MultiSWAG` ensembles :class:`~pyro_gpx.swag.SWAGCollector` runs of an ``nn.Module``;
:class:`AutoMultiSWAG` ensembles :class:`~pyro_gpx.swag.AutoSWAG` guides of a Pyro model into one
guide for ``Predictive``.

References:

[1] A. Wilson, P. Izmailov. Bayesian deep learning and a probabilistic perspective of
    generalization. NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous

from .._validation import check_positive_int, is_integer
from .collector import SWAGCollector
from .guide import AutoSWAG, _latent_mismatch, _rng_kept, _untraced_on_error
from .moments import swag_distribution

__all__ = ["swag_predict", "MultiSWAG", "AutoMultiSWAG"]


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

    Each output is copied before the next sample is loaded, so ``predict`` may return the module's
    own tensors (``lambda m: m.weight.detach()``, a BatchNorm ``running_mean``). The module's
    parameters are restored afterwards.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    module = module if module is not None else collector.module
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        outputs = []
        for _ in range(num_samples):
            collector.sample_into(module, scale, diag_only, bn_loader, generator)
            # a copy: an output that is a view of the weights or buffers would be overwritten by the next sample
            outputs.append(torch.as_tensor(predict(module)).clone())
        return torch.stack(outputs)
    finally:
        module.load_state_dict(saved)


class MultiSWAG:
    """An ensemble of :class:`SWAGCollector` runs (independent initialisations), sampled equally."""

    def __init__(self, collectors: Sequence[SWAGCollector]):
        if not isinstance(collectors, Iterable):  # a single run is not a list of them
            raise TypeError(f"collectors must be a sequence of SWAGCollector runs, got {type(collectors).__name__}")
        collectors = list(collectors)
        if not collectors:
            raise ValueError("MultiSWAG needs at least one SWAG run")
        if not all(isinstance(c, SWAGCollector) for c in collectors):
            raise TypeError(f"collectors must all be SWAGCollector runs, got {[type(c).__name__ for c in collectors]}")
        self.collectors = collectors

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

        :param predict: ``module -> tensor``, evaluated at each sampled set of weights.
        :param samples_per_model: draws per SWAG run; :param scale: the SWAG scale; :param diag_only:
            SWAG-diagonal; :param bn_loaders: one BatchNorm loader per run (or ``None``);
            :param generator: the random generator shared by the runs when ``seed`` is ``None``.
        :param seed: if given, run ``i`` draws from its own generator seeded ``seed + i`` (so calls that
            differ only in ``scale`` use common random numbers); otherwise all runs share ``generator``.
        """
        samples_per_model = check_positive_int("samples_per_model", samples_per_model)
        if seed is not None and not is_integer(seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        loaders = list(bn_loaders) if bn_loaders is not None else [None] * len(self.collectors)
        if len(loaders) != len(self.collectors):
            raise ValueError(f"bn_loaders has {len(loaders)} entries for {len(self.collectors)} SWAG runs")
        return torch.cat([
            swag_predict(c, predict, samples_per_model, scale=scale, diag_only=diag_only, bn_loader=loader,
                         generator=generator if seed is None else torch.Generator().manual_seed(seed + i))
            for i, (c, loader) in enumerate(zip(self.collectors, loaders))
        ])  # fmt: skip


class AutoMultiSWAG(AutoContinuous):
    r"""MultiSWAG as a Pyro guide: the equal-weight mixture
    :math:`\frac1M\sum_m N(\bar\theta_m, \Sigma_m)` of the SWAG Gaussians of :math:`M` independent
    :class:`~pyro_gpx.swag.AutoSWAG` runs of the same model (unconstrained space), so each draw
    comes from a member chosen uniformly at random. Each member keeps its own ``scale`` and
    ``diag_only``.

    Works with ``Predictive`` (also ``parallel=True``) like any autoguide. The mixture has no
    reparameterised sampler (it is not for SVI). ``median`` and ``quantiles`` are those of the
    Gaussian with the mixture's mean and marginal variances. ``state_dict()`` carries every member's
    statistics; load it into an ``AutoMultiSWAG`` of as many fresh members.

    :param guides: ``AutoSWAG`` guides of the same model, each with statistics collected or loaded.
    """

    def __init__(self, guides: Sequence[AutoSWAG]):
        if not isinstance(guides, Iterable):  # a single guide is not a list of them
            raise TypeError(f"guides must be a non-empty sequence of AutoSWAG guides, got {type(guides).__name__}")
        guides = tuple(guides)
        if not guides or not all(isinstance(g, AutoSWAG) for g in guides):
            raise TypeError("guides must be a non-empty sequence of AutoSWAG guides")
        super().__init__(guides[0].model)
        self._members = guides  # a tuple: not submodules, so each stays usable as a guide of its own

    @property
    def members(self) -> tuple[AutoSWAG, ...]:
        return self._members

    def _setup_prototype(self, *args, **kwargs):
        traced = next((g for g in self._members if g.prototype_trace is not None), None)
        if traced is not None:  # a member's trace, made with the training data: a first call at new
            # inputs (Predictive's, without targets) would make the observed sites look latent
            self.prototype_trace = traced.prototype_trace
            self._prototype_frames = dict(traced._prototype_frames)
            self._unconstrained_shapes = dict(traced._unconstrained_shapes)
            self._cond_indep_stacks = dict(traced._cond_indep_stacks)
            self.latent_dim = traced.latent_dim
        else:
            with _rng_kept():  # keep the RNG as it was: saved and reloaded guides draw alike
                super()._setup_prototype(*args, **kwargs)
        with _untraced_on_error(self):
            self._check_members()

    def _check_members(self) -> None:
        shapes = {name: tuple(shape) for name, shape in self._unconstrained_shapes.items()}
        for i, g in enumerate(self._members):
            if g._moments is None:
                raise ValueError(f"guides[{i}] has collected nothing yet; call its collect(values, *model_args)")
            if g._swag_shapes is not None and list(g._swag_shapes.items()) != list(shapes.items()):
                raise ValueError(f"guides[{i}] {_latent_mismatch(g._swag_shapes, shapes)}")
            if g.moments.mean.numel() != self.latent_dim:
                raise ValueError(
                    f"guides[{i}] tracks {g.moments.mean.numel()} entries; the model has {self.latent_dim}"
                )

    def _components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Members' means ``(M, P)``, low-rank factors ``(M, P, r)`` (zero-padded) and diagonals ``(M, P)``."""
        value = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"]
        locs, factors, diags = [], [], []
        for g in self._members:
            d = swag_distribution(g.moments, g.scale, g.diag_only, value.dtype, value.device)
            if isinstance(d, torch.distributions.LowRankMultivariateNormal):
                loc, factor, diag = d.loc, d.cov_factor, d.cov_diag
            else:  # SWAG-diagonal (or a single deviation column): no low-rank part
                loc, diag = d.base_dist.loc, d.variance
                factor = loc.new_zeros(loc.shape[-1], 1)
            locs.append(loc)
            factors.append(factor)
            diags.append(diag)
        width = max(f.shape[-1] for f in factors)
        factors = [torch.nn.functional.pad(f, (0, width - f.shape[-1])) for f in factors]
        return torch.stack(locs), torch.stack(factors), torch.stack(diags)

    def get_posterior(self, *args, **kwargs):
        loc, factor, diag = self._components()
        weights = dist.Categorical(logits=loc.new_zeros(len(self._members)))
        return dist.MixtureSameFamily(weights, dist.LowRankMultivariateNormal(loc, factor, diag))

    def _loc_scale(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        loc, factor, diag = self._components()
        mean = loc.mean(0)
        variance = (diag + (factor**2).sum(-1) + (loc - mean) ** 2).mean(0)  # within + between members
        return mean, variance.sqrt()

    def get_extra_state(self) -> dict:
        """Every member's statistics (see :meth:`AutoSWAG.get_extra_state`)."""
        return {"members": [g.get_extra_state() for g in self._members]}

    def set_extra_state(self, state: dict) -> None:
        members = state.get("members") if isinstance(state, dict) else None
        if not isinstance(members, list) or len(members) != len(self._members):
            count = len(members) if isinstance(members, list) else "no"
            raise ValueError(f"the saved MultiSWAG state has {count} members; this guide has {len(self._members)}")
        for g, member_state in zip(self._members, members):
            g.set_extra_state(member_state)
