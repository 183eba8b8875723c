r"""Batched training losses for :class:`~pyro_gpx.diffusion.guide.AutoDiffusion`, usable with ``pyro.infer.SVI``.

Both simulate ``num_paths`` paths at once (``Trace_ELBO`` draws one per particle call):

* :class:`PathELBO`: :math:`-\frac1B\sum_b \log w_b`, the reparameterised extended-space KL
  (the PIS/DDS objective);
* :class:`LogVarianceLoss`: :math:`\operatorname{Var}_b[\log w_b]` on paths simulated with the
  current drift *detached*, the drift (and the affine frame) then re-scored along the fixed
  paths [1]. It needs no
  gradient through the simulation, and is zero exactly when the sampler is perfect. It is not an
  evidence bound: train model parameters (empirical Bayes) with :class:`PathELBO`, which reaches
  them through the target density. It needs the full data: with a subsampled plate the minibatch
  noise in the log weights adds a variance that a narrower sampler makes smaller, so it is refused
  (:class:`PathELBO` is unbiased on minibatches).

Each has ``loss(model, guide, *args)`` and ``loss_and_grads(model, guide, *args)`` like Pyro's
ELBOs, so ``SVI(model, guide, optim, PathELBO(num_paths=256))`` trains the guide. The paths are
scored against the model the guide was built on (batched over paths), so ``model`` must be that
same object; anything else (say, a ``pyro.factor`` added in a wrapper around it) would be ignored,
and raises ``ValueError`` instead.

References:

[1] L. Richter, A. Boustati, N. Nüsken, F. Ruiz, Ö. Akyildiz. VarGrad: a low-variance gradient
    estimator for variational inference. NeurIPS 2020.
[2] L. Richter, J. Berner. Improved sampling via learned diffusions. ICLR 2024.
[3] M. Sendera, M. Kim, S. Mittal, P. Lemos, L. Scimeca, J. Rector-Brooks, A. Adam, Y. Bengio,
    N. Malkin. Improved off-policy training of diffusion samplers. NeurIPS 2024.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO

from .._validation import is_finite_at_least, is_integer
from .buffer import ReplayBuffer, langevin_search
from .guide import AutoDiffusion, _argument_stamp, _same_stamp

__all__ = ["PathELBO", "LogVarianceLoss"]


def _check(guide, model) -> AutoDiffusion:
    if not isinstance(guide, AutoDiffusion):
        raise TypeError(f"these losses train an AutoDiffusion guide, got {type(guide).__name__}")
    if model is not guide._raw_model[0]:
        # the paths are scored against the guide's own (batched) target density, never the model passed here
        raise ValueError(
            "the model passed to the loss is not the model the AutoDiffusion guide was built on; the loss "
            "scores paths against the guide's model, so build the guide on the model SVI trains "
            "(e.g. AutoDiffusion(model) with SVI(model, guide, ...), including any poutine wrapper)"
        )
    return guide


def _refuse_model_parameters(guide: AutoDiffusion, trace) -> None:
    """``ValueError`` if the loss reached trainable Pyro parameters that are not the guide's."""
    own = {id(p) for p in guide.parameters()}
    names = []
    for name, site in trace.nodes.items():
        if site["type"] != "param":
            continue
        value = site["value"]
        raw = value.unconstrained() if hasattr(value, "unconstrained") else value
        if raw.requires_grad and id(raw) not in own:
            names.append(name)
    if names:
        raise ValueError(
            f"LogVarianceLoss trains the guide only, but the model has trainable Pyro parameters {sorted(set(names))}: "
            "the variance of the log weights is not an evidence bound, so it must not fit them. Train them with "
            "PathELBO (or fix them, e.g. as constants)"
        )


def _finite(value: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(value):
        raise FloatingPointError(f"{what} became {float(value.detach())}")
    return value


class _BatchedPathLoss(ELBO):
    """A loss over ``num_paths`` batched paths (no per-particle traces), usable by ``SVI``."""

    min_paths = 1

    def __init__(self, num_paths: int = 128):
        if not is_integer(num_paths) or num_paths < self.min_paths:
            raise ValueError(f"num_paths must be an integer >= {self.min_paths}, got {num_paths!r}")
        super().__init__(num_particles=1)
        self.num_paths = num_paths

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):  # ELBO's abstract method; paths are batched instead
        raise NotImplementedError(f"{type(self).__name__} simulates batched paths; it has no per-particle trace")

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


class PathELBO(_BatchedPathLoss):
    """Negative extended-space ELBO, averaged over ``num_paths`` batched paths."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        path = _check(guide, model).sample_paths(self.num_paths, *args, **kwargs)
        return _finite(-path.log_weight.mean(), "the path ELBO loss")

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


class LogVarianceLoss(_BatchedPathLoss):
    """Variance of the log weights along paths simulated with the detached current drift.

    :param exploration: the training paths' Gaussian increments are multiplied by this factor (1: on
        policy). The loss is zero for a perfect sampler whatever paths it is evaluated on, so wider
        paths are a valid way to make the sampler find mass it does not yet cover [2].
    :param buffer: a :class:`~pyro_gpx.diffusion.buffer.ReplayBuffer`: the end points of the forward
        paths are added to it, and once it holds ``num_paths`` points a share ``backward_fraction`` of
        each batch is paths of the reference run *backwards* from replayed points
        (:meth:`~pyro_gpx.diffusion.guide.AutoDiffusion.backward_paths`) [3]. These reach mass that the
        sampler has lost, where its own paths never go.
    :param backward_fraction: that share, in (0, 1).
    :param search_steps: Metropolis-adjusted Langevin steps (:func:`~pyro_gpx.diffusion.buffer.langevin_search`)
        run on the distinct points of ``num_paths`` replays every ``search_every`` calls; the results are
        added to the buffer (or replace their starting points, ``search_in_place``). The step size adapts
        towards an acceptance rate of 0.574.
    :param search_every: calls between local searches.
    :param search_in_place: the searched points replace their starting points (the buffer is then a
        population of Langevin chains) instead of being added next to them.
    """

    min_paths = 2  # a variance

    def __init__(self, num_paths: int = 128, exploration: float = 1.0, buffer: ReplayBuffer | None = None,
                 backward_fraction: float = 0.5, search_steps: int = 0, search_every: int = 1,
                 search_in_place: bool = False):  # fmt: skip
        super().__init__(num_paths)
        if not is_finite_at_least(exploration, 0.0, strict=True):
            raise ValueError(f"exploration must be a finite positive number, got {exploration!r}")
        if not 0 < backward_fraction < 1:
            raise ValueError(f"backward_fraction must be in (0, 1), got {backward_fraction!r}")
        if not is_integer(search_steps) or search_steps < 0:
            raise ValueError(f"search_steps must be an integer >= 0, got {search_steps!r}")
        if not is_integer(search_every) or search_every < 1:
            raise ValueError(f"search_every must be an integer >= 1, got {search_every!r}")
        if buffer is not None and not isinstance(buffer, ReplayBuffer):
            raise TypeError(f"buffer must be a ReplayBuffer or None, got {type(buffer).__name__}")
        if buffer is None and search_steps:
            raise ValueError("search_steps needs a buffer to search from and add to")
        self.exploration = float(exploration)
        self.buffer, self.backward_fraction = buffer, float(backward_fraction)
        self.search_steps, self.search_every = int(search_steps), int(search_every)
        self.search_step_size, self.calls, self.search_in_place = 0.01, 0, bool(search_in_place)
        self._full_data: tuple | None = None  # the latest arguments found to subsample no plate

    def _check_full_data(self, guide: AutoDiffusion, args: tuple, kwargs: dict) -> None:
        """Refuse a subsampled plate: a minibatch's noise n_b adds E_b Var_q(n_b) to the expected loss,
        which a narrower sampler makes smaller, so the minimiser is not the posterior (trained on 20 of
        1 000 points, a sampler family holding the exact posterior converged to 0.35 times its sd)."""
        stamp = _argument_stamp(args, kwargs)
        if _same_stamp(self._full_data, stamp):
            return
        partial = guide._subsampled_plates(args, kwargs)
        if partial:
            raise ValueError(
                f"LogVarianceLoss needs the full-data likelihood, but the model subsamples {', '.join(partial)} "
                "with these arguments: the variance of minibatch log weights is not minimised by the "
                "posterior. Train on minibatches with PathELBO, or pass arguments that use all the data"
            )
        self._full_data = stamp

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        guide = _check(guide, model)
        self._check_full_data(guide, args, kwargs)
        buffer, num_backward = self.buffer, self.num_backward()
        num_forward = self.num_paths - num_backward
        states = guide.explore_paths(num_forward, *args, noise_scale=self.exploration, **kwargs)
        if num_backward:
            assert buffer is not None  # num_backward() is 0 without a buffer
            states = torch.cat([states, guide.backward_paths(buffer.sample(num_backward)[0])])
        # re-scored inside the guide's Pyro context, so that SVI sees (and steps) its parameters
        with poutine.trace(param_only=True) as capture:
            path = guide.rescore_paths(states, *args, **kwargs)
        _refuse_model_parameters(guide, capture.trace)
        if buffer is not None:
            buffer.add(path.z[:num_forward].detach(), path.log_target[:num_forward].detach())
            self.calls += 1
            if self.search_steps and self.calls % self.search_every == 0:
                self._search(guide, args, kwargs)
        return _finite(path.log_weight.var(), "the log-variance loss")

    def num_backward(self) -> int:
        """Paths of the next batch replayed backwards: none until the buffer holds ``num_paths`` points."""
        if self.buffer is None or len(self.buffer) < self.num_paths:
            return 0
        return min(max(round(self.backward_fraction * self.num_paths), 1), self.num_paths - 1)

    def _search(self, guide, args, kwargs) -> None:
        target, buffer = guide.target(*args, **kwargs), self.buffer
        assert buffer is not None  # searches run only with a buffer
        index = buffer.sample_index(self.num_paths).unique()
        points = buffer.z
        assert points is not None  # sample_index raises on an empty buffer

        def log_density(z):  # a proposal where the density is not finite is rejected, not an error
            return target.log_density(z, strict=False)

        z, log_target, accept = langevin_search(log_density, points[index], self.search_steps, self.search_step_size)
        self.search_step_size *= 1.1 if accept > 0.574 else 0.9
        if self.search_in_place:
            buffer.update(index, z, log_target)
        else:
            buffer.add(z, log_target)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The on-policy variance of the log weights of ``num_paths`` fresh paths (what
        ``SVI.evaluate_loss`` reports): the quantity to monitor, zero for a perfect sampler. It
        leaves the buffer alone and ignores ``exploration`` and the replayed paths, so it is not
        the value ``SVI.step`` returns, which is measured on the training paths."""
        guide = _check(guide, model)
        self._check_full_data(guide, args, kwargs)
        with torch.no_grad():
            path = guide.sample_paths(self.num_paths, *args, **kwargs)
        return float(path.log_weight.var())
