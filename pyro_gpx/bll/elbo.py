r"""The deterministic last-layer ELBO of VBLL [1], as a Pyro loss.

For a Gaussian head, Gaussian prior :math:`W \sim N(0, s^2 I)` and :math:`q(w) = N(m, S)`,

.. math::

    \mathcal{L} = \sum_i \Big[\log N(y_i;\ \Phi_i m,\ \sigma^2) - \frac{\Phi_i S \Phi_i^\top}{2\sigma^2}\Big]
    - \mathrm{KL}\big(N(m, S)\,\|\,N(0, s^2 I)\big),

exactly :math:`\mathbb{E}_q[\log p(y\mid w)] - \mathrm{KL}`, with no Monte Carlo noise. Each term
is weighed as ``Trace_ELBO`` weighs it: the likelihood and :math:`\mathbb{E}_q[\log p(w)]` by the model
site's scale (subsampling, ``poutine.scale``) and mask, the entropy of :math:`q` by the guide site's.
At the exact posterior :math:`q = p(w\mid y)` it equals :math:`\log p(y)`.

References:

[1] J. Harrison, J. Willes, J. Snoek. Variational Bayesian last layers. ICLR 2024.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.poutine.util import site_is_subsample

__all__ = ["LastLayerELBO"]


def _expected_log_prior(q: dist.MultivariateNormal, prior_scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb{E}_q[\log N(w; 0, s^2 I)]`, summed over the rows of ``q``."""
    D = q.loc.shape[-1]
    var = prior_scale**2
    second_moment = q.scale_tril.square().sum((-2, -1)) + q.loc.square().sum(-1)
    return (-0.5 * (D * torch.log(2 * torch.pi * var) + second_moment / var)).sum()


def _weighed(term: torch.Tensor, site) -> torch.Tensor:
    """``term`` scaled and masked by the site (``poutine.scale`` / ``poutine.mask``), as Trace_ELBO weighs it."""
    return scale_and_mask(term, site["scale"], site["mask"]).sum()


class LastLayerELBO(ELBO):
    """Negative deterministic ELBO for a :class:`~pyro_gpx.bll.model.BayesianLastLayer` with a
    :class:`~pyro_gpx.bll.heads.GaussianHead` and a :class:`~pyro_gpx.bll.guide.LastLayerNormal` guide."""

    def __init__(self):
        super().__init__(num_particles=1)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("LastLayerELBO is computed in closed form; it has no Monte Carlo trace")

    def differentiable_elbo(self, model, guide, *args, **kwargs) -> torch.Tensor:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        elbo = torch.zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
                continue
            info = site["infer"].get("last_layer")
            if site["is_observed"] and info is not None:
                q = guide_trace.nodes[info["weights"]]["fn"].base_dist
                if not isinstance(q, dist.MultivariateNormal) or q.loc.shape[0] != 1:
                    raise ValueError("LastLayerELBO needs a one-output Gaussian head and a LastLayerNormal guide")
                Phi, noise = info["design"], info["noise"]
                loc, scale_tril = (t[0].to(Phi.dtype) for t in (q.loc, q.scale_tril))  # a guide of another dtype
                mean = Phi @ loc
                var_f = (Phi @ scale_tril).square().sum(-1)
                ell = dist.Normal(mean, noise.sqrt()).log_prob(site["value"]) - 0.5 * var_f / noise
                elbo = elbo + _weighed(ell, site)
            elif site["is_observed"]:
                elbo = elbo + _weighed(site["fn"].log_prob(site["value"]), site)
            elif name in guide_trace.nodes and isinstance(guide_trace.nodes[name]["fn"], dist.Independent):
                q = guide_trace.nodes[name]["fn"].base_dist
                p = site["fn"].base_dist if isinstance(site["fn"], dist.Independent) else site["fn"]
                if not (isinstance(q, dist.MultivariateNormal) and isinstance(p, dist.Normal) and (p.loc == 0).all()):
                    raise ValueError(
                        f"site {name!r}: LastLayerELBO needs a zero-mean Normal prior and a Gaussian guide"
                    )
                scale = p.scale
                if scale.dim() and (scale != scale.reshape(-1)[0]).any():
                    raise ValueError(f"site {name!r}: the prior scale must be one number")
                prior_scale = scale.reshape(-1)[0] if scale.dim() else scale
                # E_q[log p] weighed by the model site, the entropy by the guide site, as Trace_ELBO does
                # (so a tempered model, poutine.scale(model, s), has the tempered posterior as optimum)
                elbo = elbo + _weighed(_expected_log_prior(q, prior_scale), site)
                elbo = elbo + _weighed(q.entropy().sum(), guide_trace.nodes[name])
            else:
                raise ValueError(f"site {name!r}: LastLayerELBO handles only the last-layer weights and observations")
        return elbo

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = -self.differentiable_elbo(model, guide, *args, **kwargs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the last-layer ELBO became {float(loss)}")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())
