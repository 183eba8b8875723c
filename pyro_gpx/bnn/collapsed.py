r"""A Bayesian MLP with its Gaussian-linear readout integrated out, for HMC/NUTS over the hidden weights.

Repriorisation [1] (:class:`~pyro_gpx.bnn.repriorise.RepriorisedReadout`) leaves the readout in the
sampler as :math:`\phi \sim N(0, I)`, exactly standard normal and independent of the hidden weights
and noise a posteriori. Collapsing goes one step further: the sampler sees only the hidden weights
(and the noise), under the marginal likelihood

.. math::

    p(W, \lambda \mid y) \propto p(W)\,p(\lambda)
    \prod_j N\big(y_{:,j};\ 0,\ \tilde\Phi_W\tilde\Phi_W^\top + \lambda I\big)

(:class:`~pyro_gpx.bnn.marginal.GaussianLinearMarginal`), the same marginal posterior the repriorised
chain targets. The readout is then drawn exactly, independently at every kept draw,
:math:`\tilde\theta = G^{-1}\tilde\Phi^\top y + \sqrt\lambda G^{-1/2}\phi` with a fresh
:math:`\phi \sim N(0, I)`. Compared with the repriorised chain this (a) drops the
:math:`D \cdot d_{\text{out}}` readout coordinates from the trajectories, (b) costs less per gradient
(one :math:`n \times n` Cholesky factor instead of an eigendecomposition and the readout products),
and (c) gives predictions whose readout part carries no autocorrelation: in a wide network most of
the posterior predictive variance is that part.

``integrate_noise=True`` integrates a latent noise variance out as well, by quadrature in
:math:`\log\lambda` (:class:`~pyro_gpx.bnn.noise_quadrature.NoiseIntegratedMarginal`): the sampler
then sees the hidden weights only, and :meth:`CollapsedModel.noise_draws` draws each kept draw's
noise from :math:`p(\lambda \mid W, y)` afterwards (add it to the samples before
:meth:`~CollapsedModel.readout_draws` or ``Predictive``).

Prediction: called without targets, the model is the repriorised model, whose :math:`\phi` site
``Predictive`` draws from its :math:`N(0, I)` prior, which *is* its posterior; so
``Predictive(collapsed, samples)(X_new)`` returns exact posterior predictive draws, and
``return_sites=["readout"]`` the readout of each. ArviZ export of the chains works as for any model,
but the observed site ``"y"`` is the joint marginal of all targets, so its log-likelihood has one
value per draw, not one per data point (for PSIS-LOO, evaluate the repriorised model on the draws
with their readouts), and ``to_inference_data(..., posterior_predictive=True)`` refuses it (its draws
would integrate the readout over its prior): use :func:`~pyro_gpx.bnn.predictions_to_inference_data`.

References:

[1] J. Hron, R. Novak, J. Pennington, J. Sohl-Dickstein. Wide Bayesian neural networks have a
    simple weight posterior: theory and accelerated sampling. ICML 2022.
"""

from __future__ import annotations

import pyro
import torch
from pyro.poutine.messenger import Messenger

from .._validation import check_finite
from .marginal import _TrajectoryMarginal
from .mlp import BayesianMLP, RepriorisedModel
from .noise_quadrature import NoiseGrid, NoiseIntegratedMarginal

__all__ = ["CollapsedModel"]


class _NoiseMustBeGiven(Messenger):
    """Raise when a prediction conditions the hidden weights (``Predictive`` with posterior draws) but
    not the noise: with ``integrate_noise=True`` the draws lack it, and the model would silently draw it
    from its prior."""

    def __init__(self) -> None:
        super().__init__()
        self.noise_given: bool | None = None

    def _postprocess_message(self, msg):
        if msg["type"] != "sample":
            return
        if msg["name"] == "noise":
            self.noise_given = bool(msg["is_observed"])
        elif msg["name"].startswith("layers.") and msg["is_observed"] and self.noise_given is False:
            raise ValueError(
                "the samples give the hidden weights but not 'noise', which integrate_noise=True leaves out of "
                "the chains; add it first: samples['noise'] = model.noise_draws(samples)"
            )


class CollapsedModel:
    """``model(X, y)``: hidden weights (and noise) under the readout's marginal likelihood;
    ``model(X_new)``: the repriorised model, predicting with the training data. The training data are
    those of the first call with targets, or of :meth:`set_training_data` (which replaces them); a call
    with other targets raises ``ValueError``, since the marginal likelihood of held-out targets is no
    held-out score (predict instead, or score with :attr:`repriorised` on draws with readouts).
    Without posterior draws of the hidden weights, ``model(X_new)`` still draws the readout given the
    training data: not the prior predictive, which the plain :class:`~pyro_gpx.bnn.mlp.BayesianMLP`
    gives. Picklable, so :func:`~pyro_gpx.bnn.chains.run_chains` can run it in other processes.

    :param model: a :class:`~pyro_gpx.bnn.mlp.BayesianMLP` with a Gaussian likelihood.
    :param integrate_noise: integrate the latent noise variance out too (the model's noise must be
        latent, ``noise=None``); the samples then lack ``"noise"``: add ``noise_draws(samples)``.

    Example::

        >>> from pyro.infer import MCMC, NUTS, Predictive
        >>> X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
        >>> y = torch.sin(3 * X[:, 0])
        >>> model = BayesianMLP(1, [16], noise=0.05).collapsed()
        >>> mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, disable_progbar=True)
        >>> mcmc.run(X, y)
        >>> sorted(mcmc.get_samples())
        ['layers.0.bias', 'layers.0.weight']
        >>> draws = Predictive(model, mcmc.get_samples(), return_sites=["readout", "y"])(X)
        >>> tuple(draws["readout"].shape[-2:]), tuple(draws["y"].shape)  # 20 draws of the (1, 17) readout
        ((1, 17), (20, 20))
    """

    def __init__(self, model: BayesianMLP, integrate_noise: bool = False):
        if model.likelihood != "gaussian":
            raise NotImplementedError(
                "collapsing integrates the readout out exactly, which needs a Gaussian likelihood; sample "
                "classification networks with plain NUTS"
            )
        if integrate_noise and model.noise is not None:
            raise ValueError(
                f"integrate_noise=True needs a latent noise (BayesianMLP(..., noise=None)); this model's noise is "
                f"fixed at {model.noise}"
            )
        if integrate_noise and not model.widths:
            raise ValueError("integrate_noise=True leaves a model without hidden layers nothing to sample")
        self.model = model
        self.repriorised = RepriorisedModel(model)
        self.integrate_noise = integrate_noise
        self._grid: NoiseGrid | None = None
        self._grid_obs = 0  # the grid's num_obs (read only once _grid is set)

    def noise_grid(self, num_obs: int) -> NoiseGrid:
        """The quadrature grid of the noise prior for ``num_obs`` scalar targets (built once, then reused)."""
        if self._grid is None or self._grid_obs != num_obs:
            grid = NoiseGrid.from_prior(self.model.noise_prior, num_obs, dtype=self.model.dtype)
            self._grid, self._grid_obs = grid, num_obs
        return self._grid

    def _scaled_features(self, X: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        bnn = self.model
        Phi = bnn.features(X, bnn.sample_hidden() if params is None else params)
        if bnn.parameterization == "standard":  # NTK features already carry the prior scales
            Phi = Phi * bnn.readout_prior_scale()
        return Phi

    def noise_draws(self, samples: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        r"""One draw of the noise variance :math:`\lambda \sim p(\lambda \mid W, y)` per posterior draw of
        the hidden weights (``integrate_noise=True``), with the leading dimensions of ``samples``;
        see :meth:`~pyro_gpx.bnn.noise_quadrature.NoiseGrid.sample`.

        :param samples: the hidden weights, e.g. ``(chain, draw, ...)`` from
            :func:`~pyro_gpx.bnn.chains.run_chains`.
        """
        if not self.integrate_noise:
            raise ValueError("the noise is a coordinate of the chains (integrate_noise=False): it is in the samples")
        bnn = self.model
        hidden = {k: v for k, v in samples.items() if k.startswith("layers.")}
        bnn.check_samples({**hidden, "noise": None})  # the hidden-weight sites only: the noise is what we draw
        X, y = self.repriorised.reparam._training_data()
        Y = y.reshape(y.shape[0], -1).to(bnn.dtype)
        grid = self.noise_grid(Y.numel())
        batch = hidden["layers.0.bias"].shape[:-1]
        flat = {k: v.reshape((-1,) + v.shape[len(batch) :]) for k, v in hidden.items()}
        out = torch.empty(flat["layers.0.bias"].shape[0], dtype=bnn.dtype)
        with torch.no_grad():
            for i in range(out.shape[0]):
                Phi = self._scaled_features(X, {k: v[i] for k, v in flat.items()})
                out[i] = grid.sample(Phi, Y, generator)
        return out.reshape(batch)

    def set_training_data(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Fix (or replace) the data the readout is conditioned on; call it before sampling on new data."""
        self.repriorised.set_training_data(X, y)

    def readout_draws(self, samples: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        r"""One exact readout draw per posterior draw: :math:`\theta \mid W, \lambda, y`, with a fresh
        :math:`\phi \sim N(0, I)` for each, in the original coordinates (``(..., out_dim, D)``).

        :param samples: hidden weights (and ``"noise"`` if latent) with common leading dimensions, e.g.
            ``(chain, draw)`` from :func:`~pyro_gpx.bnn.chains.run_chains` or ``MCMC.get_samples()``.
        :param generator: the random stream of the :math:`\phi` draws (one ``randn`` call of shape
            ``(..., D, out_dim)``).
        """
        bnn = self.model
        X, y = self.repriorised.reparam._training_data()
        if self.integrate_noise and "noise" not in samples:
            raise ValueError(
                "samples lack 'noise': it was integrated out of the chains; add one draw per sample first, "
                "samples['noise'] = model.noise_draws(samples)"
            )
        bnn.check_samples(samples)
        if bnn.widths:
            batch = samples["layers.0.bias"].shape[:-1]  # a bias is a vector per draw
        elif "noise" in samples:
            batch = samples["noise"].shape
        else:
            raise ValueError("samples hold no latent site (a linear model with fixed noise has nothing to sample)")
        phi = torch.randn(batch + (bnn.feature_dim, bnn.out_dim), generator=generator, dtype=bnn.dtype)
        return bnn.map_readout(samples, phi, X, y)

    def __call__(self, X: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor | None:
        if y is None:
            if self.integrate_noise:
                with _NoiseMustBeGiven():
                    return self.repriorised(X)
            return self.repriorised(X)
        bnn = self.model
        check_finite("X", X)
        check_finite("y", y)
        bnn.check_data(X, y)
        reparam = self.repriorised.reparam
        if reparam.training_data is None:
            reparam.adopt_training_data(X, y)
        elif not reparam.is_training_data(X, y):
            raise ValueError(
                "CollapsedModel was called with targets other than its training data (those of its first call "
                "with targets, or of set_training_data). Its density of y is the marginal likelihood with the "
                "readout integrated over its prior: the sampling target on the training data, not a held-out "
                "score. To sample on new data, call set_training_data(X, y) first (or build a new model); to "
                "predict, call it without targets (Predictive(model, samples)(X_new), or "
                "pyro_gpx.bnn.predictions_to_inference_data); to score held-out targets, evaluate "
                "model.repriorised on the draws plus fresh N(0, I) draws of 'readout_whitened'"
            )
        out_dim = None if bnn.out_dim == 1 else bnn.out_dim
        if self.integrate_noise:
            marginal = NoiseIntegratedMarginal(self._scaled_features(X), self.noise_grid(y.numel()), out_dim)
        else:
            noise = bnn.noise_variance()
            marginal = _TrajectoryMarginal(self._scaled_features(X), noise, out_dim)
        pyro.sample("y", marginal, obs=y.to(bnn.dtype))
        return None
