"""Running a model once per posterior draw: vectorised over draws when it can be, looped otherwise.

Every posterior-dependent group of an ArviZ object (log-likelihood, posterior predictive,
deterministic sites) is a function of the model evaluated at each posterior draw. Evaluating
under a plate over draws is one model call; a model that is not shape-safe (it branches on
``.item()``, reduces over its batch, ...) must be looped. :func:`evaluate_draws` checks the
vectorised result against the loop on a few draws before trusting it, then evaluates in batches of
draws, and walks through subsampled plates in chunks so that every data point is covered once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .._validation import check_positive_int
from .model_structure import ModelStructure, SiteSpec, is_deterministic, is_factor, vectorize_plate

__all__ = ["DrawEvaluation", "evaluate_draws", "ResampleObservations"]

logger = logging.getLogger(__name__)
_CHECK_DRAWS = 8
_DRAW_BATCH_ELEMENTS = 4_000_000


class ResampleObservations(Messenger):
    """Draw observed sites from their distribution instead of fixing them to the data.

    Unlike :class:`pyro.poutine.uncondition`, leaves ``pyro.factor`` and ``pyro.deterministic``
    sites alone. Apply it inside :func:`pyro.poutine.condition` so conditioned latents stay fixed.
    """

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] and not (site_is_subsample(msg) or is_factor(msg) or is_deterministic(msg)):
            fn, value = msg["fn"], msg["value"]
            if value is not None:  # an observation broadcast against its distribution (no plate): one draw per point
                batch = value.shape[: value.dim() - len(fn.event_shape)]
                shape = torch.broadcast_shapes(fn.batch_shape, batch)
                if shape != fn.batch_shape:
                    msg["fn"] = fn.expand(shape)
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


class _NotVectorizable(RuntimeError):
    pass


@dataclass
class DrawEvaluation:
    """Per-draw results, with the draw axis first and subsampled plates at full size.

    :ivar values: site name to ``(num_draws, *batch_shape, *event_shape)``.
    :ivar log_likelihood: observed site name to ``(num_draws, *batch_shape)`` pointwise log-density,
        multiplied by the user's ``poutine.scale`` (subsampling scale removed).
    :ivar masks: observed site name to a boolean ``(num_draws, *batch_shape)`` mask, or ``None``.
    :ivar vectorized: whether the draws were evaluated in one batched model call per batch.
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    log_likelihood: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    vectorized: bool = False


def _plate_scale(site: dict) -> float:
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        full = getattr(frame, "full_size", None)
        if full is not None and frame.size not in (None, -1) and frame.size > 0:
            factor *= full / frame.size
    return factor


def _site_mask(site: dict) -> torch.Tensor | None:
    """The site's mask from ``poutine.mask`` and ``Distribution.mask`` combined (``None``: unmasked)."""
    masks = [] if site["mask"] is None else [torch.as_tensor(site["mask"], dtype=torch.bool)]
    fn = site["fn"]
    while isinstance(fn, MaskedDistribution):
        masks.append(torch.as_tensor(fn._mask, dtype=torch.bool))
        fn = fn.base_dist
    if not masks:
        return None
    mask = masks[0]
    for m in masks[1:]:
        mask = mask & m
    return mask


_WRAPPERS = (MaskedDistribution, dist.Independent, ExpandedDistribution)


def _has_hook(fn) -> bool:
    while isinstance(fn, _WRAPPERS) and not hasattr(fn, "pointwise_log_likelihood"):
        fn = fn.base_dist
    return hasattr(fn, "pointwise_log_likelihood")


def pointwise_log_likelihood(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn``'s log-likelihood of ``value``: its ``pointwise_log_likelihood`` where it has one (an
    observation model whose ``log_prob`` is a variational surrogate, e.g. the differential GP's
    :class:`~pyro_gpx.diffgp.likelihoods.GaussianVariationalExpectation`), else ``log_prob``; through
    masks, ``to_event`` and ``expand``."""
    if hasattr(fn, "pointwise_log_likelihood"):
        return fn.pointwise_log_likelihood(value)
    if not isinstance(fn, _WRAPPERS) or not _has_hook(fn):
        return fn.log_prob(value)
    lp = pointwise_log_likelihood(fn.base_dist, value)
    if isinstance(fn, dist.Independent):
        return sum_rightmost(lp, fn.reinterpreted_batch_ndims)
    if isinstance(fn, ExpandedDistribution):
        return lp.expand(torch.broadcast_shapes(lp.shape, fn.batch_shape))
    return lp if fn._mask is True else scale_and_mask(lp, mask=fn._mask)


def _run_shape(spec: SiteSpec, chunk_sizes: Mapping[str, int]) -> tuple[int, ...]:
    shape = list(spec.batch_shape)
    for plate, dim in spec.subsampled.items():
        shape[len(shape) + dim] = chunk_sizes[plate]
    return tuple(shape)


def _fit(tensor, batch: tuple[int, ...], event: tuple[int, ...], num_draws: int | None, mpn: int) -> torch.Tensor:
    """Broadcast a site tensor to ``[num_draws,] *batch, *event`` (dropping the padding dims)."""
    tensor = torch.as_tensor(tensor)
    if num_draws is None:
        return tensor.expand(batch + event)
    if tensor.shape == (num_draws,) + batch + event:  # right-aligned, without the padding dims
        return tensor
    padded = (num_draws,) + (1,) * (mpn - len(batch)) + batch + event
    if tensor.dim() > len(padded):
        raise _NotVectorizable(f"tensor of shape {tuple(tensor.shape)} does not fit draws x site shape {padded}")
    try:
        return tensor.expand(padded).reshape((num_draws,) + batch + event)
    except RuntimeError as e:
        raise _NotVectorizable(str(e)) from e


def _extract(trace, structure: ModelStructure, value_names, lp_names, chunk_sizes, num_draws, mpn):
    """Pull values, and pointwise scaled log-densities of observations, out of one trace."""
    values, lps, masks = {}, {}, {}
    for name in set(value_names) | set(lp_names):
        spec = structure.sites[name]
        site = trace.nodes.get(name)
        if site is None:
            raise _NotVectorizable(f"site {name!r} is missing from this run of the model")
        batch = _run_shape(spec, chunk_sizes)
        if name in value_names:
            values[name] = _fit(site["value"], batch, spec.event_shape, num_draws, mpn)
        if name in lp_names:
            scale = site["scale"] / _plate_scale(site)
            lps[name] = _fit(pointwise_log_likelihood(site["fn"], site["value"]) * scale, batch, (), num_draws, mpn)
            mask = _site_mask(site)
            masks[name] = None if mask is None else _fit(mask, batch, (), num_draws, mpn)
    return values, lps, masks


def _trace(model, data, args, kwargs, predictive: bool, plate=None):
    fn = ResampleObservations()(model) if predictive else model
    with torch.no_grad(), poutine.block(), plate if plate is not None else contextlib.nullcontext():
        return poutine.trace(poutine.condition(fn, data=data)).get_trace(*args, **kwargs)


@dataclass(frozen=True)
class _Request:
    """What one evaluation pass computes."""

    model: Callable
    structure: ModelStructure
    args: tuple
    kwargs: Mapping
    value_names: tuple[str, ...]
    lp_names: tuple[str, ...]
    predictive: bool


def _evaluate_batch(req: _Request, samples, num_draws: int, cond, chunk_sizes, vectorized: bool):
    mpn = req.structure.max_plate_nesting
    if vectorized:
        data = {}
        for name, value in samples.items():
            spec = req.structure.sites[name]
            data[name] = value.reshape((num_draws,) + (1,) * (mpn - len(spec.batch_shape)) + spec.value_shape)
        data.update(cond)
        try:  # the densities too: a site outside every plate may trace but not score batched draws
            trace = _trace(req.model, data, req.args, req.kwargs, req.predictive, vectorize_plate(num_draws, mpn))
            return _extract(trace, req.structure, req.value_names, req.lp_names, chunk_sizes, num_draws, mpn)
        except _NotVectorizable:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise _NotVectorizable(f"{type(e).__name__}: {e}") from e
    per_draw = []
    for i in range(num_draws):
        data = {k: v[i] for k, v in samples.items()}
        data.update(cond)
        trace = _trace(req.model, data, req.args, req.kwargs, req.predictive)
        try:
            per_draw.append(_extract(trace, req.structure, req.value_names, req.lp_names, chunk_sizes, None, mpn))
        except _NotVectorizable as e:  # not a batching problem: the model's sites change between runs
            raise ValueError(f"draw {i}: {e}") from None
    return tuple(
        {k: None if first[k] is None else torch.stack([d[part][k] for d in per_draw]) for k in first}
        for part, first in enumerate(per_draw[0])
    )


def _chunks(structure: ModelStructure):
    """Conditioning dicts that walk each subsampled plate through all its indices."""
    per_plate = []
    for name, (size, sub) in sorted(structure.subsample_plates.items()):
        chunks = []
        for start in range(0, size, sub):
            chunk = torch.arange(start, min(start + sub, size))
            if len(chunk) < sub:  # pad with already-covered indices; their values are recomputed identically
                chunk = torch.cat([chunk, torch.arange(sub - len(chunk))])
            chunks.append((name, chunk))
        per_plate.append(chunks)
    for combo in itertools.product(*per_plate):
        yield {name: c for name, c in combo}, {name: len(c) for name, c in combo}


def _scatter(full: torch.Tensor, part: torch.Tensor, spec: SiteSpec, cond: Mapping, draws: slice, event_ndim: int):
    """Write ``part`` into ``full`` at the draws ``draws`` and the chunk's plate indices."""
    if not spec.subsampled:
        full[draws] = part
        return
    ndim = full.dim()
    axes = [torch.arange(draws.start, draws.stop)] + [torch.arange(n) for n in full.shape[1:]]
    for plate, dim in spec.subsampled.items():
        axes[ndim - event_ndim + dim] = cond[plate]
    # every axis indexed by an open-grid tensor: the result keeps the axis order of ``full``
    index = tuple(ix.reshape([-1 if j == i else 1 for j in range(ndim)]) for i, ix in enumerate(axes))
    full[index] = part


def _check_draws(samples, num_draws: int) -> torch.Tensor:
    """Indices of the draws the batched evaluation is checked on: the first two, then those where each
    latent's first entry is smallest and largest (a model that branches on a latent's value, e.g. its
    sign, is batched wrongly, and typically at the extremes), at most ``_CHECK_DRAWS`` in all."""
    picked = list(range(min(2, num_draws)))
    for value in samples.values():
        flat = torch.as_tensor(value).reshape(num_draws, -1)
        if flat.shape[1] == 0 or not flat.is_floating_point():
            continue
        for index in (int(flat[:, 0].argmin()), int(flat[:, 0].argmax())):
            if index not in picked and len(picked) < _CHECK_DRAWS:
                picked.append(index)
    return torch.tensor(picked)


def _difference(batched, looped) -> str:
    """Where two ``_evaluate_batch`` results differ ("" if they agree); ``looped``'s sites are compared."""
    for part_b, part_l in zip(batched, looped):
        for name, b in part_l.items():
            a = part_b[name]
            if (a is None) != (b is None):
                return f"the mask of {name!r} differs"
            if a is None:
                continue
            if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-8, equal_nan=True):
                return f"site {name!r} differs between the batched and the per-draw evaluation"
    return ""


def _vectorization_ok(req: _Request, samples, num_draws: int) -> tuple[bool, str]:
    """Compare the batched evaluation with the per-draw loop on a few draws (:func:`_check_draws`).
    Posterior predictive draws are random, so each batched draw of the observations is scored again per
    draw, given its latents and the drawn observations, against the batched run's densities and values."""
    observed = tuple(s.name for s in req.structure.of_kind("observed"))
    deterministic = tuple(n for n in req.value_names if req.structure.sites[n].kind == "deterministic")
    check = replace(req, predictive=False, value_names=deterministic, lp_names=observed)
    cond, sizes = next(_chunks(req.structure))
    picked = _check_draws(samples, num_draws)
    n = len(picked)
    head = {k: v[picked] for k, v in samples.items()}
    try:
        batched = _evaluate_batch(check, head, n, cond, sizes, True)
        if req.predictive:
            with torch.random.fork_rng(devices=[]):  # the check leaves the draws' random stream alone
                drawn = _evaluate_batch(
                    replace(check, predictive=True, value_names=observed + deterministic), head, n, cond, sizes, True
                )
    except _NotVectorizable as e:
        return False, str(e)
    why = _difference(batched, _evaluate_batch(check, head, n, cond, sizes, False))
    if why or not req.predictive:
        return not why, why
    rescored = _evaluate_batch(check, {**head, **{k: drawn[0][k] for k in observed}}, n, cond, sizes, False)
    why = _difference(drawn, rescored)
    return not why, why and f"posterior predictive draws: {why}"


def evaluate_draws(
    model: Callable,
    samples: Mapping[str, torch.Tensor],
    structure: ModelStructure,
    args: tuple = (),
    kwargs: Mapping | None = None,
    *,
    predictive: bool = False,
    sites: list[str] | None = None,
    vectorize: bool | None = None,
    draw_batch: int | None = None,
) -> DrawEvaluation:
    """Evaluate ``model`` at every posterior draw.

    :param samples: latent site name to ``(num_draws, *value_shape)`` (constrained space).
    :param predictive: draw observed sites from the model (posterior predictive) instead of
        scoring the data (log-likelihood).
    :param sites: sites whose values to return; defaults to the deterministic sites, and the
        observed ones when ``predictive``. Pointwise log-likelihoods (not ``predictive``) are always
        computed for every observed site.
    :param vectorize: ``None`` tries a batched evaluation and falls back to a loop when the model
        is not shape-safe; ``True`` requires the batched path; ``False`` loops.
    :param draw_batch: draws per batched call (bounds memory); chosen from the data size if None.
    """
    if sites is None:
        kinds = ("observed", "deterministic") if predictive else ("deterministic",)
        sites = [s.name for s in structure.sites.values() if s.kind in kinds]
    req = _Request(
        model=model,
        structure=structure,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        value_names=tuple(sites),
        lp_names=() if predictive else tuple(s.name for s in structure.of_kind("observed")),
        predictive=predictive,
    )
    samples = dict(samples)
    num_draws = next(iter(samples.values())).shape[0] if samples else 1
    result = DrawEvaluation()
    if vectorize is None or vectorize:
        ok, why = _vectorization_ok(req, samples, num_draws) if num_draws > 1 else (True, "")
        if not ok and vectorize:
            raise ValueError(f"the model cannot be evaluated batched over draws: {why}")
        if not ok:
            logger.info("evaluating draws one at a time: %s", why)
        vectorize = ok
    result.vectorized = bool(vectorize)
    if draw_batch is not None:
        draw_batch = check_positive_int("draw_batch", draw_batch)
    else:
        numel = sum(math.prod(structure.sites[n].value_shape) for n in req.value_names)
        numel += sum(math.prod(structure.sites[n].batch_shape) for n in req.lp_names)
        draw_batch = max(1, min(num_draws, _DRAW_BATCH_ELEMENTS // max(numel, 1)))
    for cond, sizes in _chunks(structure):
        for start in range(0, num_draws, draw_batch):
            draws = slice(start, min(start + draw_batch, num_draws))
            batch = {k: v[draws] for k, v in samples.items()}
            try:
                parts = _evaluate_batch(req, batch, draws.stop - draws.start, cond, sizes, vectorize)
            except _NotVectorizable as e:  # a later batch of draws broke the batched path
                logger.info("draws %d-%d evaluated one at a time: %s", draws.start, draws.stop - 1, e)
                parts = _evaluate_batch(req, batch, draws.stop - draws.start, cond, sizes, False)
                result.vectorized = False
            targets: tuple[dict[str, Any], ...] = (result.values, result.log_likelihood, result.masks)
            for target, part_dict, with_event in zip(targets, parts, (True, False, False)):
                for name, part in part_dict.items():
                    spec = structure.sites[name]
                    if part is None:
                        target[name] = None
                        continue
                    if name not in target:
                        shape = (num_draws,) + spec.batch_shape + (spec.event_shape if with_event else ())
                        target[name] = torch.zeros(shape, dtype=part.dtype)
                    _scatter(target[name], part, spec, cond, draws, len(spec.event_shape) if with_event else 0)
    return result
