"""The unnormalised log posterior of a Pyro model in the unconstrained space of an autoguide, batched.

:math:`\\log\\rho(z) = \\log p(x, T(z)) + \\log|\\det J_T(z)|` for a batch of flat unconstrained vectors
``z`` of shape ``(B, D)``: the model runs once under a plate over the batch (left of its own
plates and of any enclosing plate, such as ``Trace_ELBO``'s vectorised particles, with Pyro's handlers
above it blocked), or once per row if it is not shape-safe.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from itertools import zip_longest

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import is_validation_enabled, scale_and_mask
from pyro.poutine.runtime import _DIM_ALLOCATOR
from pyro.poutine.util import site_is_subsample

from ..diagnostics.model_structure import fixed_constraint, quiet_trace

__all__ = ["UnconstrainedTarget"]


class LatentShapeError(ValueError):
    """A latent site's shape in a model run differs from the guide's (fixed at its first call)."""


def plate_context() -> tuple:
    """The plate dimensions held by enclosing plates (``()`` outside any), as a hashable key.

    Read from Pyro's global dimension allocator, which also sees plates whose messages a
    ``poutine.block`` hides (their dimensions stay taken)."""
    return tuple(_DIM_ALLOCATOR._stack)


def _max_plate_nesting(trace) -> int:
    dims = [0]
    for site in trace.nodes.values():
        if site["type"] == "sample":
            dims += [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims)


def _distinct_rows(z: torch.Tensor) -> torch.Tensor:
    """Two rows of ``z`` made to differ in every coordinate, to check batched model runs against a loop:
    identical rows (all PIS paths start at one point; a single path) hide a model that mixes its rows,
    and a batch of 1 hides broadcasting errors. Deterministic: the random state is not touched."""
    D = z.shape[-1]
    offset = 0.1 * torch.cos(1.7 * torch.arange(D, dtype=z.dtype, device=z.device) + 0.3)
    return torch.stack([z[0], z[-1] + offset])


class UnconstrainedTarget:
    """Batched :math:`\\log\\rho` and :math:`\\nabla\\log\\rho` for an ``AutoContinuous`` guide's latent space.

    :param guide: an ``AutoContinuous`` whose prototype trace is set up.
    :param model: the model (not wrapped in the guide's ``InitMessenger``).
    :param args: its positional arguments.
    :param kwargs: its keyword arguments.
    :param max_plate_nesting: the model's plate nesting (found by tracing it once if not given).
    :param vectorized: whether the model runs batched (found on the first call if not given; see
        :attr:`vectorized` to cache the finding, which holds for the enclosing plates in :attr:`context`).
    :param observed_checked: whether these arguments' observed values were already checked against
        their supports (:meth:`check_observed`; done on the first :meth:`log_density` otherwise, with
        Pyro's validation on).
    """

    def __init__(
        self,
        guide,
        model: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        max_plate_nesting: int | None = None,
        vectorized: bool | None = None,
        observed_checked: bool = False,
    ):
        if guide.prototype_trace is None:
            raise ValueError("set up the guide's prototype first (call it once)")
        self.guide, self.model, self.args, self.kwargs = guide, model, tuple(args), dict(kwargs or {})
        # the guide's latents: conditioned in every run, they show as observed but are not data
        self._latents = frozenset(name for name, _ in guide.prototype_trace.iter_stochastic_nodes())
        if max_plate_nesting is None:
            with poutine.block(expose_types=["param"]), pyro.validation_enabled(False):
                prototype = {name: site["value"] for name, site in guide.prototype_trace.iter_stochastic_nodes()}
                conditioned = poutine.condition(model, data=prototype)  # improper priors cannot be sampled
                max_plate_nesting = _max_plate_nesting(poutine.trace(conditioned).get_trace(*self.args, **self.kwargs))
        self.max_plate_nesting = max_plate_nesting
        self.vectorized = vectorized
        self._observed_checked = observed_checked or not is_validation_enabled()
        #: set by the guide: how each observed site is checked from the first batched run (see :meth:`check_observed`)
        self.quick_checks: dict[str, str] | None = None
        #: whether the last check saw a subsample of a plate only (a minibatch): the data are then never
        #: taken as checked, and every later run checks its own minibatch
        self.checked_subsample = False
        self.quick_checks_done = False
        self.latent_shapes_checked = False  # the shapes depend on the model's arguments only: checked once
        self.on_quick_checked: Callable[[], None] | None = None  # called once the quick check has passed
        #: observed sites found with NaN or inf values in masked-out entries (scored at a draw instead)
        self.masked_non_finite: set[str] = set()
        self.context = plate_context()  # the enclosing plates under which `vectorized` holds
        taken = [-(i + 1) for i, name in enumerate(self.context[:max_plate_nesting]) if name is not None]
        if taken:  # the model's own plates would move to other dims, and its density would be wrong
            raise ValueError(
                f"the guide runs the model (for its score) inside an enclosing plate at dim {taken}, which the "
                f"model's own plates need (it nests {max_plate_nesting} deep). Predictive(parallel=True) sizes "
                "its plate from the guide alone: use Predictive(parallel=False), or "
                "AutoDiffusion(..., use_score=False)"
            )

    def check_observed(self) -> dict[str, str] | None:
        """With Pyro's validation on, score the observed sites once as ``Trace_ELBO`` would, at the guide's
        prototype point: a value outside its distribution's support raises ``ValueError`` naming the site.
        (The batched runs switch validation off, for sampled points where a parameter over- or underflows;
        a distribution built with ``validate_args=False``, or one that does not validate, passes here too.)

        :returns: per observed site, how its values can be checked later from a batched run
            (:attr:`quick_checks`): ``"support"`` where its distribution validates and its support is a fixed
            constraint (``positive``, ``simplex``, ...), ``"full"`` where the support depends on parameters
            (new values take this full check again), ``"finite"`` where the distribution does not validate;
            ``None`` if the model failed to run.
        """
        self._observed_checked = True
        prototype = {name: site["value"] for name, site in self.guide.prototype_trace.iter_stochastic_nodes()}
        try:
            conditioned = poutine.condition(self.model, data=prototype)
            with poutine.block(expose_types=["param"]):
                trace = poutine.trace(conditioned).get_trace(*self.args, **self.kwargs)
        except Exception:  # e.g. invalid parameters at the prototype: the batched runs report what they find
            return None
        self.check_latent_shapes(trace)
        quick = {}
        self.checked_subsample = _subsampled(trace)
        for name, site in _observed_nodes(trace, self._latents):
            value = site["value"]
            _check_finite_observed(name, value)
            try:
                site["fn"].log_prob(value)
            except ValueError as error:
                message = f"the observed values of site {name!r} are not valid for its distribution: {error}"
                raise ValueError(message) from error
            if not getattr(site["fn"], "_validate_args", False):
                quick[name] = "finite"
            else:
                quick[name] = "support" if _fixed_support(site["fn"]) is not None else "full"
        return quick

    def _quick_check(self, trace) -> None:
        """Check new observed values from a batched run's trace against the supports recorded by an earlier
        :meth:`check_observed` on other data of the same model (:attr:`quick_checks`), instead of tracing
        the model once more per data set: that trace was a quarter of an implicit-BLL minibatch step. A site
        the record does not know gets the full check."""
        assert self.quick_checks is not None
        for name, site in _observed_nodes(trace, self._latents):
            if self.quick_checks.get(name, "full") == "full":  # a support of parameters, or a site not recorded
                self.check_observed()
                break
            value = site["value"]
            _check_finite_observed(name, value)
            support = _fixed_support(site["fn"]) if self.quick_checks[name] == "support" else None
            if support is not None and torch.is_tensor(value) and not bool(support.check(value).all()):
                raise ValueError(
                    f"the observed values of site {name!r} are not valid for its distribution: some lie outside "
                    f"its support {support}"
                )
        # only now: an error raised inside log_density's batching probe, which reads errors as "not batched",
        # is raised again by the evaluation after it
        self.quick_checks_done = True
        if self.on_quick_checked is not None and not _subsampled(trace):
            self.on_quick_checked()

    def _conditioned(self, z: torch.Tensor, batch: int | None):
        """Constrained site values and the log-Jacobian: ``z`` is ``(B, 1, ..., D)`` with ``batch=B``
        (returns ``(B,)``) or a single ``(D,)`` row with ``batch=None`` (returns a scalar)."""
        values, log_jac = {}, 0.0
        for site, unconstrained in self.guide._unpack_latent(z):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            ldj = transform.log_abs_det_jacobian(unconstrained, value)
            if batch is None:
                log_jac = log_jac + ldj.sum()
            else:
                log_jac = log_jac + ldj.expand(unconstrained.shape[: ldj.dim()]).reshape(batch, -1).sum(-1)
            values[site["name"]] = value
        return values, log_jac

    def _particle_dim(self) -> int:
        """The dimension of the plate over paths: left of the model's plates and of every enclosing one."""
        return -max(self.max_plate_nesting, len(plate_context())) - 1

    def _trace(self, values: dict, subsample: dict | None = None, batch: int | None = None, dim: int | None = None):
        """The model's trace with its latents conditioned on ``values`` (and its subsampled plates on the
        indices in ``subsample``), under a plate of size ``batch`` at ``dim`` if given; hidden from
        enclosing handlers except for ``param`` sites (model parameters stay visible to SVI)."""
        data = {**values, **(subsample or {})}
        # non-finite densities are reported by _trace_log_prob, with the site
        with poutine.block(expose_types=["param"]), pyro.validation_enabled(False):
            with pyro.plate("_pyro_gpx_particles", batch, dim=dim) if batch is not None else nullcontext():
                try:
                    trace = poutine.trace(poutine.condition(self.model, data=data)).get_trace(*self.args, **self.kwargs)
                except (RuntimeError, ValueError, IndexError, TypeError) as error:
                    if isinstance(error, LatentShapeError):
                        raise
                    self._check_prior_shapes(error)  # a latent of another shape than the guide's, broadcast with data?
                    raise
        if not self.latent_shapes_checked:
            self.check_latent_shapes(trace)
        if self.quick_checks is not None and not self.quick_checks_done:
            self._quick_check(trace)
        return trace

    def check_latent_shapes(self, trace) -> None:
        """Raise :class:`LatentShapeError` naming a latent site whose shape in ``trace`` differs from the guide's,
        as Pyro's ELBOs compare model and guide (dims left of the model's plates, such as the plate over paths,
        are not compared): the guide's shapes are fixed at its first call, and these arguments change one."""
        prototype = self.guide.prototype_trace.nodes
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or name not in self._latents:
                continue
            keep = self.max_plate_nesting + site["fn"].event_dim
            got = tuple(site["fn"].shape())[-keep:] if keep else ()
            expected = tuple(prototype[name]["value"].shape)[-keep:] if keep else ()
            if any(a != b for a, b in zip_longest(reversed(got), reversed(expected), fillvalue=1)):
                raise LatentShapeError(
                    f"Model and guide shapes disagree at site {name!r}: {got} vs {expected} (the guide's latent "
                    "shapes are fixed at its first call, and these model arguments change this one: build a new "
                    "guide for them)"
                )
        self.latent_shapes_checked = True

    def _check_prior_shapes(self, error: Exception) -> None:
        """After a failed model run: :class:`LatentShapeError` from ``error`` if a run at prior draws shows a
        latent of another shape than the guide's (the run failed broadcasting it against the data)."""
        try:
            trace = quiet_trace(self.model, self.args, self.kwargs)
        except Exception:  # the model fails anyway: its own error is the one to see
            return
        try:
            self.check_latent_shapes(trace)
        except LatentShapeError as shape_error:
            raise shape_error from error

    def _trace_log_prob(self, trace, batch: int | None, dim: int | None = None, strict: bool = True) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        terms = []
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
                continue  # a deterministic site's density is masked out: zero
            lp = site["fn"].log_prob(site["value"])
            mask = site["mask"]
            if mask is not None and site["is_observed"] and site["name"] not in self._latents:
                rescored = _rescore_masked_out(site["fn"], site["value"], lp, mask)
                if rescored is not lp and torch.is_tensor(site["value"]) and not torch.isfinite(site["value"]).all():
                    self.masked_non_finite.add(site["name"])
                lp = rescored
            terms.append((site, lp))
            # as Pyro scores a site: masked-out entries are zero even where their density is NaN (placeholders)
            lp = scale_and_mask(lp, site["scale"], None if mask is None else torch.as_tensor(mask, dtype=torch.bool))
            if batch is None:
                total = total + lp.sum()
                continue
            assert dim is not None, "a batched evaluation needs the plate's dim"
            if lp.dim() >= -dim and lp.shape[dim] == batch:
                total = total + lp.movedim(dim, 0).reshape(batch, -1).sum(-1)
            else:  # the same for every row
                total = total + lp.sum()
        # one check of the total; a site's own density is looked at only to name it
        if strict and not torch.isfinite(torch.as_tensor(total)).all():
            for site, lp in terms:
                if torch.isfinite(lp).all():
                    continue
                if site["is_observed"] and site["name"] not in self._latents:  # data, not a diverged latent
                    _check_finite_observed(site["name"], site["value"])
                raise FloatingPointError(f"log density of site {site['name']!r} is not finite at a sampled point")
        return torch.as_tensor(total)  # a tensor also when no site has a density (total still 0.0)

    def _batched(
        self, z: torch.Tensor, subsample: dict | None = None, strict: bool = True
    ) -> tuple[torch.Tensor, dict]:
        """:math:`\\log\\rho` of the rows of ``z`` in one batched model run, and the subsample indices it used."""
        B, dim = z.shape[0], self._particle_dim()
        shaped = z.reshape((B,) + (1,) * (-dim - 1) + z.shape[-1:])
        values, log_jac = self._conditioned(shaped, B)
        trace = self._trace(values, subsample, B, dim)
        out = self._trace_log_prob(trace, B, dim, strict) + log_jac
        if out.shape != (B,):
            raise RuntimeError(f"batched log density has shape {tuple(out.shape)}")
        return out, {name: site["value"] for name, site in trace.nodes.items() if site_is_subsample(site)}

    def _looped(self, z: torch.Tensor, subsample: dict | None = None, strict: bool = True) -> torch.Tensor:
        outs = []
        for row in z:
            values, log_jac = self._conditioned(row, None)
            outs.append(self._trace_log_prob(self._trace(values, subsample), None, strict=strict) + log_jac)
        return torch.stack(outs)

    def log_density(self, z: torch.Tensor, strict: bool = True) -> torch.Tensor:
        """:math:`\\log\\rho(z)` for ``z`` of shape ``(B, D)``; returns ``(B,)``.

        :param strict: raise ``FloatingPointError`` (naming the site) where the density is not finite;
            ``False`` returns :math:`-\\infty` there instead, for proposals a sampler should reject."""
        if z.dim() != 2:
            raise ValueError(f"z must be (B, D), got shape {tuple(z.shape)}")
        if not self._observed_checked:
            self.check_observed()
        if self.vectorized is None:
            try:
                with torch.no_grad():
                    probe = _distinct_rows(z)
                    batched, subsample = self._batched(probe, strict=False)
                    looped = self._looped(probe, subsample, strict=False)  # the same minibatch of a subsampled plate
                rtol = 1e-4 if z.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
                self.vectorized = torch.allclose(batched, looped, rtol=rtol, atol=rtol, equal_nan=True)
            except LatentShapeError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError):
                self.vectorized = False
            if not self.vectorized:
                warnings.warn(
                    "the model does not run batched under a plate over paths (a latent of shape (B, 1, ..., D) "
                    "must broadcast against its plates); its log density is evaluated one path at a time, "
                    "which is much slower",
                    RuntimeWarning,
                    stacklevel=3,
                )
        out = self._batched(z, strict=strict)[0] if self.vectorized else self._looped(z, strict=strict)
        if not strict:
            return torch.where(torch.isfinite(out), out, torch.full_like(out, -math.inf))
        if not torch.isfinite(out).all():
            raise FloatingPointError("the target log density is not finite at some sampled points")
        return out

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\nabla_z\\log\\rho(z)` (detached), ``(B, D)``."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            tracing = torch.jit.is_tracing()  # read first: a failed trace is abandoned
            try:
                (grad,) = torch.autograd.grad(self.log_density(z).sum(), z)
            except RuntimeError as error:
                if not tracing:
                    raise
                raise RuntimeError(
                    "the score of the model's log density (AutoDiffusion(..., use_score=True)) could not be traced "
                    "by the JIT (JitTrace_ELBO) for this model: train with Trace_ELBO or PathELBO, or pass "
                    "use_score=False"
                ) from error
        return grad.detach()


def _observed_nodes(trace, latents: frozenset = frozenset()):
    """``(name, site)`` of the trace's observed sample sites that carry data: not deterministic ones, nor
    the guide's ``latents`` (conditioned on the guide's values, they look observed)."""
    sites: dict = trace.nodes  # plain dicts: Pyro's typed Message hides fn.log_prob from mypy
    for name, site in sites.items():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        if name not in latents:
            yield name, site


def _subsampled(trace) -> bool:
    """Whether the trace ran on a subsample of some plate (its observed values are a minibatch only)."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and site_is_subsample(site):
            size = getattr(site["fn"], "size", None)
            if size is not None and torch.as_tensor(site["value"]).numel() < size:
                return True
    return False


def _rescore_masked_out(fn, value: torch.Tensor, lp: torch.Tensor, mask) -> torch.Tensor:
    """``lp`` with the masked-out entries whose density is not finite (NaN placeholders, values outside the
    support) scored at a draw of ``fn`` instead: their weight is zero, but the gradient of a NaN density
    is NaN (``torch.where`` passes 0 * NaN), which would make the score NaN."""
    keep = torch.as_tensor(mask, dtype=torch.bool, device=lp.device)
    bad = ~keep & ~torch.isfinite(lp)
    if not bool(bad.any()):
        return lp
    devices = [lp.device.index] if lp.device.type == "cuda" else []
    try:  # the caller's random stream left as it was
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            fill = fn.sample()
    except (NotImplementedError, RuntimeError, ValueError):  # no sampler: as Pyro, a NaN gradient
        return lp
    bad = bad.reshape(bad.shape + (1,) * fn.event_dim)
    return fn.log_prob(torch.where(bad, fill, value))


def _check_finite_observed(name: str, value) -> None:
    if torch.is_tensor(value) and not torch.isfinite(value).all():
        raise ValueError(f"the observed values of site {name!r} contain NaN or inf")


def _fixed_support(fn):
    """The distribution's support if it is one of Pyro's fixed constraints (possibly made independent),
    else ``None`` (a support that depends on parameters, or none declared)."""
    try:
        support = fn.support
    except NotImplementedError:
        return None
    return support if fixed_constraint(support) is not None else None
