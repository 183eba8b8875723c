"""Posterior draws from a trained guide, batched over draws when the guide allows."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .._validation import check_positive_int
from .conditioned import _CHECK_DRAWS, _WRAPPERS
from .model_structure import ModelStructure, inspect_model, vectorize_plate

__all__ = ["sample_guide"]

logger = logging.getLogger(__name__)


def _sample_sites(trace) -> dict:
    return {
        name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    }


def _latent_values(trace) -> dict[str, torch.Tensor]:
    return {
        name: site["value"]
        for name, site in _sample_sites(trace).items()
        if not site["is_observed"] and not site["infer"].get("is_auxiliary")
    }


def _trace_guide(guide, args, kwargs, plate=None):
    with torch.no_grad(), poutine.block():
        if plate is None:
            return poutine.trace(guide).get_trace(*args, **kwargs)
        with plate:
            return poutine.trace(guide).get_trace(*args, **kwargs)


def _one_draw(site, i: int, mpn: int, shape: torch.Size) -> torch.Tensor:
    """Draw ``i`` of a site of the batched trace, in the shape it has in an unbatched run."""
    value = site["value"]
    lead = value.dim() - len(site["fn"].event_shape) - mpn - 1  # the draws plate's dim in the value
    if lead > 0:
        raise ValueError(f"site {site['name']!r} has dims left of the draws")
    if lead == 0:
        value = value[i if value.shape[0] > 1 else 0]
    return value.reshape(shape)


def _log_density_per_draw(trace, num_draws: int, mpn: int) -> torch.Tensor:
    """Each draw's guide log-density in a trace batched over draws (the draws plate at ``-mpn - 1``)."""
    total: torch.Tensor | None = None
    for site in _sample_sites(trace).values():
        lp = torch.as_tensor(scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]))
        if total is None:  # on the guide's device
            total = torch.zeros(num_draws, dtype=torch.float64, device=lp.device)
        if lp.dim() > mpn + 1:
            raise ValueError(f"the log-density of {site['name']!r} has dims left of the draws")
        plates = lp.shape[max(lp.dim() - mpn, 0) :]  # summed; what is left of them is the draws (or 1)
        total += lp.double().reshape(-1, math.prod(plates)).sum(1)
    return total if total is not None else torch.zeros(num_draws, dtype=torch.float64)


def _batched_draws_differ(guide, args, kwargs, trace, unbatched, samples, mpn: int) -> str:
    """Why the batched draws in ``trace`` are not what the guide draws one at a time ("" if they are):
    a few draws are replayed through the guide one by one and their log-densities compared with the
    batched run's; and a latent that the two ``unbatched`` traces draw differently must vary."""
    num_draws = next(iter(samples.values())).shape[0]
    first, second = (_latent_values(t) for t in unbatched)
    for name, value in samples.items():
        if num_draws > 1 and not torch.equal(first[name], second[name]) and bool((value == value[:1]).all()):
            return f"the batched draws of {name!r} are all equal"
    n = min(num_draws, _CHECK_DRAWS)
    batched = _log_density_per_draw(trace, num_draws, mpn)[:n]
    sites = _sample_sites(trace)
    shapes = {name: site["value"].shape for name, site in _sample_sites(unbatched[0]).items()}
    # a Delta site is recomputed from the others, not conditioned: batched and unbatched arithmetic round
    # differently, and a Delta's density is -inf a rounding away from its point
    random = [name for name, site in sites.items() if name in shapes and not _is_delta(site["fn"])]
    for i in range(n):
        data = {name: _one_draw(sites[name], i, mpn, shapes[name]) for name in random}
        replay = _trace_guide(poutine.condition(guide, data=data), args, kwargs)
        looped = torch.as_tensor(replay.log_prob_sum()).double()
        if not torch.allclose(batched[i], looped, rtol=1e-4, atol=1e-5):
            return f"draw {i} has log-density {float(batched[i])} batched but {float(looped)} alone"
        for name, value in _latent_values(replay).items():
            if name in samples and not torch.allclose(samples[name][i].double(), value.double(), rtol=1e-4, atol=1e-6):
                return f"draw {i} of {name!r} differs between the batched and the one-at-a-time guide"
    return ""


def _is_delta(fn) -> bool:
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def sample_guide(
    guide: Callable,
    model: Callable,
    num_samples: int,
    args: tuple = (),
    kwargs: Mapping | None = None,
    *,
    vectorize: bool | None = None,
) -> tuple[dict[str, torch.Tensor], ModelStructure]:
    """Draw ``num_samples`` values of every latent site of ``model`` from ``guide``.

    Batched draws are checked on a few draws, each replayed through the guide alone (a guide that
    reduces over a batch, or draws with torch's own sampler, is batched wrongly), and drawn one at a
    time if they disagree.

    :returns: site name to ``(num_samples, *value_shape)`` in constrained space, and the model's
        :class:`~pyro_gpx.diagnostics.model_structure.ModelStructure`.
    :raises ValueError: if ``num_samples < 1`` or the guide misses a latent site of the model.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    kwargs = dict(kwargs or {})
    unbatched = [_trace_guide(guide, args, kwargs)]
    structure = inspect_model(model, _latent_values(unbatched[0]), args, kwargs)
    latents = [s.name for s in structure.of_kind("latent")]
    if vectorize is None or vectorize:
        mpn = structure.max_plate_nesting
        try:
            trace = _trace_guide(guide, args, kwargs, vectorize_plate(num_samples, mpn))
            drawn = _latent_values(trace)
            samples = {}
            for name in latents:
                spec = structure.sites[name]
                pad = mpn - len(spec.batch_shape)
                samples[name] = (
                    drawn[name]
                    .expand((num_samples,) + (1,) * pad + spec.value_shape)
                    .reshape((num_samples,) + spec.value_shape)
                )
            unbatched.append(_trace_guide(guide, args, kwargs))
            why = _batched_draws_differ(guide, args, kwargs, trace, unbatched, samples, mpn)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            why = str(e)
        if not why:
            return samples, structure
        if vectorize:
            raise ValueError(f"the guide cannot be sampled batched over draws: {why}")
        logger.info("sampling the guide one draw at a time: %s", why)
    unbatched += [_trace_guide(guide, args, kwargs) for _ in range(num_samples - len(unbatched))]
    draws = [_latent_values(t) for t in unbatched]
    return {name: torch.stack([d[name] for d in draws]) for name in latents}, structure
