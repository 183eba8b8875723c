"""SWAG: Gaussian posteriors from SGD iterates, for ``nn.Module`` training loops and as a Pyro guide."""

from .collector import SWAGCollector
from .guide import AutoSWAG
from .moments import (
    SWAGMoments,
    diagonal_variance,
    init_moments,
    moments_from_state,
    moments_state_dict,
    swag_distribution,
    update_moments,
)
from .multiswag import AutoMultiSWAG, MultiSWAG, swag_predict
from .schedule import swag_learning_rate, swag_scheduler
from .selection import ScaleSelection, select_scale

__all__ = [
    "AutoMultiSWAG",
    "AutoSWAG",
    "MultiSWAG",
    "SWAGCollector",
    "SWAGMoments",
    "ScaleSelection",
    "diagonal_variance",
    "init_moments",
    "moments_from_state",
    "moments_state_dict",
    "select_scale",
    "swag_distribution",
    "swag_learning_rate",
    "swag_predict",
    "swag_scheduler",
    "update_moments",
]
