"""Differential Gaussian processes: a GP flow of the inputs solved with torchsde, then a sparse GP."""

from .flow import GPVectorField, GridBrownian, integrate_flow
from .flow_kernel import FlowKernel, KernelState, default_flow_kernel, draw_shape
from .guide import InducingNormal
from .inducing import jittered_cholesky, kmeans_inducing, whitened_conditional
from .likelihoods import GaussianVariationalExpectation
from .model import DifferentialGP, FlowOutput
from .predict import DiffGPPrediction, predict

__all__ = [
    "DiffGPPrediction",
    "DifferentialGP",
    "FlowKernel",
    "FlowOutput",
    "GPVectorField",
    "GaussianVariationalExpectation",
    "GridBrownian",
    "InducingNormal",
    "KernelState",
    "default_flow_kernel",
    "draw_shape",
    "integrate_flow",
    "jittered_cholesky",
    "kmeans_inducing",
    "predict",
    "whitened_conditional",
]
