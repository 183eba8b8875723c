r"""The readout's marginal likelihood with the noise variance integrated out as well, by quadrature.

:class:`~pyro_gpx.bnn.marginal.GaussianLinearMarginal` integrates the readout out; the noise variance
:math:`\lambda` stays a latent coordinate of the sampler. It is one scalar, and given the hidden
weights its density is cheap to evaluate at many values at once, so it can be integrated out too:

.. math::

    p(Y \mid W) = \int_0^\infty p(\lambda) \prod_{j=1}^{d} N\big(Y_{:,j};\ 0,\ K + \lambda I\big)\, d\lambda,
    \qquad K = \tilde\Phi_W\tilde\Phi_W^\top .

With :math:`K = U \operatorname{diag}(e) U^\top` and :math:`C = U^\top Y`, the log-density at one
:math:`\lambda` is :math:`-\tfrac12\big(\sum_{ij} C_{ij}^2/(e_i + \lambda) + d\sum_i \log(e_i + \lambda)
+ nd\log 2\pi\big)`: :math:`O(nd)` per node after one eigendecomposition. The integral is the
trapezoid rule on a uniform grid in :math:`u = \log\lambda` (:math:`p(\lambda)\,d\lambda =
p(e^u)e^u\,du`), whose error for a smooth integrand that decays at both ends falls like
:math:`\exp(-2\pi^2\sigma^2/h^2)` for a spacing :math:`h` and a posterior standard deviation
:math:`\sigma` of :math:`u` [1]. With :math:`nd` observations :math:`\sigma \gtrsim \sqrt{2/(nd)}`, so the
default :math:`h = \tfrac14\sqrt{2/(nd)}` leaves an error far below double precision.

The gradient is taken in closed form from the resolvents, not through the eigenvectors (whose
derivatives blow up at repeated eigenvalues, e.g. the :math:`n - D` zero eigenvalues when
:math:`n > D`): with :math:`\pi_k` the posterior weights of the nodes and :math:`A_k = C/(e + \lambda_k)`,

.. math::

    \frac{\partial \log p}{\partial K} = U\Big(\tfrac12\sum_k \pi_k A_k A_k^\top
    - \tfrac d2 \operatorname{diag}\big(\textstyle\sum_k \pi_k/(e + \lambda_k)\big)\Big)U^\top .

A sampler over the hidden weights alone then needs no noise coordinate, and the noise of each kept
draw is drawn afterwards from :math:`p(\lambda \mid W, Y)` (:meth:`NoiseGrid.sample`), so its draws
carry no autocorrelation of their own. What it buys depends on the target: with 500 warm-up steps
split HMC took 13 instead of 14 gradients per draw on yacht (:math:`n = 100`, one hidden layer of
256), but 42 instead of 36 with two hidden layers, where the latent noise had looked like part of
the stiffest directions (in a 250-step warm-up its adapted step grew from 0.045 to 0.062).

References:

[1] L. N. Trefethen, J. A. C. Weideman. The exponentially convergent trapezoidal rule. SIAM Review
    56(3), 2014.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .._linalg import gram
from .._validation import is_finite_at_least
from .marginal import readout_event_shape, target_columns

__all__ = ["NoiseGrid", "NoiseIntegratedMarginal"]

_TAIL = 1e-9  # prior mass left out at each end of the grid


def _log_quantiles(prior: dist.TorchDistribution, dtype: torch.dtype) -> tuple[float, float]:
    """:math:`\\log` of the prior's ``_TAIL`` and ``1 - _TAIL`` quantiles (by ``icdf`` where the
    distribution has one, else from 400 000 seeded draws, widened by two interquartile ranges)."""
    probs = torch.tensor([_TAIL, 1 - _TAIL], dtype=dtype)
    try:
        lo, hi = prior.icdf(probs).log().tolist()
        if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            return lo, hi
    except NotImplementedError:
        pass
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u = prior.sample((400_000,)).to(dtype).log()
    q = torch.quantile(u, torch.tensor([1e-5, 0.25, 0.75, 1 - 1e-5], dtype=dtype)).tolist()
    spread = q[2] - q[1]
    return q[0] - 2 * spread, q[3] + 2 * spread


@dataclass(frozen=True)
class NoiseGrid:
    """Trapezoid nodes in :math:`u = \\log\\lambda` and their log weights
    :math:`\\log(h\\,p(e^u)\\,e^u)` (prior density times the Jacobian times the spacing).

    Build with :meth:`from_prior`; :meth:`log_posterior` and :meth:`sample` give the noise's
    conditional :math:`p(\\lambda \\mid W, Y)` on the grid.
    """

    nodes: torch.Tensor
    log_weights: torch.Tensor
    spacing: float

    def __post_init__(self):
        if not is_finite_at_least(self.spacing, 0.0, strict=True):
            raise ValueError(f"spacing must be a finite positive number, got {self.spacing!r}")

    @classmethod
    def from_prior(cls, prior: dist.TorchDistribution, num_obs: int, spacing: float | None = None,
                   dtype: torch.dtype = torch.float64) -> NoiseGrid:  # fmt: skip
        """Nodes covering the prior's support in :math:`\\log\\lambda` up to a mass of
        :math:`10^{-9}` at each end.

        :param prior: the noise variance's prior (support :math:`(0, \\infty)`).
        :param num_obs: :math:`nd`, the number of scalar targets, which sets the default spacing
            :math:`\\tfrac14\\sqrt{2/(nd)}`.
        :param spacing: the spacing :math:`h` in :math:`\\log\\lambda`.
        """
        if int(num_obs) < 1:
            raise ValueError(f"num_obs must be a positive integer, got {num_obs}")
        if spacing is not None and not float(spacing) > 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        lo, hi = _log_quantiles(prior, dtype)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"the noise prior must be a distribution on (0, inf) with a density, got {prior}")
        # the data set the posterior's width, but a prior narrower than that needs its own nodes: at least 64
        # across its range (a prior sd of 0.01 in log noise got 4 nodes: log p(y | W) 0.07 off, draws' sd 0.77x)
        h = min(0.25 * math.sqrt(2.0 / num_obs), (hi - lo) / 64) if spacing is None else float(spacing)
        count = int(math.ceil((hi - lo) / h)) + 1
        if count > 200_000:
            raise ValueError(f"the grid would need {count} nodes; pass a larger spacing")
        nodes = lo + h * torch.arange(count, dtype=dtype)
        log_weights = math.log(h) + prior.log_prob(nodes.exp()).to(dtype) + nodes
        if not torch.isfinite(log_weights).any():
            raise ValueError("the noise prior has no density on (0, inf)")
        return cls(nodes, log_weights, h)

    def node_log_likelihoods(self, features: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\prod_j N(Y_{:,j}; 0, K + \\lambda_k I)` at every node, ``(num_nodes,)``."""
        return _node_terms(gram(features.T), Y, self.nodes.exp())[0]

    def log_posterior(self, features: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Normalised log probabilities of the nodes under :math:`p(\\lambda \\mid W, Y)`."""
        a = self.node_log_likelihoods(features, Y) + self.log_weights
        return a - torch.logsumexp(a, 0)

    def sample(self, features: torch.Tensor, Y: torch.Tensor, generator: torch.Generator | None = None,
               refine: int = 16, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:  # fmt: skip
        """Draws of :math:`\\lambda \\sim p(\\lambda \\mid W, Y)`, of shape ``sample_shape``: a node of a
        ``refine`` times finer grid by its probability, then uniform within its cell (the cell's width is
        :math:`h/\\text{refine}`, so the draws' variance in :math:`\\log\\lambda` is off by at most
        :math:`(h/\\text{refine})^2/12`, about :math:`10^{-4}` of the posterior's at the default spacing)."""
        fine = self.nodes[0] + (self.spacing / refine) * torch.arange(
            (len(self.nodes) - 1) * refine + 1, dtype=self.nodes.dtype
        )
        log_prior = torch.nn.functional.interpolate(
            self.log_weights[None, None], size=len(fine), mode="linear", align_corners=True
        )[0, 0]  # the prior part is smooth; the likelihood part is evaluated exactly at each fine node
        a = _node_terms(gram(features.T), Y, fine.exp())[0] + log_prior
        count = math.prod(sample_shape)
        k = torch.multinomial(torch.softmax(a, 0), count, replacement=True, generator=generator)
        jitter = torch.rand(count, generator=generator, dtype=fine.dtype) - 0.5
        return (fine[k] + (self.spacing / refine) * jitter).exp().reshape(sample_shape)


def _node_terms(K: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor):
    """Per-node log-likelihoods and the spectral pieces the gradient reuses."""
    n, d = Y.shape
    e, U = torch.linalg.eigh(K)
    e = e.clamp_min(0.0)  # K is PSD; rounding can leave eigenvalues of -1e-16
    C = U.T @ Y
    shifted = e[:, None] + lam[None, :]  # (n, nodes)
    inv = shifted.reciprocal()
    quad = (C.square().sum(-1)[:, None] * inv).sum(0)
    logdet = d * shifted.log().sum(0)
    ell = -0.5 * (quad + logdet + n * d * math.log(2 * math.pi))
    return ell, U, C, inv


class _IntegratedLogLikelihood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K, Y, lam, log_weights):
        ell, U, C, inv = _node_terms(K, Y, lam)
        a = ell + log_weights
        out = torch.logsumexp(a, 0)
        pi = torch.softmax(a, 0)
        if pi[0] > 1e-8 or pi[-1] > 1e-8:
            warnings.warn(
                "the noise posterior has mass at the edge of its quadrature grid (the data put the noise "
                "variance in the prior's 1e-9 tail, or at the end of a bounded prior's support, where the "
                "integrand jumps and the trapezoid rule is only accurate to about 1e-3); the integral is "
                "truncated there",
                RuntimeWarning,
                stacklevel=2,
            )
        ctx.save_for_backward(U, C, inv, pi)
        return out

    @staticmethod
    def backward(ctx, grad):
        U, C, inv, pi = ctx.saved_tensors
        d = C.shape[1]
        weighted = inv @ pi  # sum_k pi_k / (e + lambda_k), (n,)
        grad_K = grad_Y = None
        if ctx.needs_input_grad[0]:
            A = C[:, None, :] * (inv * pi.sqrt())[:, :, None]  # sqrt(pi_k) C / (e + lambda_k), (n, nodes, d)
            A = A.reshape(C.shape[0], -1)
            M = 0.5 * (A @ A.T) - torch.diag(0.5 * d * weighted)
            grad_K = grad * (U @ M @ U.T)
        if ctx.needs_input_grad[1]:
            grad_Y = -grad * (U @ (C * weighted[:, None]))
        return grad_K, grad_Y, None, None


class NoiseIntegratedMarginal(dist.TorchDistribution):
    r"""Targets of a Bayesian linear readout with the readout weights and the noise variance
    integrated out (see the module docstring).

    :param features: :math:`\tilde\Phi`, ``(n, D)``, already scaled by the readout's prior standard deviations.
    :param grid: the :class:`NoiseGrid` of the noise prior (built for :math:`nd` targets).
    :param out_dim: ``None`` for targets of shape ``(n,)``, else the number of target columns.

    Example::

        >>> import math
        >>> prior = dist.LogNormal(math.log(0.5), 1.0)
        >>> Phi = torch.randn(6, 3, dtype=torch.float64)
        >>> y = torch.randn(6, dtype=torch.float64)
        >>> d = NoiseIntegratedMarginal(Phi, NoiseGrid.from_prior(prior, 6))
        >>> lam = torch.logspace(-6, 4, 40001, dtype=torch.float64)  # a brute-force integral over lambda
        >>> cov = Phi @ Phi.T + lam[:, None, None] * torch.eye(6)
        >>> joint = dist.MultivariateNormal(torch.zeros(6, dtype=torch.float64), cov).log_prob(y) + prior.log_prob(lam)
        >>> brute = torch.logsumexp(joint + lam.log() + math.log(lam[1].log() - lam[0].log()), 0)
        >>> bool(torch.isclose(d.log_prob(y), brute, atol=1e-6))
        True
    """

    #: draws integrate the latents over their prior: not posterior predictive draws (see to_inference_data)
    integrates_out_latents = True

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, features: torch.Tensor, grid: NoiseGrid, out_dim: int | None = None, validate_args=None):
        event_shape = readout_event_shape(features, out_dim)
        num_obs = event_shape.numel()
        if grid.spacing > math.sqrt(2.0 / num_obs):  # 4x the default: the trapezoid rule's error exceeds ~1e-9
            raise ValueError(
                f"the grid's spacing {grid.spacing:.3g} is too coarse for {num_obs} targets (at most "
                f"{math.sqrt(2.0 / num_obs):.3g}); build it with NoiseGrid.from_prior(prior, num_obs={num_obs})"
            )
        self.features, self.grid, self.out_dim = features, grid, out_dim
        super().__init__(torch.Size(), event_shape, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        Phi = self.features
        Y = target_columns(value, self.event_shape, Phi.dtype)
        if not torch.isfinite(Phi.sum()):  # an overflowing trajectory: zero density, which HMC rejects
            return torch.tensor(-math.inf, dtype=Phi.dtype)
        nodes, log_weights = self.grid.nodes.to(Phi.dtype), self.grid.log_weights.to(Phi.dtype)  # a grid of any dtype
        return _IntegratedLogLikelihood.apply(gram(Phi.T), Y, nodes.exp(), log_weights)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("NoiseIntegratedMarginal has no batch shape")
        return self
