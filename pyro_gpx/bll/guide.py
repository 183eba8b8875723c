"""A Gaussian guide over the last-layer weights: one full-covariance Gaussian per output row."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from .._validation import is_finite_at_least
from .model import BayesianLastLayer
from .priors import GaussianWeightPrior

__all__ = ["LastLayerNormal"]


class LastLayerNormal(PyroModule):
    """:math:`q(W) = \\prod_c N(W_c; m_c, L_cL_c^\\top)` for a :class:`~pyro_gpx.bll.model.BayesianLastLayer`
    with a Gaussian prior. Use it with :class:`~pyro_gpx.bll.elbo.LastLayerELBO` (deterministic,
    regression) or any Pyro ELBO (e.g. ``Trace_ELBO`` for classification).

    :param model: the last-layer model; :param init_scale: initial posterior standard deviation.
        Its parameters are ``"loc"`` and ``"scale_tril"``, prefixed by the model's ``name`` if it has one.
    :param dtype: the parameters' dtype; default: the feature network's (float64 without one). They
        sit on the feature network's device.

    Decay the learning rate towards the end of training (e.g. ``pyro.optim.ClippedAdam`` with
    ``lrd < 1``). At a constant Adam rate the Cholesky factor keeps jittering by about the step size,
    so :math:`S` stays too wide along the directions the data determine, and a learned noise grows
    to absorb :math:`\\Phi_i S \\Phi_i^\\top`. On yacht, after 3 600 minibatch steps at a constant
    5e-3, the ELBO was 98 nats below its optimum at the same features and the noise variance was
    4.5x the MAP network's. ``benchmarks/bll.py`` decays the rate to 1% of its start.

    Check how far a trained guide is from its optimum with :func:`~pyro_gpx.bll.exact.log_evidence`
    (the largest ELBO at the current features) and move it there with :meth:`set_posterior` and
    :func:`~pyro_gpx.bll.exact.exact_posterior`. With the decayed rate the gap was 3 to 30 nats on six
    clean UCI sets but over 2 000 on naval (exact posterior better: NLL -5.43 against -5.15), and 18 to
    4 458 nats with 5% heavy-tailed outlier targets, where the guide's small mean was what kept the fit
    off the outliers (exact posterior worse: yacht NLL 4.14 against 3.16). A jointly trained guide can
    act as early stopping; say which posterior you report.
    """

    # PyroParams: PyroModule reads them back as tensors
    loc: torch.Tensor
    scale_tril: torch.Tensor

    def __init__(self, model: BayesianLastLayer, init_scale: float = 0.1, dtype: torch.dtype | None = None):
        super().__init__(name=getattr(model, "name", None) or "")
        if not isinstance(model.prior, GaussianWeightPrior):
            raise ValueError(
                "LastLayerNormal approximates a Gaussian-prior last layer; use AutoDiffusion for implicit priors"
            )
        if not is_finite_at_least(init_scale, 0.0, strict=True):
            raise ValueError(f"init_scale must be a finite positive number, got {init_scale!r}")
        ref = model.feature_tensor()
        dtype = dtype if dtype is not None else (ref.dtype if ref is not None else torch.float64)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        device = ref.device if ref is not None else None
        C, D = model.weight_shape
        self.site = model.weight_site
        self.loc = PyroParam(torch.zeros(C, D, dtype=dtype, device=device))  # type: ignore[assignment]
        eye = torch.eye(D, dtype=dtype, device=device)
        scale_tril = init_scale * eye.expand(C, D, D).clone()
        self.scale_tril = PyroParam(scale_tril, constraint=constraints.lower_cholesky)  # type: ignore[assignment]

    def distribution(self) -> dist.TorchDistribution:
        """:math:`q(W)`, from the parameter store's current values (also outside a model run, e.g.
        after ``pyro.get_param_store().load``)."""
        with self._pyro_context:  # PyroParams are refreshed from the store only inside a context
            loc, scale_tril = self.loc, self.scale_tril
        return dist.MultivariateNormal(loc, scale_tril=scale_tril).to_event(1)

    def set_posterior(self, posterior: torch.distributions.MultivariateNormal) -> None:
        """Set :math:`q` to ``posterior`` (batch shape ``(C,)``, event shape ``(D,)``), e.g. the exact
        :func:`~pyro_gpx.bll.exact.exact_posterior` at the current features; written to the parameter store
        in the guide's dtype and on its device."""
        if not isinstance(posterior, torch.distributions.MultivariateNormal):
            raise TypeError(f"posterior must be a MultivariateNormal, got {type(posterior).__name__}")
        with self._pyro_context:
            shape, dtype, device = tuple(self.loc.shape), self.loc.dtype, self.loc.device
        if tuple(posterior.loc.shape) != shape:
            raise ValueError(f"posterior has loc shape {tuple(posterior.loc.shape)}; this guide's is {shape}")
        self.loc = posterior.loc.detach().to(dtype=dtype, device=device).clone()
        self.scale_tril = posterior.scale_tril.detach().to(dtype=dtype, device=device).clone()

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {self.site: pyro.sample(self.site, self.distribution())}
