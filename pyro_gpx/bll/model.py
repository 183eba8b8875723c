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
(``(n, C)``) and the observations ``"y"``. With ``name="reg"`` every site and the plate are
prefixed (``"reg.weights"``, ``"reg.data"``, ``"reg.f"``, ``"reg.y"``), and so are its Pyro
parameters and its :class:`~pyro_gpx.bll.guide.LastLayerNormal`'s (``"reg.features.0.weight"``,
``"reg.loc"``), so that several last layers fit in one Pyro model or one parameter store.

Saving and loading: the learned parameters (features, learned noise / prior scale / generator,
:class:`~pyro_gpx.bll.guide.LastLayerNormal`'s mean and covariance) are ``PyroParam`` s read from
Pyro's parameter store, so either route restores the same model in a fresh process:

* ``torch.save({"model": model.state_dict(), "guide": guide.state_dict()}, path)``; later
  ``pyro.clear_param_store()``, rebuild both objects with the same arguments and call
  ``load_state_dict`` on each. This also restores fixed module state: a fixed generator
  (``learn_generator=False``, whose random weights are buffers), frozen feature parameters
  (``requires_grad=False``: turned into buffers, so SVI never trains them) and buffers such as
  BatchNorm running statistics.
  An autoguide creates its parameters on its first call: call it once on data before loading.
* ``pyro.get_param_store().save(path)``; later ``pyro.clear_param_store()``, rebuild,
  ``pyro.get_param_store().load(path)``. Fixed state is not in the store: module buffers (BatchNorm
  running statistics, a fixed generator's weights, frozen feature parameters) need ``state_dict``, or
  rebuild them from the same seed.

The store is keyed by name: two unnamed models (or guides) built in one store share
``"features.0.weight"`` (``"loc"``) and the like, and the second then starts from, and trains, the
first one's values. Clear the store between models, or give them different ``name`` s (a named
layer keeps its prefix under a parent ``PyroModule``, instead of taking the parent's attribute path).
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from .._validation import check_finite, check_positive_int
from ._modules import first_float_tensor, to_pyro_params_
from .heads import CategoricalHead, GaussianHead
from .priors import GaussianWeightPrior, ImplicitWeightPrior

__all__ = ["BayesianLastLayer"]


def _check_batch(name: str, t: torch.Tensor, width: int | None = None) -> None:
    """A batch ``t`` must be a floating-point ``(n, width)`` tensor (any width if ``None``) with at least
    one row and finite entries; else ``ValueError`` naming ``name``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or (width is not None and t.shape[-1] != width):
        expected = "(n, inputs)" if width is None else f"(n, {width})"
        raise ValueError(f"{name} must be a {expected} tensor, got shape {tuple(getattr(t, 'shape', ()))}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows: a batch needs at least one data point")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    check_finite(name, t)


@contextlib.contextmanager
def evaluation_mode(module: nn.Module):
    """``module`` in eval mode inside the block (BatchNorm uses its running statistics and leaves them
    unchanged, dropout is off), then back to the mode it had."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class BayesianLastLayer(PyroModule):
    """Features ``features(X) -> (n, feature_dim)`` followed by a Bayesian linear last layer.

    :param features: any ``nn.Module`` (converted in place to a ``PyroModule``; its trainable
        parameters become ``PyroParam`` s, read from Pyro's parameter store); ``None`` for the identity.
        One module given to two layers is one set of Pyro parameters, named under the layer that took
        it last: for several heads on shared features, compute the features in your model and give
        each head ``features=None``.
    :param feature_dim: its output width.
    :param head: :class:`~pyro_gpx.bll.heads.GaussianHead` or :class:`~pyro_gpx.bll.heads.CategoricalHead`.
    :param prior: :class:`~pyro_gpx.bll.priors.GaussianWeightPrior` (default, unit scale) or
        :class:`~pyro_gpx.bll.priors.ImplicitWeightPrior`.
    :param bias: append a constant feature.
    :param name: a prefix for the sample sites, the data plate and the Pyro parameters
        (``"<name>.weights"``, ``"<name>.features.0.weight"`` ...), to put several last layers in one
        model or one parameter store; ``None`` (default): ``"weights"``, ``"data"``, ``"f"``, ``"y"``
        and parameters named by their attribute path (under a parent ``PyroModule``, the parent's).

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
        name: str | None = None,
    ):
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        super().__init__(name=name or "")  # a name also prefixes the Pyro parameters
        feature_dim = check_positive_int("feature_dim", feature_dim)
        if not isinstance(head, (GaussianHead, CategoricalHead)):
            raise TypeError(f"head must be a GaussianHead or CategoricalHead, got {type(head).__name__}")
        if features is not None:
            to_pyro_params_(features)
        self.features = features
        self.feature_dim, self.bias = feature_dim, bias
        self.head = head
        self.prior = prior if prior is not None else GaussianWeightPrior()
        if not isinstance(self.prior, (GaussianWeightPrior, ImplicitWeightPrior)):
            raise TypeError(f"prior must be a GaussianWeightPrior or ImplicitWeightPrior, got {type(prior).__name__}")
        ref = self.feature_tensor()
        if ref is not None:  # the noise and prior scale in the features' dtype (they are made in the default one)
            self.head.to(ref.dtype)
            self.prior.to(ref.dtype)
        self.name = name
        self.weight_site, self.f_site, self.y_site, self.plate_name = (
            self.site_name(base) for base in ("weights", "f", "y", "data")
        )

    def _pyro_set_supermodule(self, name: str, context) -> None:
        # under a parent PyroModule, a named layer keeps its own prefix (the parent would rename it to
        # its attribute path, and two layers named apart would share parameters)
        super()._pyro_set_supermodule(self.name if self.name is not None else name, context)

    def site_name(self, base: str) -> str:
        """``base`` with this layer's ``name`` prefix (``"<name>.<base>"``, or ``base`` without a name)."""
        return base if self.name is None else f"{self.name}.{base}"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(C, D)``: outputs by features (plus the bias)."""
        return self.head.num_outputs, self.feature_dim + int(self.bias)

    def feature_tensor(self) -> torch.Tensor | None:
        """The feature network's first floating-point parameter or buffer (its dtype and device), or
        ``None`` without features or parameters."""
        return None if self.features is None else first_float_tensor(self.features)

    def design(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`\Phi = [\phi_\psi(X), 1]`, ``(n, D)``."""
        _check_batch("X", X)
        ref = self.feature_tensor()
        if ref is not None and ref.dtype != X.dtype:
            raise ValueError(
                f"X has dtype {X.dtype} but the feature network's parameters are {ref.dtype}; "
                f"convert X (X.to({ref.dtype})) or the network"
            )
        Phi = X if self.features is None else self.features(X)
        if Phi.dim() != 2 or Phi.shape[-1] != self.feature_dim:
            raise ValueError(f"the features have shape {tuple(Phi.shape)}; expected (n, {self.feature_dim})")
        if not torch.isfinite(Phi).all():
            raise ValueError("the feature network returned NaN or inf")
        if self.bias:
            Phi = torch.cat([Phi, torch.ones(Phi.shape[0], 1, dtype=Phi.dtype, device=Phi.device)], -1)
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
        :param num_data: the full data set size (a positive integer) when ``X`` is a minibatch.
        :param design: precomputed :meth:`design` (e.g. frozen features for NUTS); ``X`` is then ignored.
        :returns: ``f``, ``(..., n, C)``.
        """
        if design is not None:
            _check_batch("design", design, self.weight_shape[1])
        Phi = self.design(X) if design is None else design
        n = Phi.shape[0]
        if y is not None:
            y = self.head.check_targets(y, n)
        size = n if num_data is None else check_positive_int("num_data", num_data)
        if size < n:
            raise ValueError(f"num_data ({size}) is smaller than the batch ({n})")
        W = self.prior.sample(self.weight_site, self.weight_shape, Phi.dtype, Phi.device)
        if W.dim() > 2 and W.shape[-3] != 1:
            # draws batched left of the data plate should arrive as (..., 1, C, D), as under Trace_ELBO's particle
            # plate; Predictive(parallel=True) sizes its plate from the guide alone and hands over (S, C, D)
            W = W.unsqueeze(-3)
        f = (Phi.unsqueeze(-2) * W).sum(-1)  # (..., n, C): W's batch dims sit left of the data plate
        with pyro.plate(self.plate_name, size, subsample=torch.arange(n, device=Phi.device)):
            pyro.deterministic(self.f_site, f, event_dim=1)
            infer = {"last_layer": {"design": Phi, "weights": self.weight_site}}
            self.head.observe(self.y_site, f, y, infer=infer)
        return f
