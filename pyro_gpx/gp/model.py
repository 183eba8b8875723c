r"""Computation-aware GP regression as a ``pyro.contrib.gp`` model.

:class:`ComputationAwareGP` follows ``pyro.contrib.gp.models.GPRegression``: ``model()`` is a Pyro
model with one observed site (the targets, scored by a
:class:`~pyro_gpx.gp.marginal.ComputationAwareMarginal`), ``guide()`` serves its own autoguides,
``forward(Xnew, full_cov, noiseless)`` predicts, and ``set_data`` swaps data. Hyperparameters are
point estimates or latent sites:

* ``pyro.contrib.gp`` kernels: ``PyroParam`` / ``PyroSample`` attributes as usual;
* GPyTorch kernels and mean functions: parameters are registered with ``pyro.module`` (point
  estimates); parameters with a GPyTorch prior (``lengthscale_prior=...``, ``constant_prior=...``)
  become latent sample sites (the mean's named ``mean_function.<prior name>``), so
  ``MCMC(NUTS(gp.model))`` samples them; under SVI they need a guide for those sites (an autoguide,
  e.g. ``AutoDelta`` for MAP): ``guide()`` covers ``PyroSample`` attributes only;
* the noise: ``gp.noise`` is a positive ``PyroParam``; assign a ``PyroSample`` to make it latent.

Numerical failures are not hidden: a Gram matrix that stays indefinite after jitter escalation
raises :class:`~pyro_gpx.gp.cholesky.CholeskyError` (naming the jitters tried; any jitter that
was needed warns with a ``NumericalWarning``), and NaN/inf kernel products raise
:class:`~pyro_gpx.gp.cholesky.NonFiniteError`. Under SVI they reach the user; Pyro's HMC/NUTS
rejects such a proposal as a divergent one, as it does torch's own Cholesky errors.

Example::

    >>> import torch, pyro, gpytorch
    >>> from pyro_gpx.gp import ComputationAwareGP, CGPolicy
    >>> X = torch.linspace(0, 1, 50, dtype=torch.float64)[:, None]
    >>> y = torch.sin(6 * X[:, 0])
    >>> kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    >>> gp = ComputationAwareGP(X, y, kernel, policy=CGPolicy(num_actions=20), noise=0.01)
    >>> svi = pyro.infer.SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    >>> losses = [svi.step() for _ in range(5)]
    >>> mean, var = gp(X[:3])
    >>> mean.shape, var.shape
    (torch.Size([3]), torch.Size([3]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import gpytorch
import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.gp.kernels import WhiteNoise
from pyro.contrib.gp.models.model import GPModel
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, pyro_method
from pyro.poutine.runtime import am_i_wrapped, get_plates

from .._validation import check_finite, is_finite_at_least
from ._checks import _check_dtype
from .cholesky import NonFiniteError, NumericalWarning, safe_cholesky
from .kernel_fn import KernelFn
from .kernel_ops import training_matmul
from .kernel_refit import subset_refit_kernel_noise
from .marginal import OBJECTIVES, ComputationAwareMarginal
from .mll_refit import MLLRefit, refit_outputscale_noise, subset_refit_outputscale_noise
from .noise_refit import refit_noise as refit_projection_noise
from .policies import BlockSparsePolicy, Policy, PolicyContext, UnitVectorPolicy
from .posterior import PosteriorMoments, exact_posterior_variance, posterior_moments
from .preconditioners import partial_cholesky
from .projection import ActionProjection, project_extended

__all__ = ["ComputationAwareGP"]


#: Actions of the default policy, ``BlockSparsePolicy(min(n, DEFAULT_NUM_ACTIONS))``.
DEFAULT_NUM_ACTIONS = 256


def _has_priors(module: torch.nn.Module) -> bool:
    return isinstance(module, gpytorch.Module) and any(True for _ in module.named_priors())


def _sample_gpytorch_priors(kernel: gpytorch.Module, fullname: Callable[[str], str] = str) -> gpytorch.Module:
    """A copy of ``kernel`` whose prior-carrying hyperparameters are Pyro sample sites, named
    ``fullname(prior name)`` (the model's prefix: two GPs in one Pyro model keep apart).

    Like GPyTorch's ``pyro_sample_from_prior``, but non-scalar hyperparameters (ARD lengthscales)
    are one site with event dimensions, and parameters without a prior stay the original
    (registered) tensors, so SVI keeps updating them.
    """
    # GPyTorch's "random module" copy stores sampled values as tensors, keeping their gradient
    sampled = kernel.to_pyro_random_module()
    seen = set()
    for name, module, prior, closure, setting_closure in sampled.named_priors():
        # one site per hyperparameter: a prior object shared by two hyperparameters gives two sites
        # (GPyTorch's pyro_sample_from_prior keys on the prior object and samples only the first);
        # a submodule shared under two names gives one
        key = (id(module), name.rsplit(".", 1)[-1])
        if key in seen:
            continue
        seen.add(key)
        shape = closure(module).shape
        value = pyro.sample(fullname(name), prior.expand(shape).to_event(len(shape)))
        setting_closure(module, value)  # the raw parameter becomes a tensor that depends on ``value``
    # parameters without a prior are still (copied) nn.Parameters: relink them to the originals,
    # which pyro.module registered
    originals = dict(kernel.named_parameters())
    for name, module in sampled.named_modules():
        for pname, value in list(module._parameters.items()):
            full = f"{name}.{pname}" if name else pname
            original = originals.get(full)
            if isinstance(value, torch.nn.Parameter) and original is not None and torch.equal(value, original):
                module._parameters[pname] = original
    return sampled


class ComputationAwareGP(GPModel):
    r"""GP regression with computation-aware inference (IterGP / CaGP) [1, 2].

    :param X: ``(n, d)`` training inputs.
    :param y: ``(n,)`` training targets (or ``None``).
    :param kernel: a GPyTorch kernel, a ``pyro.contrib.gp`` kernel or a callable
        ``k(X1, X2) -> Tensor``.
    :param policy: chooses the actions; default ``BlockSparsePolicy(min(n, 256))`` (CaGP-Opt),
        whose number of actions follows ``set_data``; with ``objective="exact"``,
        ``UnitVectorPolicy()`` (all points), so that the posterior is the exact GP's too.
    :param mean_function: callable ``X -> (n,)``; zero by default (``nn.Module``\ s are trained).
    :param noise: initial observation noise variance (a positive ``PyroParam``; ``None``: 1.0).
    :param objective: ``"elbo"`` (CaGP), ``"projected"`` (IterGP) or ``"exact"`` (dense reference).
    :param jitter: added to the noise for numerical stability.

    References:

    [1] J. Wenger, G. Pleiss, M. Pförtner, P. Hennig, J. Cunningham. Posterior and computational
        uncertainty in Gaussian processes. NeurIPS 2022.
    [2] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware
        Gaussian processes: model selection and linear-time inference. NeurIPS 2024.
    """

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor | None,
        kernel: Callable,
        policy: Policy | None = None,
        mean_function: Callable | None = None,
        noise: float | torch.Tensor | None = None,
        objective: str = "elbo",
        jitter: float = 1e-6,
    ):
        if not isinstance(X, torch.Tensor) or X.dim() != 2:
            raise ValueError(f"X must be a (n, d) tensor, got {type(X).__name__} of shape {getattr(X, 'shape', None)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        if not callable(kernel):  # (a string failed at the first posterior: 'str' object is not callable)
            raise TypeError(f"kernel must be a kernel (callable), got {type(kernel).__name__}")
        if mean_function is not None and not callable(mean_function):
            raise TypeError(f"mean_function must be callable or None, got {type(mean_function).__name__}")
        if isinstance(noise, bool):
            raise ValueError(f"noise must be a positive finite number, got {noise!r}")
        _check_dtype("X", X)
        if not is_finite_at_least(jitter, 0.0):
            raise ValueError(f"jitter must be a finite number >= 0, got {jitter}")
        if isinstance(kernel, torch.nn.Module) and any(isinstance(m, WhiteNoise) for m in kernel.modules()):
            # the matrix-free products evaluate K(X, X) in blocks k(X_i, X_j), where WhiteNoise gives 0
            raise ValueError("kernel contains a pyro.contrib.gp WhiteNoise term; give its variance as noise= instead")
        super().__init__(X, y, kernel, mean_function, jitter)
        noise = torch.as_tensor(1.0 if noise is None else noise, dtype=X.dtype).detach().clone()
        if noise.numel() != 1:
            raise ValueError(
                f"noise must be a scalar variance (homoscedastic Gaussian noise), got shape {tuple(noise.shape)}"
            )
        noise = noise.reshape(())
        if not torch.isfinite(noise) or noise <= 0:
            raise ValueError(f"noise must be positive and finite, got {float(noise)}")
        self.noise = PyroParam(noise, constraints.positive)
        self._default_policy = policy is None
        #: the outputscale multiplier and noise chosen by the last ``posterior(..., refit_mll=...)``
        self.last_mll_refit: MLLRefit | None = None
        if policy is None:  # the exact objective ignores the actions in training, but the posterior uses them
            exact = objective == "exact"
            policy = UnitVectorPolicy() if exact else BlockSparsePolicy(min(X.shape[0], DEFAULT_NUM_ACTIONS))
        self.policy = policy
        self.policy.validate_inputs(X)
        self.objective = objective
        self._resolution_warned = False

    def set_data(self, X: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Swap the training data (``X``: ``(n, d)``, ``y``: ``(n,)`` or ``None``).

        With the default policy the number of actions follows the data, ``min(n, 256)``; a policy
        given explicitly must be able to act on ``n`` points (else ``ValueError``).
        """
        if X.dim() != 2:
            raise ValueError(f"X must be (n, d), got shape {tuple(X.shape)}")
        _check_dtype("X", X)
        check_finite("X", X)
        if y is not None:
            if y.dim() != 1:
                raise ValueError(f"y must be (n,), got shape {tuple(y.shape)}")
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} entries")
            _check_dtype("y", y)
            check_finite("y", y)
        if "policy" in self._modules:
            if getattr(self, "_default_policy", False) and isinstance(self.policy, BlockSparsePolicy):
                self.policy.num_actions = min(X.shape[0], DEFAULT_NUM_ACTIONS)
            self.policy.validate_inputs(X)
        super().set_data(X, y)

    # -- the pieces of one model evaluation ---------------------------------------------------
    def _kernel_fn(self, sample_priors: bool = True) -> KernelFn:
        kernel = self.kernel
        if isinstance(kernel, torch.nn.Module) and not isinstance(kernel, PyroModule):
            # update_module_params: after pyro.get_param_store().load the kernel uses (and trains) the stored values
            pyro.module(self._pyro_get_fullname("kernel"), kernel, update_module_params=True)
            if sample_priors and _has_priors(kernel):
                kernel = _sample_gpytorch_priors(kernel, self._pyro_get_fullname)
        return KernelFn(kernel, probe=self.X)

    def _mean_fn(self, sample_priors: bool = True) -> Callable:
        """The mean function for one model run: a GPyTorch mean's parameters registered, and those with a
        GPyTorch prior made sample sites ``mean_function.<prior name>``, as the kernel's are."""
        mean_fn = self.mean_function
        if isinstance(mean_fn, torch.nn.Module) and not isinstance(mean_fn, PyroModule):
            pyro.module(self._pyro_get_fullname("mean_function"), mean_fn, update_module_params=True)
            if sample_priors and _has_priors(mean_fn):
                mean_fn = _sample_gpytorch_priors(
                    mean_fn, lambda name: self._pyro_get_fullname("mean_function." + name)
                )
        return mean_fn

    def _prior_mean(self, X: torch.Tensor, mean_fn: Callable | None = None) -> torch.Tensor:
        mean_fn = self._mean_fn(sample_priors=False) if mean_fn is None else mean_fn
        mean = torch.as_tensor(mean_fn(X), dtype=X.dtype)
        if not torch.isfinite(mean).all():  # a NonFiniteError: HMC/NUTS rejects such a proposal
            raise NonFiniteError("the mean function's values contain NaN or inf (are its parameters finite?)")
        return mean.expand(X.shape[:1]) if mean.dim() == 0 else mean

    @pyro_method
    def marginal(self, sample_priors: bool = True) -> ComputationAwareMarginal:
        """The marginal-likelihood distribution for the current hyperparameters.

        With targets set, the actions are chosen here, inside the model run, so that learned
        actions are Pyro parameters of this run (Pyro scores sites after the model returns).

        :param sample_priors: make hyperparameters with a GPyTorch prior sample sites (else the
            kernel's stored values are used).
        """
        batched = [f"{f.name}({f.size})" for f in get_plates() if f.vectorized and f.size > 1]
        if batched:  # the marginal has no batch shape: a plate's draws would be read as ARD values
            raise NotImplementedError(
                f"ComputationAwareGP runs one draw of its hyperparameters at a time, but it runs inside the "
                f"plates {batched} (vectorised ELBO particles, Predictive(parallel=True), or a plate of the "
                "model's): use vectorize_particles=False or Predictive(..., parallel=False)"
            )
        kernel = self._kernel_fn(sample_priors)
        noise = self.noise + self.jitter
        if self.X.dtype != torch.float64 and not self._resolution_warned:
            self._warn_below_resolution(kernel, float(noise.detach()))
        mean_fn = self._mean_fn(sample_priors)
        prior_mean = self._prior_mean(self.X, mean_fn)
        actions = None
        if self.y is not None and self.objective != "exact":
            actions = self.policy.actions(PolicyContext(self.X, self.y - prior_mean, kernel, noise))
        marginal = ComputationAwareMarginal(
            self.X, kernel, noise, prior_mean, self.policy, self.objective, actions=actions
        )
        marginal.mean_function = mean_fn  # the same draw of a mean with priors, for predictions at new inputs
        return marginal

    def _warn_below_resolution(self, kernel: KernelFn, noise: float) -> None:
        r"""Warn once if the noise is below what the inputs' dtype resolves in :math:`K + \sigma^2 I`: its
        entries carry rounding of about :math:`\epsilon k_{\max}`, so :math:`\|E\|` can reach
        :math:`n\epsilon k_{\max}` (float32, n = 30, noise 1e-6: converged CG gave a mean 744 off the
        float64 exact GP's, silently)."""
        with torch.no_grad():
            kmax = float(kernel.diag(self.X).max())
        floor = self.X.shape[0] * torch.finfo(self.X.dtype).eps * kmax
        if noise < floor:
            self._resolution_warned = True
            warnings.warn(
                f"the noise variance {noise:.3g} is below what {self.X.dtype} resolves in K + noise I "
                f"(n eps max k = {floor:.3g}): the posterior and the ELBO may be far off; use float64 inputs",
                NumericalWarning,
                stacklevel=3,
            )

    @pyro_method
    def model(self):
        self.set_mode("model")
        marginal = self.marginal()
        if self.y is None:
            return marginal.prior_mean, marginal
        return pyro.sample(self._pyro_get_fullname("y"), marginal, obs=self.y)

    @pyro_method
    def guide(self):
        self.set_mode("guide")
        self._load_pyro_samples()

    # -- prediction ----------------------------------------------------------------------------
    @pyro_method
    def posterior(
        self,
        Xnew: torch.Tensor,
        full_cov: bool = False,
        split: bool = False,
        refine: Policy | None = None,
        refit_noise: bool = False,
        refit_mll: str | MLLRefit | None = None,
    ) -> PosteriorMoments:
        r"""Posterior of the latent function at ``Xnew`` (noiseless), optionally with the split of
        the uncertainty into its mathematical and computational parts (dense exact solve).

        :param refine: a policy whose actions are appended to the trained ones for this prediction,
            e.g. ``CGPolicy(20, tol=0.01, preconditioner="rpcholesky")`` after training CaGP-Opt.
            The posterior stays computation-aware: it conditions on :math:`[S, S_{\text{refine}}]^\top
            y`, a larger projection of the data, so its mean moves towards the exact GP's and its
            variance shrinks towards the mathematical one, never below it [1]. With CG run to
            convergence the mean is the exact GP's (at these hyperparameters), which the learned
            actions, fitted by the ELBO, need not reach. The policy runs in the model's dtype; the
            projection and the moments are float64 sums (with float32 sums and a small noise, late
            CG directions fall below float32's resolution of :math:`K` and the projected Gram
            matrix would turn indefinite). A float32 model keeps float32 kernel entries where their
            rounding is far below the noise (and autograd is off), else they are float64; that keeps
            the projected Gram matrix positive definite, not the solve exact (n = 300, noise 0.01,
            37 actions: the mean 7.5e-3 off the float64 projection), so refine a float64 model where
            that matters. New
            actions that add nothing to the span of the others are dropped
            (:func:`~pyro_gpx.gp.projection.project_extended`). It costs one product with
            :math:`K(X, X)` per CG iteration and one for all actions, each from the upper triangle
            of kernel tiles for stationary kernels; the hyperparameters are unchanged.
        :param refit_noise: condition on the data with the noise variance that maximises the CaGP ELBO
            of the actions used here (the trained ones and ``refine``'s), the kernel fixed
            (:func:`~pyro_gpx.gp.noise_refit.refit_noise`: no kernel product, a 1-d search). Training
            counted what the learned actions could not represent as noise; the refined projection
            explains more of the data, and the ELBO then selects a smaller noise. The result's
            ``noise`` is the variance used (the model's ``noise`` parameter is not changed).
        :param refit_mll: condition on the data with the outputscale multiplier and noise variance
            that maximise the *exact* log marginal likelihood at the trained lengthscales
            (:mod:`~pyro_gpx.gp.mll_refit`): ``"subset"`` (dense likelihoods of random subsets of
            2000 points, about a second) or ``"stochastic"`` (matrix-free over all the data: block
            preconditioned CG and Hutchinson's trace estimator, a few hundred kernel products on a
            hard problem), or ``"subset-kernel"``: the lengthscales too, by L-BFGS on the subsets'
            likelihood (:mod:`~pyro_gpx.gp.kernel_refit`; stationary kernels; tens of seconds).
            The ELBO's gap to the likelihood grows with the outputscale, so training
            selects a small one and a large noise; with ``refine`` run to convergence the posterior
            is the exact GP's, for which the likelihood's choice predicts better. An
            :class:`~pyro_gpx.gp.mll_refit.MLLRefit` (from :meth:`refit_mll`) is used as given. The refinement and
            the moments then use the re-selected kernel and noise; the choice is kept as
            ``last_mll_refit`` (the model's parameters are not changed). Excludes ``refit_noise``.
        """
        if self.y is None:
            raise ValueError("the model has no targets y; call set_data(X, y) first")
        if not torch.is_tensor(Xnew) or Xnew.dim() != self.X.dim() or Xnew.shape[1:] != self.X.shape[1:]:
            shape = tuple(Xnew.shape) if torch.is_tensor(Xnew) else type(Xnew).__name__
            raise ValueError(f"Xnew must be a tensor of shape (m, {self.X.shape[1]}) like X, got {shape}")
        check_finite("Xnew", Xnew)
        Xnew = Xnew.to(self.X.dtype)  # forward() returns the moments in the caller's dtype
        marginal = self.marginal(sample_priors=am_i_wrapped())
        mean_fn = marginal.mean_function
        if refit_mll is not None:
            if refit_noise:
                raise ValueError("refit_noise and refit_mll are exclusive: refit_mll re-selects the noise too")
            marginal = self._mll_refitted(marginal, refit_mll)
        X, prior_mean_new = self.X, self._prior_mean(Xnew, mean_fn)
        if refine is None:
            projection = marginal.project(self.y)
        else:  # float64 sums: late CG directions live where K is small, below float32's resolution
            X = self._refinement_inputs(marginal)
            projection = self._refined_projection(marginal, refine, X)
            Xnew, prior_mean_new = Xnew.to(X.dtype), prior_mean_new.double()
        if refit_noise:
            projection = self._refit_noise(projection, marginal.kernel)
        mean, cov = posterior_moments(projection, marginal.kernel, X, Xnew, prior_mean_new, full_cov)
        result = PosteriorMoments(mean=mean, covariance=cov, noise=projection.noise)
        if split:
            if refine is not None:
                X, Xnew = X.double(), Xnew.double()
            math_part = exact_posterior_variance(marginal.kernel, X, Xnew, projection.noise, full_cov)
            result.mathematical = math_part
            result.computational = cov - math_part
        return result

    @pyro_method
    def refined_projection(self, refine: Policy, refit_noise: bool = False) -> ActionProjection:
        """The projection (float64 sums) of the data onto the trained actions followed by ``refine``'s
        (those that widen the span), as :meth:`posterior` uses it: ``.actions`` are the actions kept,
        ``.elbo(diag_K)`` scores them; with ``refit_noise``, at the noise :meth:`posterior` would use."""
        marginal = self.marginal(sample_priors=am_i_wrapped())
        projection = self._refined_projection(marginal, refine, self._refinement_inputs(marginal))
        return self._refit_noise(projection, marginal.kernel) if refit_noise else projection

    @pyro_method
    def refit_mll(self, method: str = "subset", **options) -> MLLRefit:
        """The outputscale multiplier and noise variance that maximise the exact log marginal likelihood
        at the current lengthscales, or with ``method="subset-kernel"`` the lengthscales too (see
        :meth:`posterior`'s ``refit_mll``); pass the result to :meth:`posterior` to reuse it. The
        model's parameters are not changed.

        :param options: keyword arguments for the search:
            :func:`~pyro_gpx.gp.mll_refit.subset_refit_outputscale_noise` (``"subset"``),
            :func:`~pyro_gpx.gp.kernel_refit.subset_refit_kernel_noise` (``"subset-kernel"``, e.g.
            ``num_points``, ``max_seconds``) or :func:`~pyro_gpx.gp.mll_refit.refit_outputscale_noise`
            (``"stochastic"``).
        """
        if self.y is None:
            raise ValueError("the model has no targets y; call set_data(X, y) first")
        return self._refit_mll(self.marginal(sample_priors=am_i_wrapped()), method, **options)

    def _refit_mll(self, marginal: ComputationAwareMarginal, method: str, **options) -> MLLRefit:
        residual = (self.y - marginal.prior_mean).detach()
        noise, jitter = float(marginal.noise.detach()), float(self.jitter)
        generator = torch.Generator().manual_seed(0)
        if method == "subset-kernel":
            return subset_refit_kernel_noise(marginal.kernel, self.X, residual, noise, min_noise=jitter,
                                             generator=generator, **options)  # fmt: skip
        with torch.no_grad():
            if method == "subset":
                return subset_refit_outputscale_noise(marginal.kernel, self.X, residual, noise, min_noise=jitter,
                                                      generator=generator, **options)  # fmt: skip
            if method == "stochastic":
                return self._stochastic_mll_refit(marginal, residual, noise, generator, **options)
        raise ValueError(
            f"refit_mll must be 'subset', 'subset-kernel', 'stochastic', an MLLRefit or None, got {method!r}"
        )

    def _mll_refitted(self, marginal: ComputationAwareMarginal, refit: str | MLLRefit) -> ComputationAwareMarginal:
        """``marginal`` with the kernel scaled and the noise replaced by the likelihood's choice (the
        policy chooses its actions again for them: CG's directions depend on the kernel)."""
        fit = refit if isinstance(refit, MLLRefit) else self._refit_mll(marginal, refit)
        self.last_mll_refit = fit
        kernel = (marginal.kernel if fit.kernel is None else fit.kernel).scaled(fit.multiplier)
        noise = torch.as_tensor(fit.noise, dtype=torch.as_tensor(marginal.noise).dtype)
        actions = marginal.actions
        if actions is not None:
            actions = self.policy.actions(PolicyContext(self.X, self.y - marginal.prior_mean, kernel, noise))
        return ComputationAwareMarginal(self.X, kernel, noise, marginal.prior_mean, self.policy, marginal.objective,
                                        actions=actions)  # fmt: skip

    def _stochastic_mll_refit(self, marginal, residual, noise, generator, **options) -> MLLRefit:
        kernel, X = marginal.kernel, self.X
        rank = min(1000, X.shape[0])
        L, _ = partial_cholesky(kernel, X, rank, pivoting="rpcholesky", generator=generator, block_size=50)
        return refit_outputscale_noise(lambda V: training_matmul(kernel, X, V), residual, L, noise,
                                       min_noise=float(self.jitter), generator=generator, **options)  # fmt: skip

    def _refit_noise(self, projection: ActionProjection, kernel: KernelFn) -> ActionProjection:
        with torch.no_grad():
            diag_K = kernel.diag(self.X).double()
        return refit_projection_noise(projection, diag_K, min_noise=float(self.jitter))

    def _refined_projection(
        self, marginal: ComputationAwareMarginal, refine: Policy, X: torch.Tensor
    ) -> ActionProjection:
        """The projection onto the trained and ``refine``'s actions; ``X``: the training inputs in
        the dtype of the kernel entries (:meth:`_refinement_inputs`)."""
        if not isinstance(refine, Policy):
            raise TypeError(f"refine must be a Policy, got {type(refine).__name__}")
        refine.validate_inputs(self.X)
        residual = self.y - marginal.prior_mean
        context = PolicyContext(self.X, residual, marginal.kernel, marginal.noise)
        base = marginal.actions if marginal.actions is not None else self.policy.actions(context)
        base, extra = base.to(torch.float64), refine.actions(context).to(torch.float64)
        return project_extended(base, extra, marginal.kernel, X, residual.double(), marginal.noise)

    def _refinement_inputs(self, marginal: ComputationAwareMarginal) -> torch.Tensor:
        r"""The training inputs in the dtype the refined projection forms kernel entries in.

        The sums are float64 either way (the actions are). A float32 model keeps float32 entries
        (a third of the float64 cost) when autograd is off and their rounding cannot matter: each
        entry is off by at most about :math:`8\epsilon_{32} \max_i k(x_i, x_i)` (rounding and the
        cancellation in :math:`\|z\|^2 + \|z'\|^2 - 2 z^\top z'`, which the products keep to about
        :math:`\epsilon\|z\|^2` by centring the scaled inputs :math:`z`; the rule assumes
        :math:`\|z\|^2` of order ten or less, as for standardised inputs and lengthscales near 1), so the projected
        :math:`S^\top(K + E + \sigma^2 I)S` keeps :math:`\sigma^2 S^\top S` as its floor while
        :math:`\|E\| \le n \max|E_{ij}|` stays below :math:`\sigma^2 / 10`. Otherwise float64.
        """
        X = self.X
        if X.dtype == torch.float64 or torch.is_grad_enabled():
            return X.double()
        with torch.no_grad():
            kmax = float(marginal.kernel.diag(X).max())
        entry_error = 8 * torch.finfo(X.dtype).eps * kmax
        return X if X.shape[0] * entry_error < 0.1 * float(marginal.noise) else X.double()

    def forward(
        self,
        Xnew: torch.Tensor,
        full_cov: bool = False,
        noiseless: bool = True,
        refine: Policy | None = None,
        refit_noise: bool = False,
        refit_mll: str | MLLRefit | None = None,
    ):
        r"""Posterior mean and covariance (or variance) at ``Xnew``, as ``GPRegression.forward``.

        Latent ``pyro.contrib.gp`` hyperparameters take their guide values (``set_mode("guide")``).
        Hyperparameters with a GPyTorch prior are not sampled outside a Pyro handler: the kernel's
        stored values are used, so repeated calls agree. To predict with a posterior draw (or a
        guide's median) of latent sites, call this inside ``pyro.poutine.condition(data=draw)``.
        ``refine`` appends a policy's actions for this prediction and ``refit_noise`` re-selects the
        noise variance (added when ``noiseless=False``) by their ELBO, ``refit_mll`` the outputscale
        and the noise by the exact likelihood (see :meth:`posterior`).
        """
        self.set_mode("guide")
        moments = self.posterior(Xnew, full_cov=full_cov, refine=refine, refit_noise=refit_noise, refit_mll=refit_mll)
        mean, cov = moments.mean, moments.covariance
        if not noiseless:
            assert moments.noise is not None  # posterior() records the noise it conditioned on
            noise = moments.noise.double()
            cov = cov + noise * torch.eye(cov.shape[0], dtype=cov.dtype) if full_cov else cov + noise
        dtype = Xnew.dtype if Xnew.is_floating_point() else self.X.dtype  # integer inputs: the model's dtype
        return mean.to(dtype), cov.to(dtype)

    def predictive_distribution(
        self,
        Xnew: torch.Tensor,
        full_cov: bool = False,
        noiseless: bool = False,
        refine: Policy | None = None,
        refit_noise: bool = False,
        refit_mll: str | MLLRefit | None = None,
    ) -> dist.Normal | dist.MultivariateNormal:
        """The posterior predictive at ``Xnew`` as a distribution (moments from :meth:`forward`).

        :param full_cov: a ``MultivariateNormal`` over all of ``Xnew`` (else independent
            ``Normal``\\ s, batch shape ``(m,)``).
        :param noiseless: of the latent function :math:`f` (else of new observations :math:`y`, the
            noise variance added; the default).
        :param refine: as in :meth:`posterior`.
        :param refit_noise: as in :meth:`posterior`.
        :param refit_mll: as in :meth:`posterior`.
        """
        mean, cov = self.forward(Xnew, full_cov=full_cov, noiseless=noiseless, refine=refine, refit_noise=refit_noise,
                                 refit_mll=refit_mll)  # fmt: skip
        if full_cov:
            scale_tril = safe_cholesky(cov.double(), "the predictive covariance").to(mean.dtype)
            return dist.MultivariateNormal(mean, scale_tril=scale_tril)
        # a variance rounded to 0 (float32, tiny noise, at a training input) is not a valid scale
        return dist.Normal(mean, cov.clamp_min(torch.finfo(cov.dtype).tiny).sqrt())
