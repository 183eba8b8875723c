r"""A Bayesian last layer as a Pyro model: point-estimated features, a last layer with a prior.

.. math::

    \Phi = [\phi_\psi(X), 1] \in \mathbb{R}^{n\times D}, \qquad W \sim p(W)\ (C\times D), \qquad
    f = \Phi W^\top, \qquad y_i \mid f_i \sim \text{head}(f_i).

The feature network's parameters :math:`\psi` (and a learned noise, prior scale or generator) are
Pyro parameters, trained by SVI together with the guide of :math:`W` (or of the implicit prior's
:math:`z`); NUTS over the last layer treats them as constants. Minibatches: pass the batch and
``num_data`` (the data set size), and the ``"data"`` plate scales the likelihood by
``num_data / batch``.

Sites: ``"weights"`` (Gaussian prior) or ``"weights_latent"`` plus the deterministic
``"weights"`` (implicit prior); inside ``pyro.plate("data")``: the deterministic ``"f"``
(``(n, C)``) and the observations ``"y"``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from .._validation import check_finite
from .heads import CategoricalHead, GaussianHead
from .priors import GaussianWeightPrior, ImplicitWeightPrior

__all__ = ["BayesianLastLayer"]


class BayesianLastLayer(PyroModule):
    """Features ``features(X) -> (n, feature_dim)`` followed by a Bayesian linear last layer.

    :param features: any ``nn.Module`` (converted in place to a ``PyroModule``; its parameters become
        Pyro parameters); ``None`` for the identity.
    :param feature_dim: its output width.
    :param head: :class:`~pyro_gpx.bll.heads.GaussianHead` or :class:`~pyro_gpx.bll.heads.CategoricalHead`.
    :param prior: :class:`~pyro_gpx.bll.priors.GaussianWeightPrior` (default, unit scale) or
        :class:`~pyro_gpx.bll.priors.ImplicitWeightPrior`.
    :param bias: append a constant feature.

    Example::

        >>> import torch
        >>> from pyro_gpx.bll import BayesianLastLayer, GaussianHead
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh()).double()
        >>> model = BayesianLastLayer(net, 8, GaussianHead(noise=0.1))
        >>> f = model(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
        >>> tuple(f.shape)
        (5, 1)
    """

    weight_site = "weights"

    def __init__(
        self,
        features: nn.Module | None,
        feature_dim: int,
        head: GaussianHead | CategoricalHead,
        prior: GaussianWeightPrior | ImplicitWeightPrior | None = None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if not isinstance(head, (GaussianHead, CategoricalHead)):
            raise TypeError(f"head must be a GaussianHead or CategoricalHead, got {type(head).__name__}")
        if features is not None:
            to_pyro_module_(features)
        self.features = features
        self.feature_dim, self.bias = feature_dim, bias
        self.head = head
        self.prior = prior if prior is not None else GaussianWeightPrior()
        if not isinstance(self.prior, (GaussianWeightPrior, ImplicitWeightPrior)):
            raise TypeError(f"prior must be a GaussianWeightPrior or ImplicitWeightPrior, got {type(prior).__name__}")

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(C, D)``: outputs by features (plus the bias)."""
        return self.head.num_outputs, self.feature_dim + int(self.bias)

    def design(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`\Phi = [\phi_\psi(X), 1]`, ``(n, D)``."""
        if X.dim() != 2:
            raise ValueError(f"X must be (n, inputs), got shape {tuple(X.shape)}")
        check_finite("X", X)
        Phi = X if self.features is None else self.features(X)
        if Phi.dim() != 2 or Phi.shape[-1] != self.feature_dim:
            raise ValueError(f"the features have shape {tuple(Phi.shape)}; expected (n, {self.feature_dim})")
        if not torch.isfinite(Phi).all():
            raise ValueError("the feature network returned NaN or inf")
        if self.bias:
            Phi = torch.cat([Phi, torch.ones(Phi.shape[0], 1, dtype=Phi.dtype)], -1)
        return Phi

    def forward(
        self,
        X: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        design: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model on a (mini)batch.

        :param X: ``(n, inputs)``; :param y: targets (``None`` to predict).
        :param num_data: the full data set size when ``X`` is a minibatch.
        :param design: precomputed :meth:`design` (e.g. frozen features for NUTS); ``X`` is then ignored.
        :returns: ``f``, ``(..., n, C)``.
        """
        Phi = self.design(X) if design is None else design
        n = Phi.shape[0]
        if y is not None:
            y = self.head.check_targets(y, n)
        size = n if num_data is None else int(num_data)
        if size < n:
            raise ValueError(f"num_data ({size}) is smaller than the batch ({n})")
        W = self.prior.sample(self.weight_site, self.weight_shape, Phi.dtype)
        f = (Phi.unsqueeze(-2) * W).sum(-1)  # broadcasts over draws: W is (..., 1, C, D) under a particle plate
        with pyro.plate("data", size, subsample=torch.arange(n)):
            pyro.deterministic("f", f, event_dim=1)
            self.head.observe("y", f, y, infer={"last_layer": {"design": Phi, "weights": self.weight_site}})
        return f
