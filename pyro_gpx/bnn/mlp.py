r"""Bayesian MLPs as Pyro models, in standard or NTK parameterisation.

Hidden layer :math:`\ell` computes :math:`h_\ell = \sigma(a_\ell)` with

.. math::

    a_\ell = \frac{\sigma_w}{\sqrt{n_{\ell-1}}} W_\ell h_{\ell-1} + \sigma_b b_\ell,
    \quad W_\ell, b_\ell \sim N(0, I) \qquad \text{(NTK)},

or :math:`a_\ell = W_\ell h_{\ell-1} + b_\ell` with :math:`W_\ell \sim N(0, \sigma_w^2/n_{\ell-1})`,
:math:`b_\ell \sim N(0, \sigma_b^2)` (standard) — the same prior over functions, different
coordinates for the sampler. A residual MLP adds :math:`h_{\ell-1}` to equal-width layers. The
readout is one site ``"readout"`` of shape ``(out, width + 1)`` acting on the features
:math:`[h_L, 1]`, so that weights and bias form one Gaussian-linear block, which is what
:class:`~pyro_gpx.bnn.repriorise.RepriorisedReadout` needs.

Sites, in order: ``"noise"`` (if latent), ``"layers.k.weight"``, ``"layers.k.bias"``,
``"readout"``, then the observations ``"y"`` in ``pyro.plate("data")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule

from .._validation import check_finite, check_positive_int, is_finite_at_least
from .repriorise import RepriorisedReadout, readout_map

__all__ = ["BayesianMLP", "RepriorisedModel"]

# GELU is ReLU-like but smooth: its gradient in the weights is continuous, which integrators need
_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh, "erf": torch.erf}


class BayesianMLP(PyroModule):
    """A fully Bayesian MLP regression or classification model.

    :param in_dim: input features.
    :param widths: hidden layer widths (empty: Bayesian linear regression).
    :param out_dim: outputs (regression) or classes (``likelihood="categorical"``).
    :param parameterization: ``"ntk"`` or ``"standard"``.
    :param weight_scale: :math:`\\sigma_w`; :param bias_scale: :math:`\\sigma_b`.
    :param activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"erf"``.
    :param residual: add skip connections wherever a hidden layer's width equals its input's (the
        first layer's too, when ``in_dim`` equals ``widths[0]``).
    :param likelihood: ``"gaussian"`` or ``"categorical"``.
    :param noise: Gaussian noise variance; ``None`` makes it a latent site with ``noise_prior``.
    :param noise_prior: prior of the latent noise variance (default ``LogNormal(log 0.1, 1)``).
    :param dtype: the weights' and inputs' dtype (the priors and the features are built in it).
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        out_dim: int = 1,
        *,
        parameterization: str = "ntk",
        weight_scale: float = 1.0,
        bias_scale: float = 0.1,
        activation: str = "relu",
        residual: bool = False,
        likelihood: str = "gaussian",
        noise: float | None = 0.1,
        noise_prior: dist.TorchDistribution | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if parameterization not in ("ntk", "standard"):
            raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if likelihood not in ("gaussian", "categorical"):
            raise ValueError(f"likelihood must be 'gaussian' or 'categorical', got {likelihood!r}")
        in_dim, out_dim = check_positive_int("in_dim", in_dim), check_positive_int("out_dim", out_dim)
        widths = [check_positive_int("widths", w) for w in widths]  # 4.7 was truncated to 4
        if likelihood == "categorical" and out_dim < 2:  # one class: log p(y) = 0 whatever the data
            raise ValueError(f"a categorical likelihood needs out_dim >= 2 classes, got {out_dim}")
        if noise is not None and not is_finite_at_least(noise, 0.0, strict=True):
            raise ValueError(f"noise must be a finite positive number or None, got {noise}")
        for name, value in (("weight_scale", weight_scale), ("bias_scale", bias_scale)):
            if not is_finite_at_least(value, 0.0, strict=True):
                raise ValueError(f"{name} must be a finite positive number, got {value}")
        self.in_dim, self.widths, self.out_dim = in_dim, [int(w) for w in widths], out_dim
        self.parameterization, self.weight_scale, self.bias_scale = parameterization, weight_scale, bias_scale
        self.activation, self.residual, self.likelihood = activation, residual, likelihood
        self.noise, self.dtype = noise, dtype
        default_prior = dist.LogNormal(torch.tensor(math.log(0.1), dtype=dtype), torch.tensor(1.0, dtype=dtype))
        self.noise_prior = noise_prior or default_prior
        self.fan_ins = [in_dim] + self.widths[:-1]
        self._current: dict[str, torch.Tensor] = {}
        self._current_noise: torch.Tensor | None = None
        self._current_features: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- priors -----------------------------------------------------------------------------------
    def _weight_prior(self, fan_in: int, shape) -> dist.TorchDistribution:
        scale = 1.0 if self.parameterization == "ntk" else self.weight_scale / math.sqrt(fan_in)
        return dist.Normal(torch.zeros(shape, dtype=self.dtype), scale).to_event(len(shape))

    def _bias_prior(self, shape) -> dist.TorchDistribution:
        scale = 1.0 if self.parameterization == "ntk" else self.bias_scale
        return dist.Normal(torch.zeros(shape, dtype=self.dtype), scale).to_event(len(shape))

    @property
    def feature_dim(self) -> int:
        return (self.widths[-1] if self.widths else self.in_dim) + 1

    def readout_prior_scale(self) -> torch.Tensor:
        """Prior standard deviation of each readout input column (the last one is the bias)."""
        d = self.feature_dim - 1
        if self.parameterization == "ntk":
            return torch.ones(d + 1, dtype=self.dtype)
        scales = torch.full((d + 1,), self.weight_scale / math.sqrt(d), dtype=self.dtype)
        scales[-1] = self.bias_scale
        return scales

    # -- the network ------------------------------------------------------------------------------
    def sample_hidden(self) -> dict[str, torch.Tensor]:
        """Sample every hidden-layer weight and bias (one Pyro site each)."""
        params = {}
        for k, (fan_in, width) in enumerate(zip(self.fan_ins, self.widths)):
            weight, bias = f"layers.{k}.weight", f"layers.{k}.bias"
            params[weight] = pyro.sample(weight, self._weight_prior(fan_in, (width, fan_in)))
            params[bias] = pyro.sample(bias, self._bias_prior((width,)))
        return params

    def features(self, X: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        r"""Readout inputs :math:`[h_L, 1]` (NTK: scaled by :math:`\sigma_w/\sqrt{n_L}` and
        :math:`\sigma_b`) for hidden weights ``params`` (default: those of the current model run)."""
        if X.dim() != 2 or X.shape[-1] != self.in_dim:
            raise ValueError(f"X must be (n, {self.in_dim}), got shape {tuple(X.shape)}")
        if params is None:
            params = self._current
        h = X.to(self.dtype)
        act = _ACTIVATIONS[self.activation]
        for k, fan_in in enumerate(self.fan_ins[: len(self.widths)]):
            # in the model's dtype: a sampler's momenta follow the potential's dtype, which Pyro's plates
            # can promote to the default (a float32 model under a float64 default failed in its first step)
            W, b = params[f"layers.{k}.weight"].to(self.dtype), params[f"layers.{k}.bias"].to(self.dtype)
            if self.parameterization == "ntk":
                a = self.weight_scale / math.sqrt(fan_in) * h @ W.transpose(-1, -2) + self.bias_scale * b.unsqueeze(-2)
            else:
                a = h @ W.transpose(-1, -2) + b.unsqueeze(-2)
            new = act(a)
            h = h + new if self.residual and new.shape[-1] == h.shape[-1] else new
        ones = torch.ones(h.shape[:-1] + (1,), dtype=self.dtype)
        if self.parameterization == "ntk":
            d = h.shape[-1]
            return torch.cat([self.weight_scale / math.sqrt(d) * h, self.bias_scale * ones], -1)
        return torch.cat([h, ones], -1)

    def __getstate__(self):
        # the last run's draws may be non-leaf tensors in an autograd graph, which cannot be pickled
        # (e.g. to run chains in other processes after evaluating the model here)
        state = dict(super().__getstate__())
        state.update(_current={}, _current_noise=None, _current_features=None)
        return state

    def current_features(self, X: torch.Tensor) -> torch.Tensor:
        """:meth:`features` at the current run's hidden weights, reusing the run's own evaluation
        when ``X`` is the tensor the model was called with (the repriorised readout needs the
        features of the training inputs the model has just computed)."""
        cached = self._current_features
        if cached is not None and cached[0] is X:
            return cached[1]
        return self.features(X)

    def current_noise(self) -> torch.Tensor:
        """The noise variance drawn in the current model run."""
        if self._current_noise is None:
            raise ValueError("no model run in progress: the noise is drawn when the model runs")
        return self._current_noise

    def repriorised(self) -> RepriorisedModel:
        """This model with its readout repriorised (:class:`~pyro_gpx.bnn.repriorise.RepriorisedReadout`).

        :raises NotImplementedError: for a categorical likelihood: the exact map needs a Gaussian one.
        """
        if self.likelihood != "gaussian":
            raise NotImplementedError(
                "repriorisation maps the readout to its exact Gaussian conditional posterior, which needs a "
                "Gaussian likelihood; sample classification networks with plain NUTS (or a Laplace approximation)"
            )
        return RepriorisedModel(self)

    def collapsed(self, integrate_noise: bool = False):
        """This model with its readout integrated out (:class:`~pyro_gpx.bnn.collapsed.CollapsedModel`):
        the sampler sees only the hidden weights and noise (``integrate_noise``: the hidden weights
        only); readouts are drawn exactly afterwards."""
        from .collapsed import CollapsedModel  # collapsed imports this module

        return CollapsedModel(self, integrate_noise)

    def noise_variance(self) -> torch.Tensor:
        if self.noise is not None:
            return torch.tensor(self.noise, dtype=self.dtype)
        return pyro.sample("noise", self.noise_prior)

    def check_data(self, X: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Check the shapes of inputs ``X`` (``(n, in_dim)``) and targets ``y``: ``(n,)`` for one
        Gaussian output or class labels, ``(n, out_dim)`` for several Gaussian outputs.

        :raises ValueError: naming ``X`` or ``y``, e.g. for ``y`` of shape ``(n, 1)`` with one output
            (which would broadcast against the ``(n,)`` means into an ``(n, n)`` likelihood).
        """
        if X.dim() != 2 or X.shape[-1] != self.in_dim:
            raise ValueError(f"X must be (n, {self.in_dim}), got shape {tuple(X.shape)}")
        if y is None:
            return
        n = X.shape[0]
        several = self.likelihood == "gaussian" and self.out_dim > 1
        expected = (n, self.out_dim) if several else (n,)
        if tuple(y.shape) != expected:
            what = "one label" if self.likelihood != "gaussian" else f"{self.out_dim} outputs" if several else "one"
            raise ValueError(f"y must have shape {expected} ({what} per row of X), got {tuple(y.shape)}")
        if self.likelihood == "categorical":
            if y.is_floating_point() and (y != y.round()).any():
                raise ValueError("y must hold integer class labels")
            if ((y < 0) | (y >= self.out_dim)).any():
                raise ValueError(f"labels must lie in [0, {self.out_dim})")

    def check_samples(self, samples: Mapping[str, object]) -> None:
        """Raise ``ValueError`` naming the hidden-weight sites (and ``"noise"`` if latent) that
        ``samples`` lack."""
        missing = {f"layers.{k}.{p}" for k in range(len(self.widths)) for p in ("weight", "bias")} - set(samples)
        if self.noise is None:
            missing |= {"noise"} - set(samples)
        if missing:
            raise ValueError(f"samples lack the sites {sorted(missing)}")

    def map_readout(
        self, samples: dict[str, torch.Tensor], whitened: torch.Tensor, X: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        r"""The readouts :math:`\theta = s \odot (G^{-1}\tilde\Phi^\top y + \sqrt\lambda\, G^{-1/2}\phi)`
        of repriorisation (:func:`~pyro_gpx.bnn.repriorise.readout_map`) for a batch of draws, in the
        original coordinates, ``(..., out_dim, D)``.

        :param samples: hidden weights (and ``"noise"`` if latent) with leading dimensions ``...``.
        :param whitened: :math:`\phi`, ``(..., D, out_dim)``.
        :param X: training inputs; :param y: training targets.
        """
        D = self.feature_dim
        if whitened.shape[-2:] != (D, self.out_dim):
            raise ValueError(f"whitened readouts must end in ({D}, {self.out_dim}), got {tuple(whitened.shape)}")
        batch = whitened.shape[:-2]
        self.check_samples(samples)
        hidden = {k: v for k, v in samples.items() if k.startswith("layers.")}
        if self.noise is None:
            hidden["noise"] = samples["noise"]
        for k, v in hidden.items():
            if v.shape[: len(batch)] != batch:
                raise ValueError(f"samples of {k!r} have shape {tuple(v.shape)}; the draws are {tuple(batch)}")
        Y = y.reshape(y.shape[0], -1).to(self.dtype)
        s = self.readout_prior_scale()
        out = torch.empty(batch + (self.out_dim, D), dtype=self.dtype)
        flat_phi, flat_out = whitened.reshape(-1, D, self.out_dim), out.view(-1, self.out_dim, D)
        fixed_noise = None if self.noise is None else torch.tensor(self.noise, dtype=self.dtype)
        flat = {k: v.reshape((-1,) + v.shape[len(batch) :]) for k, v in hidden.items()}
        flat_noise = flat.pop("noise", None)
        with torch.no_grad():
            for i in range(flat_out.shape[0]):
                params = {k: v[i] for k, v in flat.items()}
                noise = fixed_noise if flat_noise is None else flat_noise[i]
                assert noise is not None  # check_samples requires a latent noise
                Phi = self.features(X, params) * s
                flat_out[i] = (readout_map(Phi, Y, noise, flat_phi[i])[0] * s[:, None]).T
        return out

    def forward(self, X: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_finite("X", X)
        if y is not None and y.is_floating_point():
            check_finite("y", y)
        self.check_data(X, y)
        noise = self.noise_variance() if self.likelihood == "gaussian" else None
        # kept for this run: the repriorisation reparam reads the hidden weights and noise from here
        self._current = self.sample_hidden()
        # size-1 batch dims broadcast (as in Predictive's prior draws); a batch of draws does not
        # math.prod: under pyro.render_model the values are ProvenanceTensors, whose shape is a plain tuple
        batched = [k for k, v in self._current.items() if math.prod(v.shape[: -2 if k.endswith("weight") else -1]) > 1]
        if batched:
            raise NotImplementedError(
                f"BayesianMLP runs one draw of its weights at a time, but {batched[0]!r} has shape "
                f"{tuple(self._current[batched[0]].shape)}: batched draws (Predictive(parallel=True), vectorised "
                "ELBO particles) are not supported; use Predictive(..., parallel=False)"
            )
        self._current_noise = noise
        Phi = self.features(X)
        self._current_features = (X, Phi)
        readout_scale = 1.0 if self.parameterization == "ntk" else self.readout_prior_scale()
        theta = pyro.sample(
            "readout",
            dist.Normal(torch.zeros(self.out_dim, self.feature_dim, dtype=self.dtype), readout_scale).to_event(2),
        )
        self._current_features = None  # read by the readout's reparameterisation only; holds the autograd graph
        f = Phi @ theta.to(self.dtype).transpose(-1, -2)  # (..., n, out); the draw in the model's dtype, as features
        with pyro.plate("data", X.shape[0]):
            if self.likelihood == "gaussian":
                assert noise is not None  # drawn above for a Gaussian likelihood
                loc = f[..., 0] if self.out_dim == 1 else f
                d = dist.Normal(loc, noise.sqrt().unsqueeze(-1) if noise.dim() else noise.sqrt())
                d = d if self.out_dim == 1 else d.to_event(1)
                pyro.sample("y", d, obs=None if y is None else y.to(self.dtype))
            else:
                pyro.sample("y", dist.Categorical(logits=f), obs=y)
        return f


class RepriorisedModel:
    """``poutine.reparam(model, {"readout": RepriorisedReadout(...)})`` as a picklable callable.

    ``model(X, y)`` is the repriorised model; the readout is mapped with the training data, those
    of the first call with targets or of :meth:`set_training_data`. ``model(X_new)`` predicts with
    them, and ``model(X_test, y_test)`` scores held-out targets with them (see
    :class:`~pyro_gpx.bnn.repriorise.RepriorisedReadout`). Without posterior draws of the hidden
    weights (``Predictive(model, num_samples=...)``), the readout is still drawn from its posterior
    given the training data and prior hidden weights: that is not the prior predictive, which the
    plain :class:`BayesianMLP` gives.

    :param model: a :class:`BayesianMLP` with a Gaussian likelihood.
    """

    def __init__(self, model: BayesianMLP):
        self.model = model
        self.reparam = RepriorisedReadout(model.current_features, model.current_noise)

    def __call__(self, *args, **kwargs):
        return poutine.reparam(self.model, config={"readout": self.reparam})(*args, **kwargs)

    def set_training_data(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Fix (or replace) the data the readout is mapped with; call it before sampling on new data."""
        check_finite("X", X)
        check_finite("y", y)
        self.model.check_data(X, y)
        self.reparam.set_training_data(X, y)

    def readout_draws(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """The readout of each draw in the original coordinates, ``(..., out_dim, D)``: its
        ``"readout_whitened"`` mapped back with the training data (what the model's ``"readout"``
        site holds at that draw).

        :param samples: ``"readout_whitened"``, the hidden weights (and ``"noise"`` if latent), with
            common leading dimensions, e.g. ``(chain, draw)`` or ``MCMC.get_samples()``'s ``(draw,)``.
        """
        if "readout_whitened" not in samples:
            raise ValueError("samples lack the site 'readout_whitened'")
        X, y = self.reparam._training_data()
        return self.model.map_readout(samples, samples["readout_whitened"], X, y)
