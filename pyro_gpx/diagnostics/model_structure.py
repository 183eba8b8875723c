"""What a Pyro model's sites look like, read off one conditioned trace.

The log-likelihood and posterior-predictive code needs, for every site, its batch and event
shapes, which plate labels each batch dimension, and which plates subsample. This module reads
that from a single trace of the model conditioned on one posterior draw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

__all__ = [
    "SiteSpec",
    "ModelStructure",
    "inspect_model",
    "is_factor",
    "is_deterministic",
    "is_observation",
    "quiet_trace",
]


def quiet_trace(model: Callable, args: tuple = (), kwargs: Mapping | None = None):
    """One run of ``model`` at prior draws, to read its structure: hidden from enclosing handlers, no
    graph, no density validation, and the caller's random stream left as it was."""
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(*args, **dict(kwargs or {}))


def fixed_constraint(support: constraints.Constraint) -> constraints.Constraint | None:
    """The base of ``support`` (inside any ``independent``) if it is one of Pyro's fixed constraints
    (``positive``, ``simplex``, ...), else ``None`` (a constraint of parameters, such as an ``interval``
    whose bounds are other latents)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support if any(support is c for c in vars(constraints).values()) else None


def is_factor(site: Mapping[str, Any]) -> bool:
    """``pyro.factor`` sites: observed ``Unit`` sites marked auxiliary."""
    return bool(site["infer"].get("is_auxiliary")) or type(site["fn"]).__name__ == "Unit"


def _unwrapped(fn):
    while isinstance(fn, (dist.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def is_deterministic(site: Mapping[str, Any]) -> bool:
    """``pyro.deterministic`` sites, and observed ``Delta`` sites: what reparameterizers leave behind
    (their ``log_density`` may carry a Jacobian or a prior, e.g. :class:`~pyro_gpx.bnn.RepriorisedReadout`),
    reported as values, not scored as data. Write a custom likelihood as ``pyro.factor`` or a
    distribution with a ``log_prob``, not as an observed ``Delta``."""
    if site["infer"].get("_deterministic"):
        return True
    return bool(site.get("is_observed")) and isinstance(_unwrapped(site["fn"]), dist.Delta)


def is_observation(site: Message, latent_names) -> bool:
    """A genuine observation: observed, not a factor, not deterministic, not a conditioned latent."""
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site_is_subsample(site)
        and not is_factor(site)
        and not is_deterministic(site)
        and site["name"] not in latent_names
    )


@dataclass(frozen=True)
class SiteSpec:
    """Shape information of one site for a single draw, with subsampled plates at full size.

    :ivar batch_shape: the distribution's batch shape.
    :ivar event_shape: trailing shape of the value beyond the batch shape.
    :ivar dim_names: one name per batch dimension: the plate's name where a plate labels it.
    :ivar subsampled: plate name to the (negative) batch dim it subsamples.
    :ivar marginal: an observed site whose distribution integrates latents out (a class attribute
        ``integrates_out_latents = True``, e.g. a collapsed BNN's or a GP's marginal likelihood): its
        draws come from the prior of what it integrates, so they are not posterior predictive draws.
    """

    name: str
    kind: str  # "latent" | "observed" | "deterministic"
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    dim_names: tuple[str, ...]
    subsampled: Mapping[str, int] = field(default_factory=dict)
    marginal: bool = False

    @property
    def value_shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.event_shape


@dataclass(frozen=True)
class ModelStructure:
    sites: Mapping[str, SiteSpec]
    max_plate_nesting: int
    #: plate name -> (full size, subsample size) for plates that subsample.
    subsample_plates: Mapping[str, tuple[int, int]]

    def of_kind(self, kind: str) -> list[SiteSpec]:
        return [s for s in self.sites.values() if s.kind == kind]


def _site_spec(site: Mapping[str, Any], kind: str, plate_sizes: Mapping[str, tuple[int, int]]) -> SiteSpec:
    fn = site["fn"]
    event_shape = tuple(getattr(fn, "event_shape", ()))
    value_shape = tuple(torch.as_tensor(site["value"]).shape)
    value_batch = value_shape[: max(len(value_shape) - len(event_shape), 0)]
    if kind == "deterministic":
        # plates broadcast a Delta's batch shape even when event_dim claimed the plate's dim;
        # the value itself is the truth
        batch_shape, event_shape = _deterministic_shapes(site, value_shape, value_batch, event_shape)
    else:
        batch_shape = tuple(torch.broadcast_shapes(tuple(getattr(fn, "batch_shape", ())), value_batch))
    names = [f"{site['name']}_dim_{i}" for i in range(len(batch_shape))]
    full_batch = list(batch_shape)
    subsampled = {}
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized or frame.dim is None or -frame.dim > len(batch_shape):
            continue
        pos = len(batch_shape) + frame.dim
        names[pos] = frame.name
        if frame.name in plate_sizes:
            full_batch[pos] = plate_sizes[frame.name][0]
            subsampled[frame.name] = frame.dim
    missing = sorted(f.name for f in site["cond_indep_stack"] if f.name in plate_sizes and f.name not in subsampled)
    if kind == "deterministic" and missing:
        raise ValueError(
            f"deterministic site {site['name']!r} lies in subsampled plate(s) {missing} but its value has no "
            "dimension for them, so it would hold one chunk's value; give it the plates' dimensions (e.g. "
            "pyro.deterministic(..., event_dim=0) for a value with one entry per data point)"
        )
    return SiteSpec(
        name=site["name"],
        kind=kind,
        batch_shape=tuple(full_batch),
        event_shape=event_shape,
        dim_names=tuple(names),
        subsampled=subsampled,
        marginal=_integrates_out_latents(fn),
    )


def _deterministic_shapes(
    site: Mapping[str, Any], value_shape: tuple[int, ...], batch: tuple[int, ...], event: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A deterministic site's (batch, event) shapes. Pyro's default ``event_dim`` is the value's ndim,
    which claims the enclosing plates' dims as event dims: a value whose trailing dims have the plates'
    sizes, right-aligned, is read as batched by those plates (as with ``event_dim=0``)."""
    frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None and -f.dim <= len(value_shape)]
    if any(-f.dim > len(batch) for f in frames) and all(value_shape[f.dim] == f.size for f in frames):
        return value_shape, ()
    # a value of size 1 along a plate it lies in (e.g. (A, 1) in plates of A and B) is broadcast as Pyro
    # broadcasts the Delta: read with the value's size, that plate's coordinate became 1 long
    plated = tuple(getattr(site["fn"], "batch_shape", ()))[-len(batch) :] if batch else ()
    return tuple(torch.broadcast_shapes(plated, batch)), event


def _integrates_out_latents(fn) -> bool:
    """Whether ``fn``, or a distribution it wraps (mask, ``to_event``, ``expand``), integrates latents out."""
    while fn is not None:
        if getattr(fn, "integrates_out_latents", False):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


class _GivenIndices(Messenger):
    """Records the plates whose subsample indices the model gives (``pyro.plate(..., subsample=idx)``):
    their sites arrive with a value, where Pyro draws the indices of the others."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def _pyro_sample(self, msg: Message) -> None:
        if site_is_subsample(msg) and msg["value"] is not None:
            self.names.add(str(msg["name"]))


def inspect_model(
    model: Callable,
    draw: Mapping[str, torch.Tensor],
    args: tuple = (),
    kwargs: Mapping | None = None,
) -> ModelStructure:
    """Trace ``model`` once, conditioned on one draw of its latents, and describe its sites.

    :raises ValueError: if the model has a latent site without a value in ``draw`` (its
        log-likelihood would silently use a prior sample), a latent inside a subsampled plate, a
        deterministic site without the dims of its subsampled plates, or a sequential subsampled plate.
    """
    kwargs = dict(kwargs or {})
    given = _GivenIndices()
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):  # subsampling draws indices
        trace = poutine.trace(poutine.condition(given(model), data=dict(draw))).get_trace(*args, **kwargs)
    unknown = sorted(k for k in draw if trace.nodes.get(k, {}).get("type") != "sample")
    if unknown:
        raise ValueError(f"the samples hold {unknown}, which are not sample sites of the model")
    own = quiet_trace(model, args, kwargs)  # an observed site in the samples would replace the data
    observed = sorted(
        k for k in draw if k in own.nodes and own.nodes[k]["is_observed"] and not is_deterministic(own.nodes[k])
    )
    if observed:
        raise ValueError(
            f"the samples hold the observed site(s) {observed} (e.g. Predictive's posterior predictive draws), "
            "which would replace the data; pass the latent sites only (posterior_predictive=True draws them)"
        )
    plate_sizes: dict[str, tuple[int, int]] = {}
    for name, site in trace.nodes.items():
        if site_is_subsample(site):
            fn: Any = site["fn"]  # pyro's _Subsample distribution
            indices: Any = site["value"]
            if name in given.names and len(indices) < fn.size:
                raise ValueError(
                    f"plate {name!r} runs on {len(indices)} of its {fn.size} indices given by the model "
                    "(pyro.plate(..., subsample=...), as a minibatch call with num_data= makes): its data are "
                    "that minibatch, and the log-likelihood needs them all; call the model with the full data"
                )
            sub = fn.subsample_size if fn.subsample_size is not None else len(indices)
            if sub < fn.size:
                plate_sizes[name] = (int(fn.size), int(sub))
    for site in trace.nodes.values():
        sequential = sorted(
            f.name for f in site.get("cond_indep_stack", ()) if not f.vectorized and f.name in plate_sizes
        )
        if sequential:
            raise ValueError(
                f"sequential (iterated) plate(s) {sequential} subsample, so each run of the model has other sites "
                f"(here {site['name']!r}); iterate over every index (no subsample_size) or use a vectorized plate"
            )
    sites: dict[str, SiteSpec] = {}
    dims = [0]
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        dims.extend(-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None)
        if is_factor(site):
            continue
        if is_deterministic(site):
            kind = "deterministic"
        elif site["name"] in draw:
            kind = "latent"
        elif site["is_observed"]:
            kind = "observed"
        else:
            enum = (site["infer"] or {}).get("enumerate")
            hint = " (an enumerated discrete site: marginalised sites are not supported)" if enum else ""
            raise ValueError(
                f"latent site {site['name']!r} has no posterior samples{hint}; pass samples for every latent "
                f"site of the model, or remove the site"
            )
        spec = _site_spec(site, kind, plate_sizes)
        if kind == "latent" and spec.subsampled:
            raise ValueError(
                f"latent site {site['name']!r} lies in subsampled plate(s) {sorted(spec.subsampled)}; "
                "local latents under subsampling are not supported"
            )
        sites[name] = spec
    return ModelStructure(sites=sites, max_plate_nesting=max(dims), subsample_plates=plate_sizes)


def first_draw(samples: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[0] for k, v in samples.items()}


def vectorize_plate(num_draws: int, max_plate_nesting: int) -> pyro.plate:
    """The plate that batches posterior draws, left of every model plate."""
    return pyro.plate("_pyro_gpx_draws", num_draws, dim=-max_plate_nesting - 1)
