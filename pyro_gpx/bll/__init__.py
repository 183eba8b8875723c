"""Bayesian last layers with Gaussian and implicit (generator) priors."""

from .elbo import LastLayerELBO
from .guide import LastLayerNormal
from .heads import CategoricalHead, GaussianHead
from .model import BayesianLastLayer
from .predict import predict, predictive_entropy
from .priors import GaussianWeightPrior, ImplicitWeightPrior, generator_mlp

__all__ = [
    "BayesianLastLayer",
    "CategoricalHead",
    "GaussianHead",
    "GaussianWeightPrior",
    "ImplicitWeightPrior",
    "LastLayerELBO",
    "LastLayerNormal",
    "generator_mlp",
    "predict",
    "predictive_entropy",
]
