"""The few ArviZ calls whose spelling differs between ArviZ 0.x and 1.x, for the tests.

The package builds its ArviZ objects with xarray on either version
(:mod:`pyro_gpx.diagnostics.arviz_compat`); these helpers let the tests check them with the
installed ArviZ's own statistics: ``loo`` returns ``ELPDData`` keyed ``elpd_loo`` / ``loo_i`` on 0.x
and an object with ``elpd`` / ``elpd_i`` attributes on 1.x, ``from_dict`` takes the groups as
keywords on 0.x and as one dict on 1.x, and ``rhat`` returns a ``Dataset`` on 0.x and a
``DataTree`` on 1.x. ArviZ 1.x has no WAIC.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import xarray as xr

from pyro_gpx.diagnostics.arviz_compat import ARVIZ_MAJOR

HAS_WAIC = hasattr(az, "waic")


def loo(idata) -> tuple[float, np.ndarray]:
    """PSIS-LOO: the total ``elpd_loo`` and the pointwise values."""
    result = az.loo(idata, pointwise=True)
    if ARVIZ_MAJOR >= 1:
        return float(result.elpd), np.asarray(result.elpd_i)
    return float(result["elpd_loo"]), np.asarray(result["loo_i"])


def loo_pit(idata, name: str) -> np.ndarray:
    """The LOO probability integral transform of observed variable ``name``, per point."""
    if ARVIZ_MAJOR >= 1:
        result = az.loo_pit(idata, var_names=[name])
        if isinstance(result, xr.DataTree):
            result = result.to_dataset()
        return np.asarray(result[name])
    return np.asarray(az.loo_pit(idata, y=name))


def from_dict(groups: dict[str, dict[str, np.ndarray]]):
    """ArviZ's own container built by ArviZ from ``{group: {name: array}}`` (an independent reference)."""
    if ARVIZ_MAJOR >= 1:
        return az.from_dict(groups)
    return az.from_dict(**groups)


def max_rhat(idata, var_names: list[str]) -> float:
    """The largest R-hat over ``var_names``."""
    result = az.rhat(idata, var_names=var_names)
    if isinstance(result, xr.DataTree):
        result = result.to_dataset()
    return max(float(value.max()) for value in result.data_vars.values())
