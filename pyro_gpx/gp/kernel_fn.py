"""One interface to GPyTorch kernels, ``pyro.contrib.gp`` kernels and plain callables.

Matrix-free products evaluate the kernel block by block and recompute blocks during the backward
pass (so memory stays O(n * actions)). That needs a kernel whose hyperparameters do not change
between the forward and the backward evaluation. GPyTorch kernels are plain ``nn.Module``\\ s, so
that holds. ``pyro.contrib.gp`` kernels are ``PyroModule``\\ s whose hyperparameters may be
``PyroSample`` attributes: every access outside a model run would draw a new value. :class:`KernelFn`
records the hyperparameter sites once (inside the model run) and conditions every later
evaluation, so all evaluations use the same, differentiable values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gpytorch
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule

from .._validation import is_finite_at_least
from ._checks import _check_dtype
from .stationary import StationarySpec, stationary_spec

__all__ = ["KernelFn"]


class KernelFn:
    """A kernel as a pure function of its inputs: ``k(X1, X2)`` (dense block) and ``k.diag(X)``.

    :param kernel: a ``gpytorch.kernels.Kernel``, a ``pyro.contrib.gp.kernels.Kernel`` (or any
        ``PyroModule`` kernel called as ``kernel(X1, X2)`` / ``kernel(X, diag=True)``), or a plain
        callable ``kernel(X1, X2) -> Tensor``.
    :param probe: an input row used to record the hyperparameter sites of ``PyroModule`` kernels;
        call this inside the model run so the sites belong to it.
    :param fused: use the fused stationary-kernel products of :mod:`~pyro_gpx.gp.stationary` when
        the kernel is supported (the hyperparameters are read once, here).
    """

    def __init__(self, kernel: Callable, probe: torch.Tensor | None = None, fused: bool = True):
        self.kernel = kernel
        self.is_gpytorch = isinstance(kernel, gpytorch.kernels.Kernel)
        #: hyperparameters of a supported stationary kernel (fused products), else None
        self.spec: StationarySpec | None = stationary_spec(kernel) if fused else None
        self._values: dict[str, Any] | None = None  # the recorded hyperparameter sites' values
        self._multiplier = 1.0
        if self.spec is None and isinstance(kernel, PyroModule) and probe is not None:
            with poutine.trace() as tr:
                kernel(probe[:1], probe[:1])
            # values, not a replay: under NUTS the recorded sites are themselves conditioned
            self._values = {name: site["value"] for name, site in tr.trace.nodes.items() if site["type"] == "sample"}

    def __getstate__(self) -> dict[str, Any]:
        """With fused products the hyperparameters are all of the kernel, so a pickle (e.g. of an
        :class:`~pyro_gpx.gp.mll_refit.MLLRefit`) holds them and not the module: a GPyTorch module trained
        under Pyro cannot be pickled (Pyro's parameter store puts weak references on its parameters).
        The unpickled ``kernel`` attribute is then ``None``; everything else works as before."""
        state = dict(self.__dict__)
        if self.spec is not None:
            state["kernel"] = None
        return state

    def _call(self, X1: torch.Tensor, X2: torch.Tensor | None, diag: bool) -> torch.Tensor:
        if self.is_gpytorch:
            if diag:
                return self.kernel(X1, diag=True)
            return self.kernel(X1, X2).to_dense()
        if diag:
            try:
                out = self.kernel(X1, diag=True)
            except TypeError:  # a plain callable without ``diag``: evaluate row by row
                out = None
            if out is None or tuple(out.shape) != X1.shape[:1]:  # e.g. k(X, Z=None, **kwargs) ignoring ``diag``
                return torch.stack([self.kernel(x[None], x[None])[0, 0] for x in X1])
            return out
        return self.kernel(X1, X2)

    def _evaluate(self, X1, X2, diag: bool) -> torch.Tensor:
        if self._values is None:
            out = self._call(X1, X2, diag)
        else:
            with poutine.block(), poutine.condition(data=self._values):
                out = self._call(X1, X2, diag)
        expected = X1.shape[:1] if diag else torch.Size([X1.shape[0], X2.shape[0]])
        if out.shape != expected:  # a batched kernel failed later with a raw IndexError or shape mismatch
            batch = getattr(self.kernel, "batch_shape", torch.Size())
            note = f" (a batched kernel, batch_shape {tuple(batch)}, is not supported)" if len(batch) else ""
            raise ValueError(
                f"the kernel returned shape {tuple(out.shape)} for {'the diagonal of ' if diag else ''}inputs of "
                f"{X1.shape[0]}{'' if diag else f' and {X2.shape[0]}'} rows; expected {tuple(expected)}{note}"
            )
        return (out if self._multiplier == 1.0 else self._multiplier * out).to(X1.dtype)

    def scaled(self, multiplier: float) -> KernelFn:
        """The kernel times ``multiplier`` (a new outputscale), sharing everything else."""
        if not is_finite_at_least(multiplier, 0.0, strict=True):
            raise ValueError(f"multiplier must be a positive finite number, got {multiplier!r}")
        spec = self.spec
        if spec is not None:
            spec = dataclasses.replace(spec, outputscale=spec.outputscale * float(multiplier))
        return self._copy(self._multiplier * float(multiplier), spec)

    def stationary(self) -> StationarySpec:
        """The supported stationary kernel's hyperparameters (``spec``).

        :raises ValueError: for a kernel without fused stationary products (``spec`` is ``None``).
        """
        if self.spec is None:
            raise ValueError(
                f"re-selecting the hyperparameters needs a supported stationary kernel (RBF or Matérn, ARD or "
                f"not, optionally scaled; GPyTorch or pyro.contrib.gp), got {type(self.kernel).__name__}"
            )
        return self.spec

    def with_hyperparameters(self, lengthscale: torch.Tensor, outputscale: torch.Tensor) -> KernelFn:
        """The same stationary kernel family with other lengthscales and outputscale (tensors, which
        may require gradients), e.g. re-selected by :mod:`~pyro_gpx.gp.kernel_refit`.

        :raises ValueError: for a kernel without fused stationary products (:meth:`stationary`).
        """
        spec = self.stationary()
        lengthscale, outputscale = torch.as_tensor(lengthscale), torch.as_tensor(outputscale)
        if lengthscale.shape != spec.lengthscale.shape or outputscale.shape != ():
            raise ValueError(
                f"lengthscale must have shape {tuple(spec.lengthscale.shape)} and outputscale shape (), got "
                f"{tuple(lengthscale.shape)} and {tuple(outputscale.shape)}"
            )
        return self._copy(1.0, dataclasses.replace(spec, lengthscale=lengthscale, outputscale=outputscale))

    def _copy(self, multiplier: float, spec: StationarySpec | None) -> KernelFn:
        """This kernel function with another multiplier and spec, sharing everything else."""
        new = object.__new__(KernelFn)
        new.__dict__.update(self.__dict__)
        new._multiplier, new.spec = multiplier, spec
        return new

    def __call__(self, X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
        _check_dtype("X1", X1)  # (integer inputs gave NaN from the fused path, or truncated entries)
        _check_dtype("X2", X2)
        if self.spec is not None:
            return self.spec.dense(X1, X2)
        return self._evaluate(X1, X2, diag=False)

    def diag(self, X: torch.Tensor) -> torch.Tensor:
        _check_dtype("X", X)
        if self.spec is not None:
            return self.spec.diag(X)
        return self._evaluate(X, None, diag=True)
