"""Diffusion-sampler posteriors (PIS / DDS / DIS) as a Pyro autoguide."""

from .buffer import ReplayBuffer, langevin_search
from .drift import DriftNet
from .guide import AutoDiffusion, PathSample, importance_estimate
from .losses import LogVarianceLoss, PathELBO
from .processes import ReferenceProcess, gaussian_log_density, make_process
from .target import UnconstrainedTarget

__all__ = [
    "AutoDiffusion",
    "DriftNet",
    "LogVarianceLoss",
    "PathELBO",
    "PathSample",
    "ReplayBuffer",
    "ReferenceProcess",
    "UnconstrainedTarget",
    "gaussian_log_density",
    "importance_estimate",
    "langevin_search",
    "make_process",
]
