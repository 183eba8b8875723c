r"""Repriorisation of a Gaussian-likelihood readout layer (Hron et al. 2022) as a Pyro ``Reparam``.

Let :math:`\tilde\Phi \in \mathbb{R}^{n \times D}` be the readout's inputs scaled by the prior
standard deviations, so that the readout weights are :math:`\theta = s \odot \tilde\theta` with
:math:`\tilde\theta \sim N(0, I)`, and let :math:`y \sim N(\tilde\Phi\tilde\theta, \lambda I)`.
Given the hidden weights, :math:`\tilde\theta` has the Gaussian posterior
:math:`N(G^{-1}\tilde\Phi^\top y,\ \lambda G^{-1})` with :math:`G = \tilde\Phi^\top\tilde\Phi + \lambda I = LL^\top`.
The reparameterisation replaces the readout by a new latent :math:`\phi \sim N(0, I)`:

.. math::

    \tilde\theta = G^{-1}\tilde\Phi^\top y + \sqrt\lambda\, L^{-\top}\phi, \qquad
    \log|\det J| = d_{\text{out}}\Big(\sum_j \log s_j + \tfrac{D}{2}\log\lambda - \sum_i \log L_{ii}\Big).

In these coordinates the joint posterior is :math:`p(\theta_{\text{hidden}})\, p(y \mid
\theta_{\text{hidden}})\, N(\phi; 0, I)`: :math:`\phi` is *exactly* standard normal a posteriori and
the hidden weights see only the marginal likelihood, which is nearly flat for wide networks [1]. So
HMC/NUTS meets an almost isotropic Gaussian and mixes fast.

Bookkeeping: the new site ``"<name>_whitened"`` has an :math:`N(0, I)` distribution and the original
site becomes a ``Delta`` at :math:`\theta(\phi)` with log-density
:math:`\log N(\theta; 0, s^2) + \log|\det J| - \log N(\phi; 0, I)`, so the reparameterised model's
density is the original density plus the log-Jacobian, as a change of variables requires.

References:

[1] J. Hron, R. Novak, J. Pennington, J. Sohl-Dickstein. Wide Bayesian neural networks have a
    simple weight posterior: theory and accelerated sampling. ICML 2022.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.reparam.reparam import Reparam

from .._linalg import gram
from .._validation import check_finite
from ..gp.cholesky import safe_cholesky
from .matrix_function import whitening_terms

__all__ = ["RepriorisedReadout", "readout_map"]


def _check_noise(noise: torch.Tensor) -> None:
    """``ValueError`` unless the noise variance is positive and finite (a negative one gave a finite map
    in the dual form, a NaN in the primal one)."""
    if not bool(torch.isfinite(noise).all() and (noise > 0).all()):
        raise ValueError(f"the noise variance must be positive and finite, got {noise}")


def readout_map(
    Phi_scaled: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, whitened: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\tilde\theta(\phi)` (``(D, d_out)``) and :math:`\log|\det \partial\tilde\theta/\partial\phi|`.

    With at least half as many data as features (:math:`2n \ge D`) the square root of
    :math:`\lambda G^{-1}` is :math:`\sqrt\lambda L^{-\top}` (:math:`O(D^3)`). With fewer
    (:math:`2n < D`, wide networks) it is the symmetric root in its dual form,
    :math:`\sqrt\lambda G^{-1/2} = I + \tilde\Phi^\top h(K/\lambda)\tilde\Phi/\lambda` with
    :math:`K = \tilde\Phi\tilde\Phi^\top`, and the mean and determinant use :math:`K + \lambda I`
    (:math:`O(n^2 D + n^3)`), all from one eigendecomposition of :math:`K/\lambda`
    (:func:`~pyro_gpx.bnn.matrix_function.whitening_terms`). Both roots
    whiten the conditional posterior exactly; they differ only in which :math:`\phi` maps to which
    :math:`\tilde\theta`, and that matters to the sampler: an eigendecomposition-free dual root,
    :math:`I - \tilde\Phi^\top L^{-\top}(L + \sqrt\lambda I)^{-1}\tilde\Phi` with :math:`K + \lambda I = LL^\top`
    (also exact, and half the cost per gradient at :math:`n = 500`, :math:`D = 1025`), took NUTS 45
    instead of 31 gradients per draw on concrete (:math:`n = 100`, :math:`D = 1025`) with less than
    half the median ESS per gradient. The symmetric root is the one closest to the identity.

    :param Phi_scaled: :math:`\tilde\Phi`, ``(n, D)``.
    :param y: ``(n, d_out)`` targets.
    :param noise: :math:`\lambda > 0`.
    :param whitened: :math:`\phi`, ``(D, d_out)``.
    """
    if Phi_scaled.dim() != 2:
        raise ValueError(f"Phi_scaled must be an (n, D) matrix, got shape {tuple(Phi_scaled.shape)}")
    n, D = Phi_scaled.shape
    if whitened.dim() != 2 or whitened.shape[0] != D:
        raise ValueError(f"whitened must have shape ({D}, d_out) for {D} features, got {tuple(whitened.shape)}")
    d_out = whitened.shape[-1]
    if tuple(y.shape) != (n, d_out):
        raise ValueError(f"y must have shape ({n}, {d_out}) (Phi_scaled's rows by whitened's columns), got {y.shape}")
    check_finite("y", y)
    noise = torch.as_tensor(noise, dtype=Phi_scaled.dtype)
    _check_noise(noise)
    if 2 * n >= D:  # the eigendecomposition costs several Cholesky factorisations of its size
        G = gram(Phi_scaled) + noise * torch.eye(D, dtype=Phi_scaled.dtype)
        L = safe_cholesky(G, "the readout Gram matrix Phi^T Phi + noise I")
        mean = torch.cholesky_solve(Phi_scaled.T @ y, L)
        theta = mean + noise.sqrt() * torch.linalg.solve_triangular(L.T, whitened, upper=True)
        logdet = d_out * (0.5 * D * torch.log(noise) - L.diagonal().log().sum())
        return theta, logdet
    K = gram(Phi_scaled.T)
    if not torch.isfinite(K).all():
        raise ValueError("the readout kernel matrix Phi Phi^T is not finite")
    shrunk, solved, logdet_IS = whitening_terms(K / noise, Phi_scaled @ whitened, y)
    # one product with Phi^T for mean and root together: each (n, D) product costs a pass over an
    # (n, D) matrix in the backward pass, the largest cost per gradient after K's Gram product at n << D
    theta = whitened + Phi_scaled.T @ ((solved + shrunk) / noise)
    # log det G = (D - n) log(noise) + log det(K + noise I), log det(K + noise I) = n log(noise) + log det(I + K/noise)
    logdet = -0.5 * d_out * logdet_IS
    return theta, logdet


class RepriorisedReadout(Reparam):
    r"""Reparameterise a Gaussian-linear readout site so NUTS samples its exact conditional posterior.

    :param features: ``features(X) -> (n, D)`` readout inputs at the *current* hidden weights of
        the model run (e.g. :meth:`~pyro_gpx.bnn.mlp.BayesianMLP.features`).
    :param noise: ``noise() -> tensor`` the current likelihood noise variance (a number if fixed).
    :param data: ``data(args, kwargs) -> (X, y)``: the training data from the model's arguments
        (``poutine.reparam`` passes them as ``args_kwargs``); default ``(args[0], args[1] or kwargs["y"])``.
    :raises NotImplementedError: if ``features`` is a method of a model with a non-Gaussian
        likelihood (e.g. a categorical :class:`~pyro_gpx.bnn.mlp.BayesianMLP`).

    **Training data.** The map :math:`\phi \mapsto \theta` is built from fixed *training* data
    :math:`(X_0, y_0)`: those of the first model call with targets, or of :meth:`set_training_data`
    (which replaces them; a first call with targets that runs without gradients, an evaluation such
    as scoring reloaded draws on held-out data, warns). Later calls use them whatever their own
    arguments:

    * with the training data (the same tensors or equal values; e.g. every step of an MCMC run):
      the repriorised density of the run;
    * without targets, ``model(X_new)`` (``Predictive(model, samples)(X_new)``): the readout
      :math:`\theta(\phi)` of each draw, mapped with :math:`(X_0, y_0)`, applied to the new inputs;
    * with other targets, ``model(X_test, y_test)`` (``Predictive`` or
      :func:`~pyro_gpx.diagnostics.to_inference_data` with ``model_args=(X_test, y_test)``): the
      same readout, and the likelihood of the held-out targets under it, i.e. each draw's
      held-out log-likelihood :math:`\log p(y_{\text{test}} \mid X_{\text{test}}, W, \theta(\phi))`.

    This is exact: for any fixed :math:`(X_0, y_0)` the map is a bijection with the log-Jacobian
    above, so the model's density is the original density plus the log-Jacobian. The training data
    only decide which coordinates :math:`\phi` the sampler sees: with those the posterior is
    conditioned on, :math:`\phi` is exactly :math:`N(0, I)` a posteriori. So to *sample* on other
    data, call :meth:`set_training_data` with them first (or build a new model): otherwise the chain
    still targets the right posterior, but in the coordinates whitened for the old data.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        noise: Callable[[], torch.Tensor] | float,
        data: Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ):
        _check_gaussian_owner(features)
        if not callable(noise):  # a fixed noise is checked once; a latent one that over- or underflows is a
            _check_noise(torch.as_tensor(noise))  # point of zero density (below)
        self.features = features
        self.noise = noise
        self.data = data or _default_data
        self.training_data: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_training_data(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the data :math:`(X_0, y_0)` the readout is mapped with (replacing any earlier ones).

        :raises ValueError: if ``X`` or ``y`` contain NaN or inf, or ``y`` has an integer dtype (class
            labels) and the model is not known to have a Gaussian likelihood.
        """
        if not (torch.isfinite(X).all() and torch.isfinite(y).all()):
            raise ValueError("the training data X, y contain NaN or inf")
        if _likelihood_of(self.features) != "gaussian":
            _check_real_targets(y)
        self.training_data = (X, y)

    def adopt_training_data(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Take the data of the first call with targets as the training data, as :meth:`set_training_data`;
        warns if that call runs without gradients (an evaluation, such as ``to_inference_data`` with
        held-out data on reloaded draws, where the held-out targets would become the training data)."""
        if not torch.is_grad_enabled():
            warnings.warn(
                "the repriorised readout takes its training data from this first call with targets, which runs "
                "without gradients (an evaluation, e.g. of reloaded draws on held-out data): if these are not the "
                "data the chains ran on, call set_training_data(X_train, y_train) on the model first",
                UserWarning,
                stacklevel=3,
            )
        self.set_training_data(X, y)

    def is_training_data(self, X: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether ``(X, y)`` are the stored training data (the same tensors, or equal values)."""
        if self.training_data is None:
            return False
        X0, y0 = self.training_data
        if X is X0 and y is y0:
            return True
        same = [(a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) for a, b in ((X, X0), (y, y0))]
        return all(same) and torch.equal(X, X0) and torch.equal(y, y0)

    def _training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        args_kwargs = getattr(self, "args_kwargs", None)
        if args_kwargs is not None:
            X, y = self.data(*args_kwargs)
            if y is not None:
                if self.training_data is None:
                    self.adopt_training_data(X, y)
                elif self.is_training_data(X, y):
                    # this call's own tensors: the model may reuse the features it has just computed
                    return X, y
        if self.training_data is None:
            raise ValueError(
                "repriorisation needs the training targets: call the model with y, or set_training_data(X, y)"
            )
        return self.training_data

    def apply(self, msg):
        name, fn = msg["name"], msg["fn"]
        if msg["is_observed"]:
            raise ValueError(f"site {name!r} is observed; repriorisation applies to a latent readout")
        _check_gaussian_owner(self.features)
        base, event_dim = self._unwrap(fn)
        if not isinstance(base, dist.Normal) or (base.loc != 0).any():
            raise ValueError(f"site {name!r} needs a zero-mean Normal prior, got {type(base).__name__}")
        if event_dim != 2 or len(fn.event_shape) != 2:
            raise ValueError(f"site {name!r} must be a (d_out, D) matrix with event_dim 2")
        d_out, D = fn.event_shape
        scale = base.scale.expand(fn.batch_shape + fn.event_shape)
        if (scale != scale[..., :1, :]).any():
            raise ValueError(f"the prior scale of {name!r} must not vary across outputs")
        s = scale[..., 0, :]  # (D,)
        X, y = self._training_data()
        Phi = self.features(X)
        if Phi.shape[-1] != D:
            raise ValueError(f"features have {Phi.shape[-1]} columns; the readout {name!r} expects {D}")
        if y.dim() == 0 or y.shape[0] != Phi.shape[0]:
            rows = Phi.shape[0]
            raise ValueError(f"y has shape {tuple(y.shape)}; the readout {name!r} needs one row per input ({rows})")
        Y = y.reshape(y.shape[0], -1).to(Phi.dtype)
        if Y.shape[-1] != d_out:
            raise ValueError(f"targets have {Y.shape[-1]} outputs; the readout {name!r} has {d_out}")
        noise = self.noise() if callable(self.noise) else torch.as_tensor(self.noise, dtype=Phi.dtype)
        if fn.batch_shape != torch.Size() or Phi.dim() != 2 or torch.as_tensor(noise).dim() != 0:
            raise NotImplementedError("repriorisation of batched (vectorised) readouts is not supported")
        whitened = pyro.sample(f"{name}_whitened", dist.Normal(torch.zeros(D, d_out, dtype=Phi.dtype), 1.0).to_event(2))
        if whitened.dim() != 2:  # inside a plate over draws (vectorised Predictive)
            raise NotImplementedError("repriorisation of batched (vectorised) readouts is not supported")
        # the sum is non-finite if any entry is (or, harmlessly, if finite entries overflow): an
        # elementwise isfinite pass over an (n, D) matrix costs as much as several products with it
        noise_t = torch.as_tensor(noise)
        if not (torch.isfinite(Phi.sum()) and torch.isfinite(noise_t).all() and (noise_t > 0).all()):
            # this point's hidden weights (or noise) overflow the features, e.g. an unstable leapfrog
            # trajectory during warm-up: zero density, which HMC/NUTS reject as they reject any NaN energy
            # (the training data are checked finite, so this is never bad input)
            theta = torch.zeros(d_out, D, dtype=Phi.dtype)
            new_fn = dist.Delta(theta, event_dim=2, log_density=torch.tensor(-math.inf, dtype=Phi.dtype))
            return {"fn": new_fn, "value": theta, "is_observed": True}
        unit = bool((s == 1).all())  # NTK parameterisation: no column scaling to apply
        theta_scaled, logdet = readout_map(Phi if unit else Phi * s, Y, noise, whitened)
        theta = (theta_scaled if unit else theta_scaled * s[:, None]).T
        if not unit:
            logdet = logdet + d_out * s.log().sum()
        log_density = fn.log_prob(theta) + logdet - dist.Normal(0.0, 1.0).log_prob(whitened).sum()
        new_fn = dist.Delta(theta, event_dim=2, log_density=log_density)
        return {"fn": new_fn, "value": theta, "is_observed": True}


def _check_gaussian_owner(features: Callable) -> None:
    """Refuse a model whose likelihood is known not to be Gaussian (``features`` bound to it).

    The reparameterisation runs at the readout site, before the model's observation site, so it
    cannot see the likelihood of an arbitrary model: this catches :class:`~pyro_gpx.bnn.mlp.BayesianMLP`
    (and any model with a ``likelihood`` attribute); for other models, integer targets (class labels)
    are refused when the training data are set.
    """
    likelihood = _likelihood_of(features)
    if likelihood is not None and likelihood != "gaussian":
        raise NotImplementedError(
            f"repriorisation maps the readout to its exact conditional posterior, which needs a Gaussian "
            f"likelihood; this model's likelihood is {likelihood!r} (sample classification networks with plain NUTS)"
        )


def _likelihood_of(features: Callable) -> str | None:
    """The ``likelihood`` attribute of the model ``features`` is a method of, if any."""
    likelihood = getattr(getattr(features, "__self__", None), "likelihood", None)
    return likelihood if isinstance(likelihood, str) else None


def _check_real_targets(y: torch.Tensor) -> None:
    if not y.is_floating_point():
        raise ValueError(
            f"y has dtype {y.dtype}: repriorisation needs real targets of a Gaussian likelihood (class labels "
            "need a categorical one, which it does not support; convert regression targets to floating point)"
        )


def _default_data(args: tuple, kwargs: dict):
    X = args[0] if args else kwargs.get("X")
    if X is None:
        raise ValueError("repriorisation expects the inputs X as the model's first argument (or X=)")
    y = args[1] if len(args) > 1 else kwargs.get("y")
    return X, y
