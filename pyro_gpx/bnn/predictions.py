"""ArviZ export of BNN posteriors in the original weight space, with predictions at new inputs.

:func:`~pyro_gpx.diagnostics.to_inference_data` scores the observed sites of a model run on its
arguments; at new inputs without targets the model's ``"y"`` is an unobserved site with no posterior
draws, which it refuses. :func:`predictions_to_inference_data` instead maps the draws of a plain,
repriorised or collapsed :class:`~pyro_gpx.bnn.mlp.BayesianMLP` to the original readout (with the
training data) and evaluates the network at the new inputs, for ArviZ's ``predictions`` group.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from pyro.infer import MCMC

from .._validation import check_finite, check_positive_int
from ..diagnostics import mcmc_sample_stats
from ..diagnostics.arviz_compat import build_inference_data
from .chains import ChainsResult
from .collapsed import CollapsedModel
from .mlp import BayesianMLP, RepriorisedModel

__all__ = ["predictions_to_inference_data"]


def predictions_to_inference_data(
    model: BayesianMLP | RepriorisedModel | CollapsedModel,
    posterior: Mapping[str, torch.Tensor] | ChainsResult | MCMC,
    X_new: torch.Tensor,
    *,
    group_by_chain: bool = False,
    generator: torch.Generator | None = None,
    draw_batch: int = 100,
):
    r"""ArviZ data with the original-space weights and posterior predictions at ``X_new``.

    Groups:

    * ``posterior``: the draws as given plus ``"readout"``, the readout in the original coordinates,
      ``(chain, draw, out_dim, D)``: the draws' own for a plain model; for a repriorised model their
      ``"readout_whitened"`` mapped back with the training data; for a collapsed model one exact
      draw from its conditional posterior given the hidden weights, noise and training data
      (:meth:`~pyro_gpx.bnn.collapsed.CollapsedModel.readout_draws`);
    * ``predictions``: ``"f"``, the network output at ``X_new`` (logits for a categorical model),
      ``(chain, draw, data, output)``, and ``"y"``, one observation drawn at each ``f`` (``(chain,
      draw, data)``; ``(chain, draw, data, output)`` for several Gaussian outputs);
    * ``predictions_constant_data``: ``"X"``, the new inputs;
    * ``sample_stats`` of a :class:`~pyro_gpx.bnn.chains.ChainsResult` or an ``MCMC`` run.

    :param model: the model the draws came from. A repriorised or collapsed model needs its training
        data: it keeps those of its first call with targets (e.g. the MCMC run in this process),
        :func:`~pyro_gpx.bnn.chains.run_chains` sets them, or call ``set_training_data(X, y)``.
    :param posterior: a dict of draws (``(draw, ...)``, or ``(chain, draw, ...)`` with
        ``group_by_chain=True``), a :class:`~pyro_gpx.bnn.chains.ChainsResult` or a finished ``MCMC``.
    :param X_new: ``(m, in_dim)`` new inputs.
    :param generator: the random stream of the collapsed readout draws, then of the ``"y"`` draws.
    :param draw_batch: draws evaluated together at ``X_new`` (memory: ``draw_batch x m x width``).
    :returns: ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).

    Example::

        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro_gpx.diagnostics import get_group
        >>> X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
        >>> model = BayesianMLP(1, [8], noise=0.05).repriorised()
        >>> mcmc = MCMC(NUTS(model, max_tree_depth=3), num_samples=10, warmup_steps=10, disable_progbar=True)
        >>> mcmc.run(X, torch.sin(3 * X[:, 0]))
        >>> idata = predictions_to_inference_data(model, mcmc, torch.zeros(5, 1, dtype=torch.float64))
        >>> dict(get_group(idata, "predictions")["y"].sizes)
        {'chain': 1, 'draw': 10, 'data': 5}
    """
    draw_batch = check_positive_int("draw_batch", draw_batch)  # a negative one returned uninitialised memory
    bnn = model.model if isinstance(model, (RepriorisedModel, CollapsedModel)) else model
    if not isinstance(bnn, BayesianMLP):
        raise TypeError(f"model must be a BayesianMLP, RepriorisedModel or CollapsedModel, got {type(model).__name__}")
    check_finite("X_new", X_new)
    bnn.check_data(X_new)
    stats: dict[str, np.ndarray] = {}
    if isinstance(posterior, ChainsResult):
        samples, stats = dict(posterior.samples), dict(posterior.sample_stats)
    elif isinstance(posterior, MCMC):
        samples, stats = posterior.get_samples(group_by_chain=True), mcmc_sample_stats(posterior)
    elif isinstance(posterior, Mapping):
        samples = {k: torch.as_tensor(v) for k, v in posterior.items()}
        if not group_by_chain:
            samples = {k: v.unsqueeze(0) for k, v in samples.items()}
    else:
        raise TypeError(f"posterior must be a dict of draws, a ChainsResult or an MCMC, got {type(posterior).__name__}")
    if not samples:
        raise ValueError("the posterior has no draws")
    batch = next(iter(samples.values())).shape[:2]
    if isinstance(model, CollapsedModel):
        readout = model.readout_draws(samples, generator)
    elif isinstance(model, RepriorisedModel):
        readout = model.readout_draws(samples)
    elif "readout" in samples:
        bnn.check_samples(samples)  # the hidden weights (and a latent noise) must be there too
        readout = samples["readout"]
    else:
        raise ValueError("samples lack the site 'readout'")
    if readout.shape != batch + (bnn.out_dim, bnn.feature_dim):
        raise ValueError(f"readout draws have shape {tuple(readout.shape)}, expected (chain, draw, out_dim, D)")
    f, y = _predict(bnn, samples, readout.to(bnn.dtype), X_new, generator, draw_batch)
    posterior_group = {k: v.detach().cpu().numpy() for k, v in samples.items()}
    posterior_group["readout"] = readout.cpu().numpy()
    groups = {
        "posterior": posterior_group,
        "predictions": {"f": f.numpy(), "y": y.numpy()},
        "predictions_constant_data": {"X": X_new.detach().cpu().numpy()},
        "sample_stats": {k: np.asarray(v) for k, v in stats.items()},
    }
    dims = {"f": ["data", "output"], "y": ["data"] if y.dim() == 3 else ["data", "output"], "X": ["data", "feature"]}
    attrs = {"inference_library": "pyro", "creation_library": "pyro_gpx"}
    return build_inference_data(groups, dims=dims, attrs=attrs)


def _predict(bnn: BayesianMLP, samples, readout, X_new, generator, draw_batch: int):
    """``f`` ``(chain, draw, m, out)`` at the new inputs and one observation drawn at each."""
    batch, num = readout.shape[:2], readout.shape[0] * readout.shape[1]
    flat = {k: v.reshape((num,) + v.shape[2:]) for k, v in samples.items() if k.startswith("layers.")}
    flat_readout = readout.reshape((num,) + readout.shape[2:])
    for name, value in [*flat.items(), ("readout", flat_readout)]:
        check_finite(f"the draws of {name!r}", value)  # a NaN draw gave NaN predictions silently
    f = torch.empty(num, X_new.shape[0], bnn.out_dim, dtype=bnn.dtype)
    with torch.no_grad():
        for start in range(0, num, draw_batch):
            part = slice(start, start + draw_batch)
            Phi = bnn.features(X_new, {k: v[part] for k, v in flat.items()})
            f[part] = Phi @ flat_readout[part].transpose(-1, -2)
        if bnn.likelihood == "categorical":
            probs = torch.softmax(f, -1).reshape(-1, bnn.out_dim)
            y = torch.multinomial(probs, 1, generator=generator).reshape(f.shape[:-1])
        else:
            if bnn.noise is None:
                noise = samples["noise"].reshape(num).to(bnn.dtype)
                if not (torch.isfinite(noise).all() and (noise > 0).all()):
                    raise ValueError("the draws of 'noise' must be positive and finite")
            else:
                noise = torch.full((num,), bnn.noise, dtype=bnn.dtype)
            eps = torch.randn(f.shape, generator=generator, dtype=bnn.dtype)
            y = f + noise.sqrt()[:, None, None] * eps
            y = y[..., 0] if bnn.out_dim == 1 else y
    return f.reshape(batch + f.shape[1:]), y.reshape(batch + y.shape[1:])
