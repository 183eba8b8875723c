"""Posterior predictive summaries of a Bayesian last layer: regression moments, class
probabilities and out-of-distribution scores, from any guide or posterior samples."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch

from .._validation import check_finite, check_positive_int
from ..diagnostics import sample_guide
from .guide import LastLayerNormal
from .heads import GaussianHead
from .model import BayesianLastLayer, evaluation_mode
from .priors import ImplicitWeightPrior

__all__ = ["predict", "predictive_entropy"]


def _latent_draws(model, posterior, num_samples, X, y) -> dict[str, torch.Tensor]:
    if isinstance(posterior, dict):
        site = model.weight_site
        if isinstance(model.prior, ImplicitWeightPrior):
            site = f"{site}_latent"
        if site not in posterior:  # the model would draw it from the prior
            raise ValueError(f"posterior has no draws of the site {site!r}; its keys are {sorted(posterior)}")
        # Predictive pads each draw to the plate nesting, (S, 1, C, D): the draws of a site of event_ndim dims
        implicit = isinstance(model.prior, ImplicitWeightPrior)
        shape = (model.prior.latent_dim,) if implicit else tuple(model.weight_shape)
        draws = torch.as_tensor(posterior[site])
        while draws.dim() > 1 + len(shape) and draws.shape[1] == 1:
            draws = draws.squeeze(1)
        if draws.dim() != 1 + len(shape) or tuple(draws.shape[1:]) != shape:
            raise ValueError(f"posterior[{site!r}] has shape {tuple(draws.shape)}; expected (draws,) + {shape}")
        # the weights alone: Predictive(model, guide) also returns the deterministic f (and weights) and the
        # observed y of the training inputs, which conditioned the model at the new inputs
        return {site: draws}
    if isinstance(posterior, LastLayerNormal):
        if posterior.site != model.weight_site:  # another layer's guide: the model would draw from its prior
            raise ValueError(
                f"posterior is the guide of the site {posterior.site!r}; this model's weights are {model.weight_site!r}"
            )
        return {posterior.site: posterior.distribution().sample((num_samples,))}
    if y is None:
        raise ValueError("pass train=(X_train, y_train): this guide is sampled through the model with its data")
    if hasattr(posterior, "sample_paths"):  # AutoDiffusion: one batched simulation
        with torch.no_grad():
            paths = posterior.sample_paths(num_samples, X, y, log_target=False)
        flat = paths.z
        return {site["name"]: value.reshape((num_samples,) + site["value"].shape)
                for site, value in posterior._unpack_latent(flat)}  # fmt: skip
    samples, _ = sample_guide(posterior, model, num_samples, (X, y))
    return samples


def _chunks(draws: dict[str, torch.Tensor], size: int):
    total = next(iter(draws.values())).shape[0]
    for start in range(0, total, size):
        yield {k: v[start : start + size] for k, v in draws.items()}


def _f_at(model: BayesianLastLayer, draws: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``f`` at every draw, batched: the draws sit in a plate left of the data plate."""
    S = next(iter(draws.values())).shape[0]
    shaped = {k: v.reshape((S, 1) + v.shape[1:]) for k, v in draws.items()}
    with poutine.block(), pyro.plate("_pyro_gpx_draws", S, dim=-2):
        trace = poutine.trace(poutine.condition(model, data=shaped)).get_trace(X)
    f = trace.nodes[model.f_site]["value"]
    assert f is not None  # a deterministic site records its value
    return f.expand(S, X.shape[0], model.weight_shape[0])


def predict(
    model: BayesianLastLayer,
    posterior: Callable | dict[str, torch.Tensor],
    X: torch.Tensor,
    *,
    num_samples: int = 500,
    train: tuple[torch.Tensor, torch.Tensor] | None = None,
    draw_batch: int = 100,
) -> dict[str, torch.Tensor]:
    """Predictive summaries at ``X``.

    :param posterior: a trained guide or a dict of posterior samples (e.g. ``mcmc.get_samples()``)
        holding the weight site (``"<name>.weights"``, or ``"<name>.weights_latent"`` for an implicit
        prior); a dict without it raises ``ValueError``.
    :param train: ``(X_train, y_train)``, required for every guide but
        :class:`~pyro_gpx.bll.guide.LastLayerNormal`: they are sampled through the model with the data
        they were trained on (``AutoDiffusion`` simulates paths towards that data's posterior).
    :param num_samples: posterior draws from a guide (at least 2 for regression, whose variance needs
        a spread); not used for a dict of samples, but still checked to be a positive integer.
    :param draw_batch: draws evaluated per batched model run (bounds memory).
    :returns: ``"f"`` draws ``(S, n, C)``; regression: ``"mean"``, ``"var"`` (latent plus noise) and
        ``"noise"``; classification: ``"probs"`` (averaged over draws), ``"entropy"``, ``"max_prob"``.

    The model runs in eval mode (BatchNorm uses its running statistics and keeps them; dropout is
    off) and is returned to its mode afterwards.
    """
    if not isinstance(model, BayesianLastLayer):
        raise TypeError(f"model must be a BayesianLastLayer, got {type(model).__name__}")
    num_samples = check_positive_int("num_samples", num_samples)
    draw_batch = check_positive_int("draw_batch", draw_batch)
    regression = isinstance(model.head, GaussianHead)
    if regression and num_samples < 2 and not isinstance(posterior, dict):
        raise ValueError(f"num_samples must be at least 2 for a regression head (a variance), got {num_samples}")
    X_ref, y_ref = train if train is not None else (X, None)
    with torch.no_grad(), evaluation_mode(model):
        draws = _latent_draws(model, posterior, num_samples, X_ref, y_ref)
        site, latent = model.weight_site, f"{model.weight_site}_latent"
        draws = {k: v.detach() for k, v in draws.items() if k != site or latent not in draws}
        if not draws or next(iter(draws.values())).shape[0] < (2 if regression else 1):
            raise ValueError("posterior must hold at least 2 draws for a regression head (1 for classification)")
        f = torch.cat([_f_at(model, chunk, X) for chunk in _chunks(draws, draw_batch)])
    out = {"f": f}
    if regression:
        with model._pyro_context:  # the store's value (e.g. after pyro.get_param_store().load)
            noise = model.head.noise.detach().to(f.dtype)
        out.update(mean=f[..., 0].mean(0), var=f[..., 0].var(0) + noise, noise=noise)
        return out
    probs = f.softmax(-1).mean(0)
    out.update(probs=probs, entropy=predictive_entropy(probs), max_prob=probs.max(-1).values)
    return out


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """:math:`-\\sum_c p_c \\log p_c` of ``(..., C)`` probabilities (an out-of-distribution score)."""
    if not (isinstance(probs, torch.Tensor) and probs.is_floating_point()):
        raise TypeError(f"probs must be a floating-point tensor, got {getattr(probs, 'dtype', type(probs).__name__)}")
    check_finite("probs", probs)
    tol = max(1e-4, probs.shape[-1] * torch.finfo(probs.dtype).eps) if probs.dim() else 1e-4  # float32 round-off
    if (probs < 0).any() or (probs > 1).any() or ((probs.sum(-1) - 1).abs() > tol).any():
        raise ValueError("probs must lie in [0, 1] and sum to 1 along the last dimension")
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)
