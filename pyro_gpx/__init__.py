"""pyro-gpx: scalable Bayesian building blocks for Pyro."""

__version__ = "0.1.0"
