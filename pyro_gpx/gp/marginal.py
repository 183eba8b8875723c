r"""The GP regression marginal :math:`p(y \mid \theta)` scored by a computation-aware objective.

:class:`ComputationAwareMarginal` is a Pyro distribution over the whole target vector
(``event_shape = (n,)``), so a GP is an ordinary observed site,
``pyro.sample("y", ComputationAwareMarginal(...), obs=y)``, that SVI and NUTS consume directly.
Its ``log_prob`` is one of

* ``"elbo"``: the CaGP evidence lower bound (default; a lower bound on :math:`\log p(y\mid\theta)`,
  tight for complete actions) [2];
* ``"projected"``: the IterGP projected-data log-likelihood [1];
* ``"exact"``: :math:`\log N(y; \mu, K + \sigma^2 I)` by dense Cholesky (small ``n``, reference).

References:

[1] J. Wenger, G. Pleiss, M. Pförtner, P. Hennig, J. Cunningham. Posterior and computational
    uncertainty in Gaussian processes. NeurIPS 2022.
[2] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints

from .._validation import check_finite
from ._checks import _check_dtype, check_inputs, check_noise
from .actions import Actions
from .cholesky import NonFiniteError, safe_cholesky
from .kernel_fn import KernelFn
from .policies import Policy, PolicyContext
from .posterior import MAX_DENSE
from .projection import ActionProjection, project

__all__ = ["OBJECTIVES", "ComputationAwareMarginal", "exact_log_marginal_likelihood"]

OBJECTIVES = ("elbo", "projected", "exact")


class _GaussianLogDensity(torch.autograd.Function):
    r""":math:`\log N(r; 0, C)` for a dense covariance ``C``, with the gradient in closed form,

    .. math:: \frac{\partial}{\partial C} = \tfrac12 (\alpha\alpha^\top - C^{-1}), \qquad
        \frac{\partial}{\partial r} = -\alpha, \qquad \alpha = C^{-1} r,

    :math:`C^{-1}` from the Cholesky factor (LAPACK ``potri``). Autograd through
    ``torch.linalg.cholesky`` computes the same gradient 3-4x slower (n = 5000, float64, 2 cores:
    7.1 s against 2.0 s).
    """

    @staticmethod
    def forward(ctx, C: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        L = safe_cholesky(C, "K + noise I")
        alpha = torch.cholesky_solve(r[:, None], L)[:, 0]
        ctx.save_for_backward(L, alpha)
        return -0.5 * (r @ alpha) - L.diagonal().log().sum() - 0.5 * r.shape[0] * math.log(2 * math.pi)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        L, alpha = ctx.saved_tensors
        grad_C = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_C = torch.cholesky_inverse(L)
            grad_C.sub_(torch.outer(alpha, alpha)).mul_(-0.5 * grad)
        if ctx.needs_input_grad[1]:
            grad_r = -grad * alpha
        return grad_C, grad_r


def exact_log_marginal_likelihood(
    kernel: KernelFn, X: torch.Tensor, residual: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log N(r; 0, K + \sigma^2 I)` by dense Cholesky, in float64; the gradient with
    respect to :math:`K + \sigma^2 I` is formed in closed form from its inverse (first derivatives
    only)."""
    check_inputs("X", X)
    check_inputs("residual", residual)
    check_noise("noise", noise)
    n = X.shape[0]
    if residual.shape != (n,):
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected ({n},) for X's {n} rows")
    K = kernel(X, X).double()
    K = K + torch.as_tensor(noise).double() * torch.eye(n, dtype=torch.float64)
    return _GaussianLogDensity.apply(K, residual.double())


class ComputationAwareMarginal(TorchDistribution):
    r"""Marginal likelihood of GP regression, :math:`y \sim N(\mu(X), K + \sigma^2 I)`, whose
    ``log_prob`` is a computation-aware objective.

    :param X: ``(n, d)`` training inputs.
    :param kernel: the kernel as a :class:`~pyro_gpx.gp.kernel_fn.KernelFn`.
    :param noise: observation noise variance :math:`\sigma^2 > 0`.
    :param prior_mean: :math:`\mu(X)`, shape ``(n,)``.
    :param policy: chooses the actions (ignored by ``"exact"``).
    :param objective: ``"elbo"``, ``"projected"`` or ``"exact"``.
    :param actions: actions chosen in advance (otherwise the policy chooses them from the value
        being scored, through its module call, so that SVI trains a learned policy's parameters along
        with the model's; in a model without other Pyro parameters Pyro's ELBOs skip the backward pass,
        so choose them in the model: ``actions=policy(PolicyContext(X, y - prior_mean, kernel, noise))``).
    """

    #: draws integrate the latents over their prior: not posterior predictive draws (see to_inference_data)
    integrates_out_latents = True

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        X: torch.Tensor,
        kernel: KernelFn,
        noise: torch.Tensor,
        prior_mean: torch.Tensor,
        policy: Policy,
        objective: str = "elbo",
        actions: Actions | None = None,
        validate_args=None,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        _check_dtype("X", X)
        noise = torch.as_tensor(noise)
        if prior_mean.shape != X.shape[:1]:
            raise ValueError(f"prior_mean has shape {tuple(prior_mean.shape)}; expected ({X.shape[0]},)")
        if not torch.isfinite(prior_mean).all():  # a NonFiniteError: HMC/NUTS rejects such a proposal
            raise NonFiniteError("prior_mean (the mean function at X) contains NaN or inf")
        self.X, self.kernel, self.noise, self.prior_mean = X, kernel, noise, prior_mean
        self.policy, self.objective, self.actions = policy, objective, actions
        self.last_projection: ActionProjection | None = None
        #: the mean function whose values at ``X`` are ``prior_mean`` (set by the GP model: the same draw of
        #: a mean with priors at new inputs); ``None`` where only the values were given
        self.mean_function: Callable | None = None
        super().__init__(torch.Size(), torch.Size([X.shape[0]]), validate_args=validate_args)

    def project(self, y: torch.Tensor) -> ActionProjection:
        """The action projection of the data ``y`` (kept as ``last_projection``)."""
        residual = y - self.prior_mean
        actions = self.actions
        if actions is None:
            # through the module's call, so that a learned policy's parameters are Pyro parameters of this
            # evaluation (SVI.step captures those of the whole loss, the scoring after the model run included)
            context = PolicyContext(self.X, residual, self.kernel, self.noise)
            # a Policy module is called (not .actions) for its Pyro context; a plain object needs only .actions
            actions = self.policy(context) if isinstance(self.policy, torch.nn.Module) else self.policy.actions(context)
        self.last_projection = project(actions, self.kernel, self.X, residual, self.noise)
        return self.last_projection

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The objective at ``value``; :math:`-\\infty` for a non-finite or non-positive noise.

        :raises CholeskyError: if a Gram matrix stays indefinite after jitter escalation (the
            message names the jitters tried).
        :raises NonFiniteError: if the kernel products are NaN or inf.

        Both are ``RuntimeError``\\ s whose message contains "input is not positive-definite":
        under SVI they reach the user, while Pyro's HMC/NUTS treats them as a rejected proposal.
        """
        if value.shape != self.event_shape:
            raise ValueError(f"y has shape {tuple(value.shape)}; expected {tuple(self.event_shape)}")
        check_finite("y", value)
        if not torch.isfinite(self.noise).all() or (self.noise <= 0).any():
            return torch.tensor(float("-inf"), dtype=torch.float64)
        return self._objective(value)

    def _objective(self, value: torch.Tensor) -> torch.Tensor:
        if self.objective == "exact":
            if self.X.shape[0] > MAX_DENSE:
                raise ValueError(f"objective='exact' forms the dense kernel matrix; n={self.X.shape[0]} > {MAX_DENSE}")
            return exact_log_marginal_likelihood(self.kernel, self.X, value - self.prior_mean, self.noise)
        projection = self.project(value)
        if self.objective == "projected":
            return projection.projected_log_likelihood()
        return projection.elbo(self.kernel.diag(self.X))

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draws from :math:`N(\\mu(X), K + \\sigma^2 I)` (dense; for moderate ``n`` only)."""
        n = self.X.shape[0]
        if n > MAX_DENSE:
            raise NotImplementedError(f"sampling the marginal forms the dense kernel matrix; n={n} > {MAX_DENSE}")
        K = self.kernel(self.X, self.X).double() + self.noise.double() * torch.eye(n, dtype=torch.float64)
        L = safe_cholesky(K, "K + noise I")
        eps = torch.randn(tuple(sample_shape) + (n,), dtype=torch.float64)
        return (self.prior_mean.double() + eps @ L.T).to(self.prior_mean.dtype)
