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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median

from .moments import SWAGMoments, diagonal_variance, init_moments, swag_distribution, update_moments

__all__ = ["AutoSWAG"]


class AutoSWAG(AutoContinuous):
    """SWAG posterior over all latent sites of ``model`` (unconstrained space).

    :param max_rank: :math:`K`, deviation columns kept.
    :param scale: covariance scale :math:`s` (0.5 gives the SWAG covariance, see
        :mod:`~pyro_gpx.swag.moments`).
    :param diag_only: SWAG-diagonal.
    """

    def __init__(self, model, max_rank: int = 20, scale: float = 0.5, diag_only: bool = False,
                 init_loc_fn=init_to_median):  # fmt: skip
        self.max_rank, self.scale, self.diag_only = max_rank, scale, diag_only
        self._moments: SWAGMoments | None = None
        super().__init__(model, init_loc_fn=init_loc_fn)

    @property
    def moments(self) -> SWAGMoments:
        if self._moments is None:
            raise ValueError("AutoSWAG has collected nothing yet; call collect(values, *model_args)")
        return self._moments

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
            parts.append(unconstrained.reshape(-1))
        return torch.cat(parts)

    @torch.no_grad()
    def collect(self, values: Mapping[str, torch.Tensor], *args, **kwargs) -> None:
        """Add one iterate: constrained values of every latent site (e.g. ``AutoDelta.median()``).

        ``*args, **kwargs`` are the model's, needed only before the first call of the guide.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        flat = self._pack(values)
        if self._moments is None:
            self._moments = init_moments(flat.numel(), self.max_rank, torch.float64)
        self._moments = update_moments(self._moments, flat)

    def get_posterior(self, *args, **kwargs):
        d = swag_distribution(self.moments, self.scale, self.diag_only)
        loc_dtype = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"].dtype
        if loc_dtype != torch.float64:  # sample in the model's dtype
            if self.diag_only or self.moments.rank < 2:
                return type(d)(d.base_dist.loc.to(loc_dtype), d.base_dist.scale.to(loc_dtype)).to_event(1)
            return type(d)(d.loc.to(loc_dtype), d.cov_factor.to(loc_dtype), d.cov_diag.to(loc_dtype))
        return d

    def _loc_scale(self, *args, **kwargs):
        m = self.moments
        variance = self.scale * diagonal_variance(m)
        if not self.diag_only and m.rank >= 2:
            variance = variance + self.scale * (m.deviations**2).sum(0) / (m.rank - 1)
        return m.mean, variance.sqrt()

    # -- saving ---------------------------------------------------------------------------------
    def swag_state_dict(self) -> dict:
        m = self.moments
        return {"num_snapshots": m.num_snapshots, "mean": m.mean.clone(), "sq_mean": m.sq_mean.clone(),
                "deviations": m.deviations.clone(), "max_rank": m.max_rank}  # fmt: skip

    def load_swag_state_dict(self, state: dict, *args, **kwargs) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if state["mean"].numel() != self.latent_dim:
            raise ValueError(f"saved SWAG state has {state['mean'].numel()} entries; the model has {self.latent_dim}")
        self._moments = SWAGMoments(int(state["num_snapshots"]), state["mean"].clone(), state["sq_mean"].clone(),
                                    state["deviations"].clone(), int(state["max_rank"]))  # fmt: skip
