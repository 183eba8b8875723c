"""Computation-aware Gaussian processes (IterGP / CaGP) as Pyro primitives."""

from . import settings
from .actions import Actions, BlockSparseActions, DenseActions, IndexActions, StackedActions
from .cg import CGResult, conjugate_gradients
from .cholesky import CholeskyError, NonFiniteError, NumericalWarning, safe_cholesky
from .kernel_fn import KernelFn
from .kernel_ops import block_sparse_kernel_matmul, kernel_diag, kernel_matmul
from .kernel_refit import subset_refit_kernel_noise
from .marginal import OBJECTIVES, ComputationAwareMarginal, exact_log_marginal_likelihood
from .mll_refit import MLLRefit, refit_outputscale_noise, subset_refit_outputscale_noise
from .model import ComputationAwareGP
from .noise_refit import refit_noise
from .partition import kd_partition, random_partition
from .policies import (
    BlockSparsePolicy,
    CGPolicy,
    Policy,
    PolicyContext,
    PseudoInputPolicy,
    RandomSketchPolicy,
    UnitVectorPolicy,
)
from .posterior import PosteriorMoments, exact_posterior_variance, posterior_moments
from .preconditioners import LowRankPreconditioner, build_preconditioner, partial_cholesky
from .projection import ActionProjection, independent_columns, project, project_extended, resolved_columns

__all__ = [
    "OBJECTIVES",
    "ActionProjection",
    "Actions",
    "BlockSparseActions",
    "BlockSparsePolicy",
    "CGPolicy",
    "CGResult",
    "CholeskyError",
    "ComputationAwareGP",
    "ComputationAwareMarginal",
    "DenseActions",
    "IndexActions",
    "KernelFn",
    "LowRankPreconditioner",
    "NonFiniteError",
    "NumericalWarning",
    "Policy",
    "PolicyContext",
    "PosteriorMoments",
    "PseudoInputPolicy",
    "RandomSketchPolicy",
    "StackedActions",
    "UnitVectorPolicy",
    "block_sparse_kernel_matmul",
    "build_preconditioner",
    "conjugate_gradients",
    "exact_log_marginal_likelihood",
    "exact_posterior_variance",
    "independent_columns",
    "kernel_diag",
    "kd_partition",
    "kernel_matmul",
    "partial_cholesky",
    "MLLRefit",
    "refit_outputscale_noise",
    "subset_refit_kernel_noise",
    "subset_refit_outputscale_noise",
    "posterior_moments",
    "project",
    "project_extended",
    "random_partition",
    "refit_noise",
    "resolved_columns",
    "safe_cholesky",
    "settings",
]
