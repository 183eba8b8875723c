"""Turn a user's ``nn.Module`` into learned Pyro parameters or fixed buffers.

``pyro.nn.module.to_pyro_module_`` keeps plain ``nn.Parameter`` s: the module, not Pyro's parameter
store, holds their values, so ``pyro.get_param_store().load(...)`` does not reach them. As
``PyroParam`` s (unconstrained, so the values and gradients are the same tensors) they are read
from the store inside every model run, as the heads' and guides' parameters are.
"""

from __future__ import annotations

import itertools

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import to_pyro_module_
from torch import nn

__all__ = ["first_float_tensor", "freeze_to_buffers_", "to_pyro_params_"]


def first_float_tensor(module: nn.Module) -> torch.Tensor | None:
    """``module``'s first floating-point parameter or buffer (its dtype and device), or ``None``."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next((t for t in tensors if t.is_floating_point()), None)


def to_pyro_params_(module: nn.Module) -> nn.Module:
    """Convert ``module`` in place to a ``PyroModule`` whose trainable parameters are ``PyroParam`` s.

    Frozen (``requires_grad=False``) parameters become buffers of the same name (fixed module state,
    saved by ``state_dict``: a plain parameter of a ``PyroModule`` would enter the parameter store,
    which makes it trainable), and shared trainable ones stay plain ``nn.Parameter`` s. Converting a module
    again changes nothing (a feature network given to a second layer, e.g. a notebook cell run twice)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.requires_grad:
                del sub._parameters[name]
                sub.register_buffer(name, p.detach())
    to_pyro_module_(module)
    counts: dict[int, int] = {}
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    for sub in module.modules():
        if not isinstance(sub, PyroModule):
            continue
        for name, p in list(sub._parameters.items()):
            if p is None or not p.requires_grad or counts[id(p)] > 1:
                continue
            if name.endswith("_unconstrained") and name[: -len("_unconstrained")] in sub._pyro_params:
                continue  # a PyroParam's storage: converted already (the module was given to another layer)
            setattr(sub, name, PyroParam(p.detach(), constraints.real))
    return module


def freeze_to_buffers_(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name, in place: fixed values that
    ``state_dict`` saves and that Pyro neither registers nor warns about (``pyro.module`` warns for
    each frozen parameter of a module in training mode)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if p is None else p.detach().requires_grad_(False))
    return module
