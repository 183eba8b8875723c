"""Bayesian neural networks for Pyro's MCMC, with readout repriorisation for fast mixing."""

from .chains import ChainsResult, run_chains
from .collapsed import CollapsedModel
from .gradient_mass_matrix import GradientMassMatrix
from .jittered_hmc import JitteredHMC
from .marginal import GaussianLinearMarginal
from .mlp import BayesianMLP, RepriorisedModel
from .noise_quadrature import NoiseGrid, NoiseIntegratedMarginal
from .predictions import predictions_to_inference_data
from .repriorise import RepriorisedReadout, readout_map
from .split_hmc import SplitHMC

__all__ = [
    "BayesianMLP",
    "ChainsResult",
    "CollapsedModel",
    "GaussianLinearMarginal",
    "GradientMassMatrix",
    "JitteredHMC",
    "NoiseGrid",
    "NoiseIntegratedMarginal",
    "RepriorisedModel",
    "RepriorisedReadout",
    "SplitHMC",
    "predictions_to_inference_data",
    "readout_map",
    "run_chains",
]
