r"""``InducingNormal``: the SVGP guide for whitened inducing outputs, as a Pyro autoguide.

For every latent site of shape ``(R, M)`` (rows of whitened inducing outputs, e.g. one per GP) the
guide is a full-covariance Gaussian per row, :math:`q(u_r) = \mathcal N(m_r, S_r)`,
:math:`S_r = L_rL_r^\top`, the variational family of SVGP [1]. The sites are sampled as
``MultivariateNormal`` distributions, so ``TraceMeanField_ELBO`` uses the closed-form

.. math:: \mathrm{KL}(q\,\|\,\mathcal N(0, I)) = \tfrac12\textstyle\sum_r
          \big(\operatorname{tr}S_r + m_r^\top m_r - M - \log\det S_r\big).

Combine it with other guides (e.g. :class:`~pyro_gpx.diffusion.AutoDiffusion` over flow
hyperparameters) in an ``AutoGuideList`` through ``poutine.block``.

[1] J. Hensman, N. Fusi, N. D. Lawrence. Gaussian processes for big data. UAI 2013.
"""

from __future__ import annotations

from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from .._validation import is_finite_at_least

__all__ = ["InducingNormal"]


class InducingNormal(AutoGuide):
    """Row-wise full-covariance Gaussian guide for whitened inducing outputs.

    :param model: the model (or a ``poutine.block`` of it exposing the inducing sites).
    :param init_scale: initial :math:`L_r = \\text{init\\_scale}\\cdot I` (means start at 0, the prior mean).
    """

    def __init__(self, model, *, init_scale: float = 0.1):
        if not is_finite_at_least(init_scale, 0.0, strict=True):
            raise ValueError(f"init_scale must be a finite positive number, got {init_scale!r}")
        self._init_scale = float(init_scale)
        super().__init__(model)
        self._pending_state: tuple | None = None  # a state loaded before the first call

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.locs, self.scale_trils = PyroModule(), PyroModule()
        self._event_dims = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn, value = site["fn"], site["value"]
            support = fn.support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            if support is not constraints.real:
                raise ValueError(f"InducingNormal needs real-valued sites; {name!r} has support {fn.support}")
            if fn.event_dim < 1 or any(f.vectorized for f in site["cond_indep_stack"]):
                raise ValueError(f"InducingNormal needs global sites with an event dimension; {name!r} is not")
            self._event_dims[name] = fn.event_dim
            value = value.detach()
            M = value.shape[-1]
            eye = torch.eye(M, dtype=value.dtype).expand(value.shape + (M,)) * self._init_scale
            deep_setattr(self.locs, name, PyroParam(torch.zeros_like(value), constraints.real))
            deep_setattr(self.scale_trils, name, PyroParam(eye.clone(), constraints.softplus_lower_cholesky))
        if self._pending_state is not None:
            state, strict = self._pending_state
            self._pending_state = None
            self.load_state_dict(state, strict=strict)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # before the first call the parameters do not exist: keep this guide's part of the state (also when
        # loaded through an AutoGuideList) and load it once the first call has set the guide up
        if self.prototype_trace is None:
            own = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
            if own:
                self._pending_state = (own, strict)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _rows(self, name: str) -> dist.MultivariateNormal:
        """:math:`q(u_r)` of every row of site ``name``, as a batch."""
        loc, scale_tril = attrgetter(name)(self.locs), attrgetter(name)(self.scale_trils)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    def _posterior(self, name: str) -> dist.TorchDistribution:
        return self._rows(name).to_event(self._event_dims[name] - 1)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {name: pyro.sample(name, self._posterior(name)) for name in self._event_dims}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior means."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {name: attrgetter(name)(self.locs).detach().clone() for name in self._event_dims}

    def kl_divergence(self) -> torch.Tensor:
        """:math:`\\sum_r\\mathrm{KL}(q(u_r)\\,\\|\\,\\mathcal N(0, I))` over all sites (differentiable)."""
        total: torch.Tensor | float = 0.0
        for name in self._event_dims:
            q = self._rows(name)  # not _posterior(name).base_dist: to_event(0) returns the distribution itself
            M = q.loc.shape[-1]
            L = q.scale_tril
            p = dist.MultivariateNormal(torch.zeros_like(q.loc), scale_tril=torch.eye(M, dtype=L.dtype).expand_as(L))
            total = total + torch.distributions.kl_divergence(q, p).sum()
        return torch.as_tensor(total)
