"""Bayesian last layers with Gaussian and implicit (generator) priors."""

from .elbo import LastLayerELBO
from .exact import exact_posterior, log_evidence
from .guide import LastLayerNormal
from .heads import CategoricalHead, GaussianHead
from .model import BayesianLastLayer
from .predict import predict, predictive_entropy
from .priors import GaussianWeightPrior, ImplicitWeightPrior, StandardizedGenerator, generator_mlp

__all__ = [
    "BayesianLastLayer",
    "CategoricalHead",
    "GaussianHead",
    "GaussianWeightPrior",
    "ImplicitWeightPrior",
    "LastLayerELBO",
    "LastLayerNormal",
    "StandardizedGenerator",
    "exact_posterior",
    "generator_mlp",
    "log_evidence",
    "predict",
    "predictive_entropy",
]
