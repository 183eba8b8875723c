"""Assembling ArviZ objects from plain arrays, for ArviZ 0.x and 1.x alike.

ArviZ 0.x wraps groups of :class:`xarray.Dataset` in ``arviz.InferenceData``; ArviZ 1.x uses
:class:`xarray.DataTree` and has no ``from_pyro``. Both accept datasets built directly with
xarray, so this module builds the datasets itself (one code path) and only the final container
differs. It imports neither torch nor Pyro, so the conversion can be checked on any ArviZ.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np
import xarray as xr

__all__ = [
    "ARVIZ_MAJOR",
    "SAMPLE_GROUPS",
    "build_dataset",
    "build_inference_data",
    "from_netcdf",
    "group_names",
    "loo_elpd",
    "plot_posterior",
    "plot_trace",
    "to_netcdf",
    "get_group",
]

ARVIZ_MAJOR = int(az.__version__.split(".")[0])

#: Groups whose variables carry leading ``(chain, draw)`` dimensions.
SAMPLE_GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "prior", "predictions")


def _default_dims(name: str, ndim: int) -> list[str]:
    return [f"{name}_dim_{i}" for i in range(ndim)]


def build_dataset(
    data: Mapping[str, np.ndarray],
    *,
    sample_dims: Sequence[str] = ("chain", "draw"),
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build one group's dataset.

    :param data: variable name to array; arrays start with ``sample_dims``.
    :param sample_dims: leading dimensions shared by every variable (empty for data groups).
    :param dims: variable name to the names of its non-sample dimensions; missing names get
        ``<var>_dim_<i>``.
    :param coords: coordinate values by dimension name (dimensions without coords get ``0..n-1``).
    """
    dims = dict(dims or {})
    coords = dict(coords or {})
    variables = {}
    used_coords: dict[str, Any] = {}
    for name, value in data.items():
        value = np.asarray(value)
        if value.ndim < len(sample_dims):
            raise ValueError(
                f"variable {name!r} has shape {value.shape}; expected leading dimensions {tuple(sample_dims)}"
            )
        var_dims = list(dims.get(name, _default_dims(name, value.ndim - len(sample_dims))))
        if len(var_dims) != value.ndim - len(sample_dims):
            raise ValueError(
                f"dims for {name!r} are {var_dims}, but the variable has {value.ndim - len(sample_dims)} "
                f"non-sample dimensions (shape {value.shape})"
            )
        all_dims = list(sample_dims) + var_dims
        for dim, size in zip(all_dims, value.shape):
            if dim in coords:
                coord = np.asarray(coords[dim])
                if coord.shape != (size,):
                    raise ValueError(f"coords[{dim!r}] has shape {coord.shape}; {name!r} needs {size} entries")
                used_coords[dim] = coord
            elif dim not in used_coords:
                used_coords[dim] = np.arange(size)
            elif used_coords[dim].shape != (size,):
                raise ValueError(f"dimension {dim!r} has inconsistent sizes across variables")
        variables[name] = (all_dims, value)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    base_attrs = {"created_at": now, "arviz_version": az.__version__}
    base_attrs.update(attrs or {})
    return xr.Dataset(variables, coords=used_coords, attrs=base_attrs)


def build_inference_data(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    group_dims: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    coords: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """Assemble groups of arrays into the installed ArviZ's container.

    :param groups: group name (``posterior``, ``log_likelihood``, ``observed_data`` ...) to
        variables. Sample groups (:data:`SAMPLE_GROUPS`) have ``(chain, draw)`` leading axes.
    :param dims: dims shared by all groups, by variable name.
    :param group_dims: per-group overrides of ``dims`` (a log-likelihood variable can have other
        dims than the observed variable of the same name).
    :returns: ``arviz.InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ 1.x.
    """
    datasets = {}
    for group, data in groups.items():
        if not data:
            continue
        merged_dims = dict(dims or {})
        merged_dims.update((group_dims or {}).get(group, {}))
        sample_dims = ("chain", "draw") if group in SAMPLE_GROUPS else ()
        datasets[group] = build_dataset(data, sample_dims=sample_dims, dims=merged_dims, coords=coords, attrs=attrs)
    if ARVIZ_MAJOR >= 1:
        return xr.DataTree.from_dict(datasets)
    # mypy cannot rule out a group named like InferenceData's attrs / warn_on_custom_groups parameters
    return az.InferenceData(**datasets)  # type: ignore[arg-type]


def group_names(idata) -> list[str]:
    """Names of the groups of an ``InferenceData`` or ``DataTree``."""
    if isinstance(idata, xr.DataTree):
        return list(idata.children)
    return list(idata.groups())


def get_group(idata, group: str) -> xr.Dataset:
    """One group as an :class:`xarray.Dataset`, for either container."""
    if isinstance(idata, xr.DataTree):
        return idata[group].to_dataset()
    return getattr(idata, group)


def to_netcdf(idata, path: str | os.PathLike[str]) -> str:
    """Write an ``InferenceData`` or ``DataTree`` to netCDF (h5netcdf engine); returns the path."""
    idata.to_netcdf(str(path), engine="h5netcdf")
    return str(path)


def plot_trace(idata, var_names=None, **kwargs):
    """Trace plot with the installed ArviZ (``plot_trace`` in 0.x, ``plot_trace_dist`` in 1.x)."""
    if ARVIZ_MAJOR >= 1:
        return az.plot_trace_dist(idata, var_names=var_names, **kwargs)
    return az.plot_trace(idata, var_names=var_names, **kwargs)


def loo_elpd(idata, **kwargs) -> tuple[float, float]:
    """PSIS-LOO's expected log pointwise predictive density and its standard error, computed by the
    installed ArviZ (``az.loo``; keywords go to it): 0.x names the estimate ``elpd_loo``, 1.x ``elpd``.

    :raises ValueError: when the log-likelihood holds one joint value per draw (a marginal likelihood:
        a GP, a collapsed BNN, any observation with a multivariate event), where PSIS-LOO would treat
        the whole data set as one observation.
    """
    if "log_likelihood" in group_names(idata):
        log_lik = get_group(idata, "log_likelihood")
        name = kwargs.get("var_name")
        names = [name] if name is not None else list(log_lik.data_vars)
        joint = [n for n in names if n in log_lik and set(log_lik[n].dims) <= {"chain", "draw"}]
        if joint and len(joint) == len(names):
            raise ValueError(
                f"the log-likelihood of {joint} is one joint value per draw, not one per data point (a "
                "marginal likelihood or a multivariate observation): PSIS-LOO needs pointwise values"
            )
    result = az.loo(idata, **kwargs)
    elpd = result.elpd if ARVIZ_MAJOR >= 1 else result.elpd_loo
    return float(elpd), float(result.se)


def plot_posterior(idata, var_names=None, **kwargs):
    """Marginal posterior densities with the installed ArviZ (``plot_posterior`` in 0.x,
    ``plot_dist`` in 1.x); ``coords`` and the other keywords go to that function."""
    if ARVIZ_MAJOR >= 1:
        return az.plot_dist(idata, var_names=var_names, **kwargs)
    return az.plot_posterior(idata, var_names=var_names, **kwargs)


def from_netcdf(path: str):
    """Load what :meth:`to_netcdf` wrote, in the installed ArviZ's container."""
    if ARVIZ_MAJOR >= 1:
        return xr.open_datatree(path, engine="h5netcdf").load()
    return az.from_netcdf(path)
