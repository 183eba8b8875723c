r"""Kernels of the flow GP's vector field, with point or latent (fully Bayesian) hyperparameters.

The flow field has one GP per state dimension :math:`d = 1..D` (or one shared kernel). With point
hyperparameters any GPyTorch kernel works: batch shape ``(D,)`` for one kernel per dimension, ``()``
for a shared one; its parameters are Pyro parameters (``pyro.module``). With hyperpriors the kernel
must be a stationary family (RBF, Matérn) inside a ``ScaleKernel``; its lengthscales
:math:`\ell_{d\cdot}` and output scales :math:`s_d^2` become the sample sites ``lengthscale``
``(D_k, D)`` and ``outputscale`` ``(D_k,)`` and the kernel is evaluated from the *sampled* values,

.. math:: k_d(x, x') = s_d^2\,\kappa\big(\|x/\ell_{d\cdot} - x'/\ell_{d\cdot}\|^2\big),

batched over draws (particles), so every forward pass of the flow uses the current :math:`\theta`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gpytorch
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, pyro_method
from torch.autograd.function import once_differentiable

from .._validation import check_positive_int, is_finite_at_least
from ..gp.stationary import _gpytorch_family, _profile, centred

__all__ = ["FlowKernel", "KernelState", "default_flow_kernel", "draw_shape"]


def draw_shape(batch: torch.Size, name: str) -> torch.Size:
    """The draws' (particles') dims of a global site with batch shape ``batch``: what lies left of
    the model's two (size-1) plate dims; a single batch dim is the draws handed over without those dims,
    as ``Predictive(parallel=True)`` does (it pads samples to the plate nesting counting event dims)."""
    if len(batch) <= 1:
        return torch.Size(batch)
    if len(batch) == 2 and batch[-1] == 1 and batch[0] != 1:  # Predictive's padding of a one-event-dim site
        return torch.Size(batch[:1])
    if any(s != 1 for s in batch[-2:]):
        raise ValueError(
            f"{name} has batch shape {tuple(batch)}; a global site's draws must end in the model's two size-1 "
            "plate dims, or be a single batch dim"
        )
    return batch[:-2]


def default_flow_kernel(
    dim: int, *, shared: bool = False, outputscale: float = 0.1, dtype: torch.dtype = torch.float64
) -> gpytorch.kernels.Kernel:
    """ARD RBF in a ``ScaleKernel``, one per state dimension unless ``shared``; lengthscales
    :math:`\\sqrt{D}` on standardised inputs, a small output scale (a gentle initial flow)."""
    dim = check_positive_int("dim", dim)
    if not is_finite_at_least(outputscale, 0.0, strict=True):
        raise ValueError(f"outputscale must be a finite positive number, got {outputscale!r}")
    batch = torch.Size() if shared else torch.Size([dim])
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=dim, batch_shape=batch), batch_shape=batch
    ).to(dtype)
    kernel.base_kernel.lengthscale = torch.full(batch + (1, dim), math.sqrt(dim), dtype=dtype)
    kernel.outputscale = torch.full(batch, outputscale, dtype=dtype)
    return kernel


class _AugmentedRows(torch.autograd.Function):
    """``x_aug = [xs, 1, -|xs|^2 / 2]`` ``(B, D_k, n, D + 2)`` with ``xs = x.unsqueeze(1) / ls`` for ``x``
    ``(B, n, D)`` and ``ls`` ``(Bk, D_k, 1, D)``: the plain expressions forward, and a backward written out
    in a few passes over ``(B, D_k, n, D)`` (autograd's takes twice as many, for every flow step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xs = x.unsqueeze(1) / ls
        ctx.save_for_backward(xs, ls)
        ctx.x_shape = x.shape
        return torch.cat([xs, torch.ones_like(xs[..., :1]), -0.5 * (xs * xs).sum(-1, keepdim=True)], -1)

    @staticmethod
    @once_differentiable  # xs is saved from the forward pass: no second derivatives
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        xs, ls = ctx.saved_tensors
        D = xs.shape[-1]
        g_xs = torch.addcmul(g[..., :D], g[..., D + 1 :], xs, value=-1.0)  # d(-|xs|^2 / 2) = -xs
        g_x = g_ls = None
        if ctx.needs_input_grad[0]:
            B, n, _ = ctx.x_shape
            g_x = (g_xs / ls).sum_to_size(B, 1, n, D).squeeze(1)
        if ctx.needs_input_grad[1]:
            g_ls = -(g_xs * xs).sum_to_size(ls.shape) / ls  # d(x / ls) / d ls = -xs / ls
        return g_x, g_ls


class KernelState:
    """The flow kernels for one model run. ``cross(x, Z)`` is ``(Bk, D_k, n, M)`` for ``x`` of shape
    ``(B, n, D)``, ``gram(Z)`` is ``(Bk, D_k, M, M)`` and ``diag(x)`` is ``(Bk, D_k, n)`` broadcastable
    to ``(B, D_k, n)``; ``Bk`` is 1 for point hyperparameters, else the number of draws."""

    def __init__(self, kernel: gpytorch.kernels.Kernel | None = None, family: str | None = None,
                 lengthscale: torch.Tensor | None = None, outputscale: torch.Tensor | None = None,
                 lead: tuple[int, ...] = ()):  # fmt: skip
        self.kernel, self.family = kernel, family
        #: the draws' batch shape (left of the model's plates); ``Bk = lead.numel()``
        self.lead = torch.Size(lead)
        self.lengthscale, self.outputscale = lengthscale, outputscale  # (Bk, D_k, D), (Bk, D_k)

    def _stationary(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The family and hyperparameters of a state without a GPyTorch kernel."""
        if self.family is None or self.lengthscale is None or self.outputscale is None:
            raise ValueError("a KernelState needs a kernel, or a family with lengthscale and outputscale")
        return self.family, self.lengthscale, self.outputscale

    def cross(self, x: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            B, n, D = x.shape
            K = self.kernel(x.reshape(B * n, D), Z).to_dense()  # (D_k, B n, M) or (B n, M)
            K = K.reshape(-1, B, n, Z.shape[0])
            return K.transpose(0, 1)
        rbf = self.rbf_features(Z)
        if rbf is not None:
            z_aug, x_features = rbf
            return torch.exp(x_features(x) @ z_aug.transpose(-1, -2))
        family, lengthscale, outputscale = self._stationary()
        ls = lengthscale.unsqueeze(-2)  # (Bk, D_k, 1, D)
        x, Z_c = centred(x, Z)  # the expansions below cancel for inputs far from the origin
        assert Z_c is not None
        xs, zs = x.unsqueeze(1) / ls, Z_c / ls  # (B, D_k, n, D), (Bk, D_k, M, D)
        rho = (xs * xs).sum(-1, keepdim=True) - 2 * xs @ zs.transpose(-1, -2) + (zs * zs).sum(-1).unsqueeze(-2)
        return outputscale[..., None, None] * _profile(family, rho.clamp_min(0))

    def rbf_features(self, Z: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
        """For the RBF family, ``z_aug`` ``(Bk, D_k, M, D + 2)`` and a map ``x_features`` from ``x`` ``(B, n, D)``
        to ``(B, D_k, n, D + 2)`` with ``cross(x, Z) = exp(x_features(x) @ z_aug^T)``: ``Z``'s half once for
        many ``x`` (a flow's steps). ``None`` for other kernels (and for ``M = 0``)."""
        if self.kernel is not None or self.family != "rbf" or Z.shape[0] == 0:
            return None
        _, lengthscale, outputscale = self._stationary()
        ls = lengthscale.unsqueeze(-2)  # (Bk, D_k, 1, D)
        # centred: the expansions below cancel for inputs far from the origin
        c = Z.detach().mean(0)
        zs = (Z - c) / ls  # (Bk, D_k, M, D)
        # log k = log s^2 - |xs|^2 / 2 - |zs|^2 / 2 + xs.zs as one product of augmented rows: two passes
        # over the (n, M) block instead of eight
        log_s2 = outputscale.log()[..., None, None]
        z_aug = torch.cat([zs, log_s2 - 0.5 * (zs * zs).sum(-1, keepdim=True), torch.ones_like(zs[..., :1])], -1)

        def x_features(x: torch.Tensor) -> torch.Tensor:
            return _AugmentedRows.apply(x - c, ls)

        return z_aug, x_features

    def gram(self, Z: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            K = self.kernel(Z, Z).to_dense()
            return K.reshape((1, -1) + K.shape[-2:])
        return self.cross(Z.unsqueeze(0).expand(self._stationary()[1].shape[0], -1, -1), Z)

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            B, n, D = x.shape
            return self.kernel(x.reshape(B * n, D), diag=True).reshape(-1, B, n).transpose(0, 1)
        return self._stationary()[2].unsqueeze(-1)


class FlowKernel(PyroModule):
    """The flow GP's kernels: a GPyTorch kernel, optionally with latent stationary hyperparameters.

    :param dim: state dimension :math:`D`.
    :param kernel: a GPyTorch kernel with batch shape ``(D,)`` (one per dimension) or ``()``
        (shared); default :func:`default_flow_kernel`.
    :param lengthscale_prior: a Pyro distribution (scalar, positive support) that makes the
        lengthscales latent sites (fully Bayesian flow).
    :param outputscale_prior: the same for the output scales. Requires an RBF or
        Matérn kernel inside a ``ScaleKernel``; the kernel's values are then only the initial point.
    :param dtype: of the default kernel (a given kernel keeps its own); the model's inputs must match.
    """

    def __init__(self, dim: int, kernel: gpytorch.kernels.Kernel | None = None, *, dtype: torch.dtype = torch.float64,
                 lengthscale_prior: dist.TorchDistribution | None = None,
                 outputscale_prior: dist.TorchDistribution | None = None):  # fmt: skip
        super().__init__()
        dim = check_positive_int("dim", dim)
        kernel = default_flow_kernel(dim, dtype=dtype) if kernel is None else kernel
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"kernel must be a gpytorch Kernel, got {type(kernel).__name__}")
        batch = tuple(kernel.batch_shape)
        if batch not in ((), (dim,)):
            raise ValueError(f"the flow kernel's batch shape must be () or ({dim},), got {batch}")
        self.dim, self.kernel = dim, kernel
        self.num_kernels = batch[0] if batch else 1
        self.lengthscale_prior, self.outputscale_prior = lengthscale_prior, outputscale_prior
        base = kernel.base_kernel if isinstance(kernel, gpytorch.kernels.ScaleKernel) else None
        family = _gpytorch_family(base) if base is not None else None
        if base is None or base.active_dims is not None or kernel.active_dims is not None:
            family = None
        elif tuple(base.batch_shape) != batch:
            family = None
        #: the stationary family evaluated directly (faster than GPyTorch's generic path); None: call GPyTorch
        self.family = family
        if self.bayesian:
            if self.family is None:
                raise ValueError(
                    "latent flow hyperparameters need an RBF or Matern kernel inside a ScaleKernel, without active_dims"
                )
            for name, prior in (("lengthscale_prior", lengthscale_prior), ("outputscale_prior", outputscale_prior)):
                if prior is not None and (prior.batch_shape != () or prior.event_shape != ()):
                    raise ValueError(
                        f"{name} must be a scalar distribution, got batch shape {tuple(prior.batch_shape)} "
                        f"and event shape {tuple(prior.event_shape)}"
                    )
                if prior is not None and not _positive_support(prior):
                    raise ValueError(f"{name} must have positive support (e.g. LogNormal, Gamma), got {prior.support}")

    @property
    def bayesian(self) -> bool:
        return self.lengthscale_prior is not None or self.outputscale_prior is not None

    def _point_values(self) -> dict[str, torch.Tensor]:
        base = self.kernel.base_kernel
        ls = base.lengthscale.reshape(-1, base.lengthscale.shape[-1]).expand(self.num_kernels, self.dim)
        return {"lengthscale": ls, "outputscale": self.kernel.outputscale.reshape(-1).expand(self.num_kernels)}

    def initial_values(self) -> dict[str, torch.Tensor]:
        """The kernel's current (point) lengthscales ``(D_k, D)`` and output scales ``(D_k,)``."""
        return {k: v.detach().clone() for k, v in self._point_values().items()}

    @pyro_method
    def state(self) -> KernelState:
        """Call inside the model run: registers the point parameters and samples the latent ones."""
        pyro.module(self._pyro_get_fullname("kernel"), self.kernel, update_module_params=True)  # see DifferentialGP
        if not self.bayesian:
            if self.family is None:
                return KernelState(kernel=self.kernel)
            values = self._point_values()
            return KernelState(family=self.family, lengthscale=values["lengthscale"].unsqueeze(0),
                               outputscale=values["outputscale"].unsqueeze(0))  # fmt: skip
        Dk, D = self.num_kernels, self.dim
        point = self._point_values()  # (D_k, D) and (D_k,): the values of whichever part has no prior
        if self.lengthscale_prior is not None:
            prior = self.lengthscale_prior.expand((Dk, D)).to_event(2)
            ls = pyro.sample(self._pyro_get_fullname("lengthscale"), prior)
        else:
            ls = point["lengthscale"]
        if self.outputscale_prior is not None:
            os_ = pyro.sample(self._pyro_get_fullname("outputscale"), self.outputscale_prior.expand((Dk,)).to_event(1))
        else:
            os_ = point["outputscale"]
        # a prior (and so its guide) may be in another dtype, e.g. built from Python floats: the kernel's counts
        dtype = point["outputscale"].dtype
        ls, os_ = ls.to(dtype), os_.to(dtype)
        # each site's draws on their own (Predictive(parallel=True) pads a (Dk,) site's to (N, 1), a (Dk, D)
        # site's to (N,): broadcast together they made (N, N))
        ls_lead = draw_shape(ls.shape[:-2], f"site {self._pyro_get_fullname('lengthscale')!r}")
        os_lead = draw_shape(os_.shape[:-1], f"site {self._pyro_get_fullname('outputscale')!r}")
        lead = torch.broadcast_shapes(ls_lead, os_lead)
        ls = ls.reshape(ls_lead + (Dk, D)).expand(lead + (Dk, D)).reshape(-1, Dk, D)
        os_ = os_.reshape(os_lead + (Dk,)).expand(lead + (Dk,)).reshape(-1, Dk)
        return KernelState(family=self.family, lengthscale=ls, outputscale=os_, lead=lead)


def _positive_support(prior) -> bool:
    """Whether ``prior``'s support is non-negative (positive, or an interval starting at or above zero)."""
    support = getattr(prior.support, "base_constraint", prior.support)  # Independent wraps it
    if support is constraints.positive:
        return True
    lower = getattr(support, "lower_bound", None)
    return lower is not None and float(lower) >= 0
