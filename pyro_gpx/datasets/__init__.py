"""Data: UCI benchmark loaders (caller-given directory) and small synthetic sets."""

from .standardize import Standardizer
from .synthetic import SyntheticClassification, SyntheticRegression, gap_regression, two_moons
from .uci import LAYOUTS, RegressionSplit, list_uci, load_uci, num_splits, resolve_dataset

__all__ = [
    "LAYOUTS",
    "RegressionSplit",
    "Standardizer",
    "SyntheticClassification",
    "SyntheticRegression",
    "gap_regression",
    "list_uci",
    "load_uci",
    "num_splits",
    "resolve_dataset",
    "two_moons",
]
