r"""SWAG as a Pyro autoguide.

Train a Pyro model to a point estimate by SVI (``AutoDelta``, i.e. MAP, with minibatch SGD at a
constant or cyclic learning rate), collect the point estimate once per epoch, and use the SWAG
Gaussian over the *unconstrained* latent vector as the guide:

.. code-block:: python

    delta = AutoDelta(model)
    swag = AutoSWAG(model)
    svi = SVI(model, delta, pyro.optim.SGD({"lr": 1e-3, "momentum": 0.9}), Trace_ELBO())
    for epoch in range(num_epochs):
        for batch in batches:
            svi.step(*batch)
        if epoch >= swa_start:
            swag.collect(delta.median(), *batch)
    Predictive(model, guide=swag, num_samples=100)(X_test)

It is an :class:`~pyro.infer.autoguide.AutoContinuous`, so constrained latents get their
transforms and log-Jacobians, and ``median``, ``quantiles``, ``Predictive`` and
``pyro_gpx.diagnostics.to_inference_data`` work as for any autoguide.

Saving: ``torch.save(swag.state_dict(), path)``, then ``AutoSWAG(model).load_state_dict(torch.load(path))``
(the statistics, ``max_rank``, ``scale`` and ``diag_only`` are the module's extra state;
:meth:`AutoSWAG.swag_state_dict` is the same dict, and loading it sets those three settings).
A guide loaded before its model ran sets its prototype at the first call without drawing from the
RNG, so it draws what the saved guide did under the same seed. Make that first call with the
training data (``swag(X_train, y_train)``, or ``swag.median(X_train, y_train)``): called first at new
inputs without targets, the observed sites would look latent, and it raises saying so. An
``AutoMultiSWAG`` takes its prototype from a member that has one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median

from .._validation import check_positive_int, is_finite_at_least
from .moments import (
    SWAGMoments,
    diagonal_variance,
    init_moments,
    moments_from_state,
    moments_state_dict,
    swag_distribution,
    update_moments,
)

__all__ = ["AutoSWAG"]


def _rng_kept():
    """A context that restores the CPU RNG (and the current CUDA device's, if CUDA is in use) on exit."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else [])


def _latent_mismatch(tracked: Mapping, model_shapes: Mapping) -> str:
    """``tracked`` latent shapes against the model's, and why a reloaded guide sees extra latents."""
    extra = sorted(set(model_shapes) - set(tracked))
    hint = (f" ({extra} are latent in this call: make a reloaded guide's first call with the training data, "
            "so that observed sites stay observed)") if extra else ""  # fmt: skip
    return f"tracks latent sites {dict(tracked)}; the model has {dict(model_shapes)}{hint}"


@contextlib.contextmanager
def _untraced_on_error(guide: AutoContinuous):
    """Checks of a prototype just set up: if they fail, the guide forgets it, so that a later call (with the
    training data) traces the model again."""
    try:
        yield
    except ValueError:
        guide.prototype_trace = None
        raise


class AutoSWAG(AutoContinuous):
    """SWAG posterior over all latent sites of ``model`` (unconstrained space).

    :param max_rank: :math:`K`, deviation columns kept.
    :param scale: covariance scale :math:`s` (0.5 gives the SWAG covariance, see
        :mod:`~pyro_gpx.swag.moments`).
    :param diag_only: SWAG-diagonal.

    The statistics accumulate in float64 on the device of the collected values; samples,
    ``median`` and ``quantiles`` come in the dtype and on the device of the model's latents. The
    statistics are part of the module's ``state_dict()`` (as its extra state), so
    ``torch.save(guide.state_dict())`` and ``load_state_dict`` into a fresh guide round-trip them,
    with the sampling settings: the loaded guide has the saved ``max_rank``, ``scale`` and
    ``diag_only`` (change ``guide.scale`` afterwards to sample at another scale).
    """

    def __init__(self, model, max_rank: int = 20, scale: float = 0.5, diag_only: bool = False,
                 init_loc_fn=init_to_median):  # fmt: skip
        if not is_finite_at_least(scale, 0.0, strict=True):
            raise ValueError(f"scale must be a finite positive number, got {scale}")
        if not isinstance(diag_only, bool):
            raise TypeError(f"diag_only must be a bool, got {diag_only!r}")
        self.max_rank, self.scale, self.diag_only = check_positive_int("max_rank", max_rank), float(scale), diag_only
        self._moments: SWAGMoments | None = None
        self._swag_shapes: dict[str, tuple[int, ...]] | None = None  # latent shapes the moments track
        super().__init__(model, init_loc_fn=init_loc_fn)

    @property
    def moments(self) -> SWAGMoments:
        if self._moments is None:
            raise ValueError("AutoSWAG has collected nothing yet; call collect(values, *model_args)")
        return self._moments

    def _latent_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in self._unconstrained_shapes.items()}

    def _check_shapes(self) -> None:
        """The loaded statistics must track this model's latents (same names, order and shapes)."""
        ours = self._latent_shapes()
        if self._swag_shapes is not None and list(self._swag_shapes.items()) != list(ours.items()):
            raise ValueError(f"the saved SWAG state (unconstrained shapes) {_latent_mismatch(self._swag_shapes, ours)}")
        if self._moments is not None and self._moments.mean.numel() != self.latent_dim:
            raise ValueError(
                f"the saved SWAG state has {self._moments.mean.numel()} entries; the model has {self.latent_dim}"
            )

    def _setup_prototype(self, *args, **kwargs):
        # the prototype's trace draws from the RNG (init values, random subsamples): keep it as it was, so that
        # collecting does not change the user's SGD run (a same-seed run without collecting ended elsewhere)
        # and a reloaded guide draws what the saved one did under the same seed
        with _rng_kept():
            super()._setup_prototype(*args, **kwargs)
        if self._moments is not None:  # statistics loaded before the model ran
            with _untraced_on_error(self):
                self._check_shapes()

    def _latent_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        value = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"]
        return value.dtype, value.device

    def _pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if name not in values:
                raise ValueError(f"collect() needs a value for latent site {name!r}")
            unconstrained = biject_to(site["fn"].support).inv(torch.as_tensor(values[name]).detach())
            if unconstrained.shape != self._unconstrained_shapes[name]:
                raise ValueError(
                    f"value of {name!r} has unconstrained shape {tuple(unconstrained.shape)}; "
                    f"expected {tuple(self._unconstrained_shapes[name])}"
                )
            if not torch.isfinite(unconstrained).all():  # e.g. a negative value of a positive site
                raise ValueError(f"value of {name!r} is not finite, or outside its support {site['fn'].support}")
            parts.append(unconstrained.reshape(-1))
        return torch.cat(parts)

    @torch.no_grad()
    def collect(self, values: Mapping[str, torch.Tensor], *args, **kwargs) -> None:
        """Add one iterate: constrained values of every latent site (e.g. ``AutoDelta.median()``).

        ``*args, **kwargs`` are the model's, needed only before the first call of the guide.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
            with _untraced_on_error(self):  # e.g. called without the targets: a later call traces again
                flat = self._pack(values)
        else:
            flat = self._pack(values)
        if self._moments is None:
            self._moments = init_moments(flat.numel(), self.max_rank, torch.float64, flat.device)
            self._swag_shapes = self._latent_shapes()
        self._moments = update_moments(self._moments, flat)

    def __call__(self, *args, **kwargs):
        self.moments  # noqa: B018  (before the first call traces the model: without statistics there is
        # nothing to draw, and a first call without the targets would make the observed sites look latent)
        return super().__call__(*args, **kwargs)

    def get_posterior(self, *args, **kwargs):
        dtype, device = self._latent_dtype_device()  # sample in the model's dtype, on its device
        return swag_distribution(self.moments, self.scale, self.diag_only, dtype, device)

    def _loc_scale(self, *args, **kwargs):
        m = self.moments  # (raises before the model is traced, as __call__)
        if self.prototype_trace is None:  # e.g. median() right after load_state_dict
            self._setup_prototype(*args, **kwargs)
        variance = self.scale * diagonal_variance(m)
        if not self.diag_only and m.rank >= 2:
            variance = variance + self.scale * (m.deviations**2).sum(0) / (m.rank - 1)
        dtype, device = self._latent_dtype_device()
        return m.mean.to(device=device, dtype=dtype), variance.sqrt().to(device=device, dtype=dtype)

    # -- saving ---------------------------------------------------------------------------------
    def swag_state_dict(self) -> dict:
        """The statistics, the unconstrained latent shapes they track, ``scale`` and ``diag_only``
        (ints, floats, bools, tuples, tensors)."""
        state = moments_state_dict(self.moments)
        state["scale"], state["diag_only"] = self.scale, self.diag_only
        if self._swag_shapes is not None:  # unknown only for a state saved without them, not yet run
            state["shapes"] = dict(self._swag_shapes)
        return state

    def load_swag_state_dict(self, state: dict, *args, **kwargs) -> None:
        """Restore :meth:`swag_state_dict`'s output; the saved ``max_rank``, ``scale`` and ``diag_only``
        replace this guide's (a state saved without the last two keeps this guide's).

        ``*args, **kwargs`` are the model's, needed to check the latent shapes before the first call
        of the guide (without them the check happens at that call).

        :raises ValueError: if entries are missing or inconsistent, or the state tracks other latents.
        """
        moments = moments_from_state(state, name="state")
        scale, diag_only = state.get("scale", self.scale), state.get("diag_only", self.diag_only)
        if not is_finite_at_least(scale, 0.0, strict=True):
            raise ValueError(f"state['scale'] must be a finite positive number, got {scale!r}")
        if not isinstance(diag_only, bool):
            raise ValueError(f"state['diag_only'] must be a bool, got {diag_only!r}")
        shapes = state.get("shapes")
        if shapes is not None:
            if not isinstance(shapes, Mapping):
                raise ValueError(f"state['shapes'] must map latent site names to shapes, got {shapes!r}")
            shapes = {str(k): tuple(int(n) for n in v) for k, v in shapes.items()}
            if sum(math.prod(v) for v in shapes.values()) != moments.mean.numel():
                raise ValueError(
                    f"state['shapes'] {shapes} disagrees with the {moments.mean.numel()} entries of the state"
                )
        old = self._moments, self._swag_shapes
        self._moments, self._swag_shapes = moments, shapes
        try:
            if self.prototype_trace is None and (args or kwargs):
                self._setup_prototype(*args, **kwargs)
            elif self.prototype_trace is not None:
                self._check_shapes()
        except ValueError:
            self._moments, self._swag_shapes = old
            raise
        if self.prototype_trace is not None and self._swag_shapes is None:  # state saved without shapes
            self._swag_shapes = self._latent_shapes()
        self.max_rank, self.scale, self.diag_only = moments.max_rank, float(scale), diag_only

    def get_extra_state(self) -> dict:
        """The SWAG statistics in the ``nn.Module`` ``state_dict()`` (empty before any collect)."""
        return {} if self._moments is None else self.swag_state_dict()

    def set_extra_state(self, state: dict) -> None:
        if not state:
            self._moments, self._swag_shapes = None, None
        else:
            self.load_swag_state_dict(state)
