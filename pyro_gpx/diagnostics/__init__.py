"""ArviZ bridge: Pyro posteriors (MCMC, guides, sample dicts) to ArviZ with a correct log-likelihood."""

from .arviz_compat import (
    ARVIZ_MAJOR,
    from_netcdf,
    get_group,
    group_names,
    loo_elpd,
    plot_posterior,
    plot_trace,
    to_netcdf,
)
from .conditioned import DrawEvaluation, ResampleObservations, evaluate_draws
from .guide_samples import sample_guide
from .inference_data import to_inference_data
from .model_structure import ModelStructure, SiteSpec, inspect_model
from .sample_stats import SampleStatsRecorder, mcmc_sample_stats

__all__ = [
    "ARVIZ_MAJOR",
    "DrawEvaluation",
    "ModelStructure",
    "ResampleObservations",
    "SampleStatsRecorder",
    "SiteSpec",
    "evaluate_draws",
    "from_netcdf",
    "get_group",
    "group_names",
    "inspect_model",
    "loo_elpd",
    "mcmc_sample_stats",
    "plot_posterior",
    "plot_trace",
    "sample_guide",
    "to_inference_data",
    "to_netcdf",
]
