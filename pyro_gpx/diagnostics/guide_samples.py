"""Posterior draws from a trained guide, batched over draws when the guide allows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._validation import check_positive_int
from .model_structure import ModelStructure, inspect_model, vectorize_plate

__all__ = ["sample_guide"]

logger = logging.getLogger(__name__)


def _latent_values(trace) -> dict[str, torch.Tensor]:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary")
    }


def _trace_guide(guide, args, kwargs, plate=None):
    with torch.no_grad(), poutine.block():
        if plate is None:
            return poutine.trace(guide).get_trace(*args, **kwargs)
        with plate:
            return poutine.trace(guide).get_trace(*args, **kwargs)


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

    :returns: site name to ``(num_samples, *value_shape)`` in constrained space, and the model's
        :class:`~pyro_gpx.diagnostics.model_structure.ModelStructure`.
    :raises ValueError: if ``num_samples < 1`` or the guide misses a latent site of the model.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    kwargs = dict(kwargs or {})
    first = _latent_values(_trace_guide(guide, args, kwargs))
    structure = inspect_model(model, first, args, kwargs)
    latents = [s.name for s in structure.of_kind("latent")]
    if vectorize is None or vectorize:
        try:
            trace = _trace_guide(guide, args, kwargs, vectorize_plate(num_samples, structure.max_plate_nesting))
            drawn = _latent_values(trace)
            samples = {}
            for name in latents:
                spec = structure.sites[name]
                value = drawn[name]
                pad = structure.max_plate_nesting - len(spec.batch_shape)
                samples[name] = value.expand((num_samples,) + (1,) * pad + spec.value_shape).reshape(
                    (num_samples,) + spec.value_shape
                )
            return samples, structure
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            if vectorize:
                raise ValueError(f"the guide cannot be sampled batched over draws: {e}") from e
            logger.info("sampling the guide one draw at a time: %s", e)
    draws = [first] + [_latent_values(_trace_guide(guide, args, kwargs)) for _ in range(num_samples - 1)]
    return {name: torch.stack([d[name] for d in draws]) for name in latents}, structure
