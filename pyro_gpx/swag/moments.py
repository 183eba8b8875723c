r"""SWAG moments of SGD iterates: pure functions, state in, state out.

Over iterates :math:`\theta_1, \dots, \theta_T` (one per epoch at a constant or cyclic learning rate),
SWA-Gaussian [1] keeps

.. math::

    \bar\theta = \frac1T\sum_t \theta_t, \qquad
    \Sigma_{\text{diag}} = \frac1T\sum_t (\theta_t - \bar\theta)^2
        = \overline{\theta^2} - \bar\theta^2, \qquad
    \hat D = [\theta_t - \bar\theta_t]_{t = T-K+1}^{T},

where :math:`\bar\theta_t` is the running mean after iterate :math:`t` and :math:`\hat D` holds the
last :math:`K` deviations (memory :math:`O(KP)` for :math:`P` parameters). The approximate posterior
is :math:`N(\bar\theta, \Sigma)` with :math:`\Sigma = \tfrac12(\Sigma_{\text{diag}} + \hat D\hat D^\top/(K-1))`;
samples :math:`\bar\theta + \sqrt{s}\,(\Sigma_{\text{diag}}^{1/2} z_1 + \hat D z_2/\sqrt{K-1})` with the
default scale :math:`s = 1/2` have exactly that covariance. With fewer than :math:`K` iterates,
:math:`K` is the number collected.

The statistics live on the device of the iterates they were created for (:func:`init_moments`'s
``device``) and accumulate in their own dtype (float64 by default). The paper keeps
:math:`\overline{\theta^2}` and subtracts :math:`\bar\theta^2`, which loses a relative
:math:`\epsilon\,(\bar\theta/\sigma_\theta)^2` of the variance to cancellation: all of it in float32 for
a weight a few thousand times its SGD spread. The state keeps :math:`\Sigma_{\text{diag}}` itself,
updated from deviations as in Welford's algorithm [2],

.. math::

    \bar\theta_t = \bar\theta_{t-1} + \frac{\theta_t - \bar\theta_{t-1}}t, \qquad
    \Sigma_t = \Sigma_{t-1} + \frac{(\theta_t - \bar\theta_{t-1})(\theta_t - \bar\theta_t) - \Sigma_{t-1}}t,

whose error is relative to :math:`\sigma_\theta^2`, so float32 statistics serve as well (the paper's
:math:`\overline{\theta^2}` remains available as :attr:`SWAGMoments.sq_mean`).
:func:`swag_distribution` can cast its parameters to the model's dtype.

References:

[1] W. Maddox, T. Garipov, P. Izmailov, D. Vetrov, A. Wilson. A simple baseline for Bayesian
    uncertainty in deep learning. NeurIPS 2019.

[2] B. P. Welford. Note on a method for calculating corrected sums of squares and products.
    Technometrics 4(3), 1962.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import pyro.distributions as dist
import torch

from .._validation import check_finite, check_positive_int, is_finite_at_least

__all__ = [
    "MIN_VARIANCE",
    "SWAGMoments",
    "diagonal_variance",
    "init_moments",
    "moments_from_state",
    "moments_state_dict",
    "swag_distribution",
    "update_moments",
]

#: the entries of :func:`moments_state_dict`
STATE_KEYS = ("num_snapshots", "mean", "variance", "deviations", "max_rank")

#: floor on the diagonal variance, as in the reference implementation: for parameters that never moved
MIN_VARIANCE = 1e-30


@dataclass(frozen=True, kw_only=True)
class SWAGMoments:
    """Running SWAG statistics of a flat parameter vector (built by keyword: before the Welford update the
    third field was ``sq_mean``, which a positional call would now read as the variance).

    :ivar num_snapshots: iterates collected so far.
    :ivar mean: :math:`\\bar\\theta`, shape ``(P,)``.
    :ivar variance: :math:`\\Sigma_{\\text{diag}}`, the iterates' (biased) variance, shape ``(P,)``.
    :ivar deviations: the last ``max_rank`` deviations, oldest first, shape ``(k, P)``.
    """

    num_snapshots: int
    mean: torch.Tensor
    variance: torch.Tensor
    deviations: torch.Tensor
    max_rank: int

    @property
    def rank(self) -> int:
        return self.deviations.shape[0]

    @property
    def sq_mean(self) -> torch.Tensor:
        r""":math:`\overline{\theta^2} = \Sigma_{\text{diag}} + \bar\theta^2`, the paper's statistic."""
        return self.variance + self.mean**2


def init_moments(
    num_params: int,
    max_rank: int = 20,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SWAGMoments:
    """Empty statistics for ``num_params`` parameters, in ``dtype`` on ``device`` (that of the
    parameters: the default ``None`` is the default device)."""
    num_params = check_positive_int("num_params", num_params)
    max_rank = check_positive_int("max_rank", max_rank)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # an integer dtype truncates iterates
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    zeros = torch.zeros(num_params, dtype=dtype, device=device)
    return SWAGMoments(
        num_snapshots=0,
        mean=zeros,
        variance=zeros.clone(),
        deviations=zeros.new_zeros(0, num_params),
        max_rank=max_rank,
    )


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.device.type != "meta":  # meta tensors (device checks without a GPU) carry no values
        check_finite(name, x)


def update_moments(moments: SWAGMoments, theta: torch.Tensor) -> SWAGMoments:
    """Add one iterate; returns the new statistics (the input is not modified).

    ``theta`` is moved to the statistics' device and dtype.
    """
    theta = torch.as_tensor(theta).detach().reshape(-1).to(device=moments.mean.device, dtype=moments.mean.dtype)
    if theta.shape != moments.mean.shape:
        raise ValueError(f"theta has {theta.numel()} entries; these moments track {moments.mean.numel()}")
    _check_finite("theta", theta)
    n = moments.num_snapshots + 1
    step = theta - moments.mean
    mean = moments.mean + step / n
    deviation = theta - mean
    variance = moments.variance + (step * deviation - moments.variance) / n  # Welford: no cancellation
    deviations = torch.cat([moments.deviations, deviation[None]])[-moments.max_rank :]
    return SWAGMoments(num_snapshots=n, mean=mean, variance=variance, deviations=deviations, max_rank=moments.max_rank)


def diagonal_variance(moments: SWAGMoments) -> torch.Tensor:
    r""":math:`\Sigma_{\text{diag}}`, floored at :data:`MIN_VARIANCE`."""
    return moments.variance.clamp_min(MIN_VARIANCE)


def swag_distribution(
    moments: SWAGMoments,
    scale: float = 0.5,
    diag_only: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dist.TorchDistribution:
    r"""The SWAG Gaussian: ``LowRankMultivariateNormal`` (or diagonal ``Normal`` with
    ``diag_only``, or with fewer than 2 deviation columns) with covariance
    :math:`s(\Sigma_{\text{diag}} + \hat D\hat D^\top/(k-1))`.

    :param dtype: dtype of the distribution's parameters (default: the moments'); they are computed in
        the moments' dtype and then cast, so float32 models keep the float64 variance.
    :param device: device of the distribution's parameters (default: the moments').
    :raises ValueError: with fewer than 2 iterates (no spread to estimate), or a scale that is not finite and positive.
    """
    if moments.num_snapshots < 2:
        raise ValueError(f"SWAG needs at least 2 collected iterates to sample; have {moments.num_snapshots}")
    if not is_finite_at_least(scale, 0.0, strict=True):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    if not isinstance(diag_only, bool):
        raise TypeError(f"diag_only must be a bool, got {diag_only!r}")
    variance = scale * diagonal_variance(moments)

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    if diag_only or moments.rank < 2:
        return dist.Normal(cast(moments.mean), cast(variance.sqrt())).to_event(1)
    factor = math.sqrt(scale / (moments.rank - 1)) * moments.deviations.T
    return dist.LowRankMultivariateNormal(cast(moments.mean), cast(factor), cast(variance))


def moments_state_dict(moments: SWAGMoments) -> dict:
    """The statistics as a dict of ints and tensors (copies), saveable with ``torch.save``."""
    m = moments
    return {"num_snapshots": m.num_snapshots, "mean": m.mean.clone(), "variance": m.variance.clone(),
            "deviations": m.deviations.clone(), "max_rank": m.max_rank}  # fmt: skip


def _legacy_variance(state: Mapping, name: str) -> torch.Tensor:
    mean, sq_mean = state.get("mean"), state["sq_mean"]
    if not (isinstance(mean, torch.Tensor) and isinstance(sq_mean, torch.Tensor) and mean.shape == sq_mean.shape):
        raise ValueError(f"{name}['sq_mean'] and {name}['mean'] must be tensors of one shape")
    return (sq_mean - mean**2).clamp_min(0.0)


def moments_from_state(
    state, num_params: int | None = None, device: torch.device | str | None = None, name: str = "state"
) -> SWAGMoments:
    """Statistics from :func:`moments_state_dict`'s output (copied, moved to ``device`` if given),
    after checking that they are consistent.

    :param num_params: the number of parameters they must track (``None``: any).
    :raises ValueError: naming ``name`` and the offending entry: missing keys, wrong shapes or
        dtypes, counts that disagree, NaN or inf.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a dict from a SWAG state_dict(), got {type(state).__name__}")
    if "variance" not in state and "sq_mean" in state:  # saved before the state kept the variance
        state = {**state, "variance": _legacy_variance(state, name)}
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{name} lacks the SWAG entries {missing}")
    if num_params is not None:
        num_params = check_positive_int("num_params", num_params)
    count, max_rank = state["num_snapshots"], state["max_rank"]
    if not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"{name}['num_snapshots'] must be an int >= 0, got {count!r}")
    if not isinstance(max_rank, numbers.Integral) or max_rank < 1:
        raise ValueError(f"{name}['max_rank'] must be an int >= 1, got {max_rank!r}")
    count, max_rank = int(count), int(max_rank)
    tensors = {k: state[k] for k in ("mean", "variance", "deviations")}
    for key, value in tensors.items():
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise ValueError(f"{name}[{key!r}] must be a floating-point tensor, got {type(value).__name__}")
        if value.dtype != tensors["mean"].dtype:
            raise ValueError(f"{name}[{key!r}] has dtype {value.dtype}; {name}['mean'] has {tensors['mean'].dtype}")
        _check_finite(f"{name}[{key!r}]", value)
    if tensors["variance"].device.type != "meta" and (tensors["variance"] < 0).any():
        raise ValueError(f"{name}['variance'] has negative entries")
    P = tensors["mean"].numel() if num_params is None else num_params
    expected = {"mean": (P,), "variance": (P,), "deviations": (min(count, max_rank), P)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(tensors[key].shape)}; expected {shape} "
                f"({P} parameters, {count} snapshots, max_rank {max_rank})"
            )
    mean, variance, deviations = (tensors[k].detach().clone().to(device) for k in ("mean", "variance", "deviations"))
    return SWAGMoments(num_snapshots=count, mean=mean, variance=variance, deviations=deviations, max_rank=max_rank)
