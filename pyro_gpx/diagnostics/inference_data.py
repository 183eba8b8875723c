"""Pyro results to ArviZ: MCMC runs, trained guides and sample dictionaries.

ArviZ 0.x's ``from_pyro`` scores observations with ``fn.log_prob`` alone, so masks,
``poutine.scale`` and subsampling are ignored, ``pyro.factor`` sites are scored as data, models
that are not shape-safe under vectorisation break it, and guides are not accepted; ArviZ 1.x
has no Pyro converter. :func:`to_inference_data` computes every group itself and works with both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
import xarray as xr
from pyro.distributions import constraints
from pyro.infer import MCMC

from .._random import seeded
from .._validation import is_integer
from .arviz_compat import build_inference_data
from .conditioned import evaluate_draws
from .guide_samples import sample_guide
from .model_structure import ModelStructure, SiteSpec, first_draw, fixed_constraint, inspect_model, quiet_trace
from .sample_stats import SampleStatsRecorder, mcmc_sample_stats

__all__ = ["to_inference_data"]


def _numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _site_dims(spec: SiteSpec, with_event: bool = True) -> list[str]:
    dims = list(spec.dim_names)
    if with_event:
        dims += [f"{spec.name}_dim_{len(dims) + i}" for i in range(len(spec.event_shape))]
    return dims


def _resolve_posterior(
    posterior, model, model_args, model_kwargs, num_samples, group_by_chain, vectorize
) -> tuple[Callable | None, tuple, dict, dict[str, torch.Tensor], dict[str, np.ndarray], ModelStructure | None]:
    """Return (model, args, kwargs, samples of shape (chain, draw, ...), sample_stats, structure)."""
    stats: dict[str, np.ndarray] = {}
    structure: ModelStructure | None = None
    if isinstance(posterior, MCMC):
        if getattr(posterior, "_samples", None) is None:
            raise ValueError("the MCMC posterior has no samples; call its run(...) first")
        kernel_model = getattr(posterior.kernel, "model", None)
        model = model if model is not None else kernel_model
        if model_args is None:
            model_args = getattr(posterior, "_args", None) or ()
        if model_kwargs is None:
            model_kwargs = getattr(posterior, "_kwargs", None) or {}
        samples = posterior.get_samples(group_by_chain=True)
        stats = mcmc_sample_stats(posterior)
    elif isinstance(posterior, Mapping):  # (an xarray Dataset of a saved posterior too: its values as arrays)
        if isinstance(posterior, getattr(xr, "DataTree", ())):  # ArviZ 1.x's idata.posterior
            posterior = posterior.to_dataset()  # type: ignore[attr-defined]
        if isinstance(posterior, xr.Dataset):  # read by dimension name: a transposed one swapped chain and draw
            lead_dims = [d for d in (("chain", "draw") if group_by_chain else ("draw",)) if d in posterior.dims]
            posterior = posterior.transpose(*lead_dims, ...)
        samples = {k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for k, v in posterior.items()}
        lead = ("chain", "draw") if group_by_chain else ("draw",)
        for name, value in samples.items():
            if value.dim() < len(lead) or 0 in value.shape[: len(lead)]:
                raise ValueError(
                    f"samples of {name!r} have shape {tuple(value.shape)}; expected leading {lead} dimensions of "
                    f"size >= 1 (group_by_chain={group_by_chain})"
                )
        if not group_by_chain:
            samples = {k: v.unsqueeze(0) for k, v in samples.items()}
        sizes = {tuple(v.shape[:2]) for v in samples.values()}
        if len(sizes) > 1:
            raise ValueError(f"posterior samples disagree in their (chain, draw) sizes: {sorted(sizes)}")
    elif callable(posterior):
        if model is None:
            raise ValueError("model is required when posterior is a guide")
        flat, structure = sample_guide(
            posterior, model, num_samples, model_args or (), model_kwargs or {}, vectorize=vectorize
        )
        samples = {k: v.unsqueeze(0) for k, v in flat.items()}
    else:
        raise TypeError(
            f"posterior must be a pyro.infer.MCMC, a dict of samples or a guide, got {type(posterior).__name__}"
        )
    return model, tuple(model_args or ()), dict(model_kwargs or {}), samples, stats, structure


def _constant_masks(evaluation) -> dict[str, np.ndarray]:
    """Observed site name to its flattened keep-mask, for sites masked the same way in every draw."""
    out = {}
    for name in evaluation.log_likelihood:
        mask = evaluation.masks.get(name)
        if mask is None or bool(mask.all()):
            continue
        mask = _numpy(mask)
        if (mask == mask[:1]).all():
            out[name] = mask[0].reshape(-1)
    return out


def _points_dims(spec: SiteSpec, part: str) -> list[str]:
    """Dims of a masked site's values split into points: ``<name>_<part>_id`` then its event dims."""
    return [f"{spec.name}_{part}_id"] + [f"{spec.name}_dim_{1 + i}" for i in range(len(spec.event_shape))]


def _split_masked(values, specs, keep_masks, lead: int, unobserved: bool):
    """Values (with ``lead`` sample axes) of masked sites split PyMC-style into the kept points, under
    the site's name, and (``unobserved=True``) the masked-out ones, under ``<name>_unobserved``;
    returns (values, dims)."""
    out, dims = {}, {}
    for name, value in values.items():
        spec = specs[name]
        if name not in keep_masks:
            out[name], dims[name] = value, _site_dims(spec)
            continue
        keep = keep_masks[name]
        flat = value.reshape(value.shape[:lead] + (-1,) + tuple(spec.event_shape))
        out[name], dims[name] = flat[(slice(None),) * lead + (keep,)], _points_dims(spec, "observed")
        if unobserved and not keep.all():
            extra = f"{name}_unobserved"
            out[extra], dims[extra] = flat[(slice(None),) * lead + (~keep,)], _points_dims(spec, "unobserved")
    return out, dims


def _points_coords(keep_masks) -> dict[str, np.ndarray]:
    coords = {}
    for name, keep in keep_masks.items():
        coords[f"{name}_observed_id"] = np.flatnonzero(keep)
        coords[f"{name}_unobserved_id"] = np.flatnonzero(~keep)
    return coords


def _pointwise_log_likelihood(structure, evaluation, keep_masks, num_chains, num_draws):
    """Log-likelihood arrays and their dims; masked-out points are dropped, not scored."""
    data, dims = {}, {}
    for name, lp in evaluation.log_likelihood.items():
        spec = structure.sites[name]
        mask = evaluation.masks.get(name)
        lp = _numpy(lp)
        if name in keep_masks:
            data[name] = lp.reshape(lp.shape[0], -1)[:, keep_masks[name]].reshape(num_chains, num_draws, -1)
            dims[name] = [f"{name}_observed_id"]
        elif mask is None or bool(mask.all()):
            data[name] = lp.reshape((num_chains, num_draws) + spec.batch_shape)
            dims[name] = _site_dims(spec, with_event=False)
        else:
            warnings.warn(
                f"the mask of site {name!r} changes between draws; masked points get log-likelihood 0",
                stacklevel=3,
            )
            data[name] = np.where(_numpy(mask), lp, 0.0).reshape((num_chains, num_draws) + spec.batch_shape)
            dims[name] = _site_dims(spec, with_event=False)
    return data, dims


def to_inference_data(
    posterior: MCMC | Mapping[str, Any] | Callable,
    *,
    model: Callable | None = None,
    model_args: Sequence | None = None,
    model_kwargs: Mapping | None = None,
    num_samples: int = 1000,
    group_by_chain: bool = False,
    log_likelihood: bool = True,
    posterior_predictive: bool = False,
    observed_data: bool = True,
    constant_data: Mapping[str, Any] | None = None,
    sample_stats: Mapping[str, Any] | SampleStatsRecorder | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    vectorize: bool | None = None,
    draw_batch: int | None = None,
    seed: int | None = None,
):
    r"""Convert a Pyro posterior into an ArviZ object with a correct ``log_likelihood`` group.

    The posterior is one of

    * a finished :class:`pyro.infer.MCMC` run: all chains, and ``sample_stats`` with
      ``diverging`` plus, when the run used a :class:`SampleStatsRecorder` hook, ``step_size``,
      ``acceptance_rate``, ``lp`` and ``n_steps``;
    * a trained guide (any callable guide, e.g. an autoguide): ``num_samples`` draws form one chain;
    * a dict of samples, ``(draw, ...)`` or, with ``group_by_chain=True``, ``(chain, draw, ...)``.

    For each draw the model is run conditioned on the latents (batched over draws when the model
    is shape-safe, verified against a per-draw loop on a few draws, including each latent's extremes;
    looped otherwise; pass ``vectorize=False`` for a model whose control flow depends on latent values). Every
    observed site contributes its pointwise log-density

    .. math:: \ell_{s,i} = c_i \log p(y_i \mid \theta_s),

    where :math:`c_i` is the ``poutine.scale`` factor without the subsampling factor. Masked
    points are left out, ``pyro.factor`` and ``pyro.deterministic`` sites are not observations, and
    subsampled plates are walked through in chunks so every data point appears once, labelled by
    its plate. Deterministic sites join the ``posterior`` group. A site masked the same way in every
    draw is split as PyMC splits missing data: its kept points, under ``<name>_observed_id``, in
    ``log_likelihood``, ``observed_data`` and ``posterior_predictive`` alike (so ``az.loo_pit`` and
    ``az.plot_ppc`` line up), and the predictive draws at its masked-out points as
    ``<name>_unobserved`` in ``posterior_predictive``.

    :param model: the Pyro model; taken from the MCMC kernel when omitted.
    :param model_args: arguments of the model; taken from the MCMC run when omitted.
    :param model_kwargs: keyword arguments of the model.
    :param num_samples: draws taken from a guide.
    :param group_by_chain: whether dict samples have a leading chain dimension.
    :param log_likelihood: add the ``log_likelihood`` group.
    :param posterior_predictive: add a ``posterior_predictive`` group, drawing every observed site
        from the model at each posterior draw (refused for sites whose distribution integrates
        latents out, such as a collapsed BNN's or a GP's marginal likelihood: ``ValueError``).
    :param observed_data: add the observed values as ``observed_data``.
    :param constant_data: arrays to store as ``constant_data`` (e.g. covariates).
    :param sample_stats: extra ``(chain, draw)`` statistics, or the recorder used in the run.
    :param coords: coordinate values by dimension name.
    :param dims: dimension names by variable, overriding the plate-derived names.
    :param vectorize: ``None`` batches draws when safe, ``True`` insists, ``False`` loops.
    :param draw_batch: draws per batched model call.
    :param seed: seed for the guide draws and the posterior predictive; the caller's torch, NumPy and
        Python random states are left as they were.
    :returns: ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).
    :raises ValueError: if a latent site has no samples (discrete sites marginalised by enumeration
        included: they are not supported), a latent lies in a subsampled plate, or the samples hold
        observed sites (e.g. ``Predictive``'s replicated data) or names that are not sites of the model;
        if samples do not have the shape of the site in a prior run of the model (after the leading
        ``(chain, draw)`` or ``(draw,)`` dims; leading singleton dims, as ``Predictive`` adds, are dropped),
        or are not finite, or lie outside a fixed support (``positive``, ``simplex``, ...); if a
        ``sample_stats`` variable does not start with the posterior's ``(chain, draw)``.

    Observed ``Delta`` sites are reported as values, not scored (reparameterizers leave them, with a
    Jacobian as their density); write a custom likelihood as ``pyro.factor`` or a distribution.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import MCMC, NUTS
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, disable_progbar=True)
        >>> mcmc.run(torch.randn(5))
        >>> idata = to_inference_data(mcmc)
        >>> tuple(idata.log_likelihood["y"].dims)
        ('chain', 'draw', 'data')
    """
    _check_arguments(model_args, model_kwargs, constant_data, coords, dims, seed,
                     log_likelihood=log_likelihood, posterior_predictive=posterior_predictive,
                     observed_data=observed_data, group_by_chain=group_by_chain)  # fmt: skip
    with seeded(seed):
        return _to_inference_data(
            posterior, model, model_args, model_kwargs, num_samples, group_by_chain, log_likelihood,
            posterior_predictive, observed_data, constant_data, sample_stats, coords, dims, vectorize, draw_batch,
        )  # fmt: skip


def _check_arguments(model_args, model_kwargs, constant_data, coords, dims, seed, **flags) -> None:
    """Name a malformed argument up front (they failed deep inside, e.g. a tensor as ``model_args`` with
    "Boolean value of Tensor ... is ambiguous", or ``dims={"y": "obs"}`` split into letters)."""
    if model_args is not None and (
        torch.is_tensor(model_args) or isinstance(model_args, np.ndarray | str | Mapping)
        or not isinstance(model_args, Sequence)
    ):  # fmt: skip
        raise TypeError(f"model_args must be a tuple or list of the model's arguments, got {type(model_args).__name__}")
    for name, value in (("model_kwargs", model_kwargs), ("constant_data", constant_data), ("coords", coords),
                        ("dims", dims)):  # fmt: skip
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict (mapping), got {type(value).__name__}")
    for name, value in (dims or {}).items():
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"dims[{name!r}] must be a list of dimension names, got {value!r}")
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def _to_inference_data(
    posterior: MCMC | Mapping[str, Any] | Callable,
    model: Callable | None,
    model_args: Sequence | None,
    model_kwargs: Mapping | None,
    num_samples: int,
    group_by_chain: bool,
    log_likelihood: bool,
    posterior_predictive: bool,
    observed_data: bool,
    constant_data: Mapping[str, Any] | None,
    sample_stats: Mapping[str, Any] | SampleStatsRecorder | None,
    coords: Mapping[str, Any] | None,
    dims: Mapping[str, Sequence[str]] | None,
    vectorize: bool | None,
    draw_batch: int | None,
):
    """:func:`to_inference_data` within its random state."""
    model, args, kwargs, samples, stats, structure = _resolve_posterior(
        posterior, model, model_args, model_kwargs, num_samples, group_by_chain, vectorize
    )
    if not samples:
        raise ValueError("the posterior has no latent samples")
    if model is not None:
        from_numpy = (
            {k for k, v in posterior.items() if not torch.is_tensor(v)} if isinstance(posterior, Mapping) else set()
        )
        samples, given_deterministic = _match_model_sites(samples, model, args, kwargs, group_by_chain, from_numpy)
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape((num_chains * num_draws,) + v.shape[2:]) for k, v in samples.items()}
    needs_model = log_likelihood or posterior_predictive or observed_data
    if model is None and needs_model:
        raise ValueError("model is required for the log_likelihood, posterior_predictive and observed_data groups")

    groups: dict[str, dict[str, np.ndarray]] = {"posterior": {}}
    group_dims: dict[str, dict[str, list[str]]] = {}
    all_coords: dict[str, Any] = {}
    attrs: dict[str, Any] = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "creation_library": "pyro_gpx",
    }

    if model is not None:
        if structure is None:
            structure = inspect_model(model, first_draw(flat), args, kwargs)
        for spec in structure.sites.values():
            for dim_name, size in zip(spec.dim_names, spec.batch_shape):
                all_coords.setdefault(dim_name, np.arange(size))
        evaluation = evaluate_draws(
            model, flat, structure, args, kwargs, predictive=False, vectorize=vectorize, draw_batch=draw_batch
        )
        attrs["log_likelihood_vectorized"] = int(evaluation.vectorized)
        group_dims["posterior"] = {s.name: _site_dims(s) for s in structure.sites.values()}
        for name, value in evaluation.values.items():
            groups["posterior"][name] = _numpy(value).reshape((num_chains, num_draws) + tuple(value.shape[1:]))
        _check_given_deterministic(given_deterministic, groups["posterior"])
        keep_masks = _constant_masks(evaluation)
        all_coords.update(_points_coords(keep_masks))
        if log_likelihood:
            ll, ll_dims = _pointwise_log_likelihood(structure, evaluation, keep_masks, num_chains, num_draws)
            nan = [name for name, value in ll.items() if np.isnan(value).any()]
            _check_observed_finite(model, flat, structure, args, kwargs, nan)
            groups["log_likelihood"] = ll
            group_dims["log_likelihood"] = ll_dims
        observed = [s.name for s in structure.of_kind("observed")]
        if observed_data and observed:
            once = evaluate_draws(
                model, {k: v[:1] for k, v in flat.items()}, structure, args, kwargs, sites=observed, vectorize=False
            )
            values = {k: _numpy(v[0]) for k, v in once.values.items()}
            groups["observed_data"], group_dims["observed_data"] = _split_masked(
                values, structure.sites, keep_masks, lead=0, unobserved=False
            )
        marginal = [name for name in observed if structure.sites[name].marginal]
        if posterior_predictive and marginal:
            raise ValueError(
                f"site(s) {marginal} integrate latents out (a marginal likelihood: a collapsed BNN, a GP); their draws "
                "would come from the prior of what they integrate, not from the posterior. Leave "
                "posterior_predictive=False, and predict with the model's own tools (pyro_gpx.bnn."
                "predictions_to_inference_data, ComputationAwareGP.predictive_distribution)"
            )
        if posterior_predictive and observed:
            pred = evaluate_draws(
                model, flat, structure, args, kwargs, predictive=True, sites=observed,
                vectorize=vectorize if vectorize is not None or evaluation.vectorized else False, draw_batch=draw_batch,
            )  # fmt: skip
            values = {
                k: _numpy(v).reshape((num_chains, num_draws) + tuple(v.shape[1:])) for k, v in pred.values.items()
            }
            groups["posterior_predictive"], group_dims["posterior_predictive"] = _split_masked(
                values, structure.sites, keep_masks, lead=2, unobserved=True
            )

    for name, value in samples.items():
        groups["posterior"][name] = _numpy(value)
    if isinstance(sample_stats, SampleStatsRecorder) and isinstance(posterior, MCMC):
        stats = mcmc_sample_stats(posterior, sample_stats)
    elif isinstance(sample_stats, SampleStatsRecorder):
        recorded = sample_stats.as_arrays(num_chains, num_draws)
        if not recorded:
            raise ValueError(
                f"sample_stats: the SampleStatsRecorder holds no complete record of {num_chains} chain(s) x "
                f"{num_draws} draws"
            )
        stats = {**stats, **recorded}
    elif isinstance(sample_stats, Mapping):
        stats = {**stats, **{k: _numpy(v) for k, v in sample_stats.items()}}
    for name, stat in stats.items():
        if stat.shape[:2] != (num_chains, num_draws):
            raise ValueError(
                f"sample_stats[{name!r}] has shape {stat.shape}; expected leading (chain, draw) = "
                f"{(num_chains, num_draws)}, as the posterior"
            )
    if stats:
        groups["sample_stats"] = stats
    if constant_data:
        groups["constant_data"] = {k: _numpy(v) for k, v in constant_data.items()}
    all_coords.update(coords or {})
    group_dims = _without(group_dims, dims)
    return build_inference_data(groups, dims=dims, group_dims=group_dims, coords=all_coords, attrs=attrs)


def _in_support(site, value: torch.Tensor) -> torch.Tensor | None:
    """Whether each draw of ``value`` lies in the support of the site's distribution, where that support
    is one of Pyro's fixed constraints (``positive``, ``simplex``, ...: not one of parameters, such as an
    ``interval`` whose bounds are other latents); ``None`` where it is not."""
    support = fixed_constraint(site["fn"].support)
    if support is None:
        return None
    if support is constraints.simplex:
        # Pyro's check allows the sum 1e-6 off 1, but a float32 simplex of K entries (Pyro's own MCMC and guide
        # draws, through its stick-breaking transform) is rounded by up to about K eps: 4e-6 at K = 20 000
        tol = max(1e-6, torch.finfo(value.dtype).eps * value.shape[-1])
        inside = (value >= 0).all(-1) & ((value.double().sum(-1) - 1).abs() <= tol)
    else:
        inside = support.check(value)
    return inside.reshape(value.shape[:2] + (-1,)).all(-1)


def _check_observed_finite(model, flat, structure, args, kwargs, names: list[str]) -> None:
    """Name an observed site whose (kept) values hold NaN or inf, where its log-likelihood came out NaN (with
    Pyro's validation off; on, Pyro's own error names the distribution, not the site)."""
    names = [name for name in names if name in structure.sites]
    if not names:
        return
    once = evaluate_draws(model, {k: v[:1] for k, v in flat.items()}, structure, args, kwargs, sites=names,
                          vectorize=False)  # fmt: skip
    for name in names:
        value = once.values.get(name)
        mask = once.masks.get(name)
        if value is None or not torch.is_tensor(value) or not value.is_floating_point():
            continue
        spec = structure.sites[name]
        finite = torch.isfinite(value[0]).reshape(tuple(spec.batch_shape) + (-1,)).all(-1)
        if mask is not None:
            finite = finite | ~mask[0].expand(finite.shape).bool()
        if not bool(finite.all()):
            raise ValueError(f"the observed values of site {name!r} contain NaN or inf")


def _check_given_deterministic(given: Mapping[str, torch.Tensor], recomputed: Mapping[str, np.ndarray]) -> None:
    """Deterministic sites in the samples (``Predictive`` returns them) are recomputed from the latents, not
    conditioned on (a value there replaced what the model computes, silently); the given ones must agree."""
    for name, value in given.items():
        ours = recomputed.get(name)
        theirs = _numpy(value)
        if ours is not None and theirs.size == ours.size:
            theirs = theirs.reshape(ours.shape)  # (Predictive's leading singleton dims)
        if ours is None or theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"samples of the deterministic site {name!r} disagree with the model's value recomputed from the "
                "latents (other inputs, or edited values?); leave it out of the samples: it is recomputed"
            )


def _match_model_sites(
    samples, model, args, kwargs, group_by_chain: bool, from_numpy: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Check ``(chain, draw, ...)`` samples against the latent sites of a prior run of ``model`` (not one
    conditioned on the samples, which would take their shape): the per-draw shape, dropping the leading
    singleton dims that ``Predictive`` adds; finite values in the site's support. Floating samples given
    as arrays (``from_numpy``: NumPy's float64 whatever the model's dtype) take the site's dtype.
    Deterministic sites are set apart (second dict): the model recomputes them."""
    try:
        prior = quiet_trace(model, args, kwargs)
    except Exception:  # noqa: BLE001 -- a prior that cannot be drawn from (improper): a run at the first draw
        first = {k: v[0, 0] for k, v in samples.items()}
        prior = quiet_trace(poutine.condition(model, data=first), args, kwargs)
    out, deterministic = {}, {}
    for name, value in samples.items():
        site = prior.nodes.get(name)
        if site is not None and site["type"] == "sample" and site["infer"].get("_deterministic"):
            deterministic[name] = value
            continue
        if site is None or site["type"] != "sample" or site["is_observed"]:  # refused by inspect_model
            out[name] = value
            continue
        want, got = tuple(site["value"].shape), tuple(value.shape[2:])
        extra = len(got) - len(want)
        if extra > 0 and got[extra:] == want and set(got[:extra]) == {1}:
            value = value.reshape(value.shape[:2] + want)
        elif got != want:
            hint = (
                "; pass group_by_chain=True for (chain, draw, ...) samples"
                if not group_by_chain and got[1:] == want
                else ""
            )
            raise ValueError(f"samples of {name!r} have shape {got} per draw; the model's site has shape {want}{hint}")
        if value.is_floating_point() and site["value"].is_floating_point():
            if name in from_numpy:
                value = value.to(site["value"].dtype)
            bad = ~torch.isfinite(value).reshape(value.shape[:2] + (-1,)).all(-1)
            kind = "non-finite values"
            if not bad.any():
                inside = _in_support(site, value)
                bad, kind = (bad, kind) if inside is None else (~inside, f"values outside {site['fn'].support}")
            if bad.any():
                chain, draw = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"samples of {name!r} have {kind} (first at chain {chain}, draw {draw})")
        out[name] = value
    return out, deterministic


def _without(group_dims, user_dims):
    """User-given dims take precedence over the plate-derived ones, except that a masked site keeps
    its ``<name>_observed_id`` (the kept points' indices) in every group, and a site with event
    dimensions takes only the user's leading (batch) dims in ``log_likelihood``."""
    if not user_dims:
        return group_dims
    out = {}
    for group, dims in group_dims.items():
        kept = {}
        for name, value in dims.items():
            masked = list(value[:1]) == [f"{name}_observed_id"]
            if name not in user_dims or masked:
                kept[name] = value
            elif group == "log_likelihood":
                kept[name] = list(user_dims[name])[: len(value)]
        out[group] = kept
    return out
