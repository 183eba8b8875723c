r"""``AutoDiffusion``: a Pyro autoguide whose samples are the end points of a learned SDE.

The guide works in the unconstrained, flattened latent space of the model (as
:class:`~pyro.infer.autoguide.AutoContinuous`, which it extends: constrained sites get their
transforms and log-Jacobians, plates are handled, ``Predictive`` works). A batch of standard-normal
increments :math:`\epsilon` (one auxiliary site) drives the discretised controlled SDE of
:mod:`~pyro_gpx.diffusion.processes` from :math:`z_0` to :math:`z_K`; the latent is emitted as

.. code-block:: python

    pyro.sample("_AutoDiffusion_latent", dist.Delta(z_K, log_density=L - log N(eps), event_dim=1))

with :math:`L = \log p_{F,0}(z_0) + \sum_k \log p_F(z_{k+1}\mid z_k) - \sum_k\log p_B(z_k\mid z_{k+1})`.
The guide's density is therefore the path ratio, and ``Trace_ELBO`` optimises the extended-space
ELBO :math:`\mathbb{E}[\log\rho(z_K) - L] \le \log Z` exactly, by reparameterised gradients through
the simulated path (PIS/DDS/DIS training).

The process runs in a learned affine frame, :math:`z = m + S y` (``loc`` :math:`m` starts at
the ``init_loc_fn`` point, :math:`S` at ``init_scale`` times the identity): the SDE carries :math:`y`,
the drift sees the score :math:`S^\top\nabla\log\rho(z)`, and the path density gains
:math:`-\log|\det S|`. :math:`S` is diagonal (``affine="diagonal"``, ``scale`` :math:`s`) or lower
triangular with a positive diagonal (``affine="full"``, ``scale_tril`` :math:`L`). Adapting the frame is
a cheap preconditioner: a target whose posterior is far from the origin, badly scaled (a funnel's neck
variable) or strongly correlated (a regression's coefficients) no longer has to be reached by the
drift network alone; with a zero drift the DDS guide is exactly the Gaussian :math:`N(m, \sigma^2 SS^\top)`,
so ``affine="full"`` contains ``AutoMultivariateNormal``'s family and the drift learns what is not
Gaussian (DIS's untrained chain is only close to that Gaussian: its Euler-Maruyama steps are not exactly
stationary). A normalising flow :math:`f` may follow the affine map (``flow=``): :math:`z = f(m + S y)`,
and every path gains :math:`-\log|\det \partial f|` at its end point. With a zero drift and the PIS
defaults (:math:`\sigma = T = 1`, so :math:`y_K \sim N(0, I)`) the guide is then exactly the flow's
own guide; a flow trained first (e.g. ``AutoIAFNormal``'s transform) is a warm start that the drift
only has to improve on.
Batched losses and the evidence estimate live in :mod:`~pyro_gpx.diffusion.losses`.

Saving and loading: both of Pyro's routes restore a guide exactly (same seed, same paths), into a fresh
guide built with the same arguments: ``pyro.get_param_store().save(path)`` and, later,
``pyro.get_param_store().load(path)`` (the guide takes every parameter, the drift network's and a flow's
included, from the store at its next call); or ``torch.save(guide.state_dict(), path)`` and
``guide.load_state_dict(torch.load(path))``, before or after the guide's first call (before it, the
state is kept and loaded once the guide has set itself up), into a guide whose parameters are not in the
param store (a new process, or after ``pyro.clear_param_store()``): as for every ``PyroModule``, values
in the param store take precedence. Setting a guide up draws random numbers (``init_to_median``, the
network's initial weights), so seed after its first call to compare samples. With ``affine="fixed"``
the frame is a pair of buffers, not parameters, so only the ``state_dict`` route restores it (the
param store route would rebuild it from a new random ``init_to_median``); so are a flow's random
buffers (e.g. ``affine_autoregressive``'s permutation and masks), which the param store route restores
only if the fresh guide is set up under the same seed. A reloaded guide sets itself up at its first
call, so make that call with the training data's arguments (``guide(X, y)``): a first call without
targets would make them latent sites.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import cast

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import ComposeTransform, IndependentTransform, Transform, biject_to
from pyro.distributions.util import is_validation_enabled
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam, pyro_method
from pyro.nn.module import to_pyro_module_
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

from .._validation import is_bool, is_finite_at_least, is_integer
from ..diagnostics.model_structure import quiet_trace
from .drift import DriftNet
from .processes import make_process
from .target import UnconstrainedTarget, plate_context

__all__ = ["AutoDiffusion", "PathSample", "importance_estimate"]


def _blocks_sample_sites(model) -> bool:
    """Whether ``model`` is wrapped in a ``poutine.block`` that hides sample sites it is not told about
    (as ``poutine.block(model, expose=[...])`` does)."""
    # a partial message (no distribution): enough for the hide_fn of poutine.block
    probe = cast(Message, {"type": "sample", "name": "_pyro_gpx_probe", "is_observed": False, "fn": None, "infer": {}})
    for _ in range(64):  # unwrap poutine handlers: partial(_context_wrap, messenger, fn)
        if not isinstance(model, functools.partial):
            return False
        if len(model.args) == 2 and isinstance(model.args[0], BlockMessenger):
            try:
                if model.args[0].hide_fn(probe):
                    return True
            except (KeyError, TypeError, AttributeError):  # a custom hide_fn: assume it hides sites
                return True
        model = model.args[1] if len(model.args) == 2 else model.func
    return False


def importance_estimate(log_weights: torch.Tensor) -> dict:
    """:math:`\\widehat{\\log Z} = \\log\\frac1N\\sum_i w_i` from log importance weights ``(N,)`` (of
    any proposal: paths of :class:`AutoDiffusion`, draws of another guide), with the delta-method
    standard error :math:`\\operatorname{sd}(w)/(\\sqrt N\\,\\bar w)`, the mean log weight (the ELBO)
    and the effective sample size :math:`(\\sum w)^2/\\sum w^2`.

    :returns: ``{"log_z", "stderr", "elbo", "ess", "num_paths"}``.
    """
    if not isinstance(log_weights, torch.Tensor) or log_weights.dim() != 1 or log_weights.numel() == 0:
        raise ValueError(
            f"log_weights must be a non-empty (N,) tensor, got {getattr(log_weights, 'shape', log_weights)}"
        )
    if not log_weights.is_floating_point():  # integer log weights: exact in float64
        log_weights = log_weights.double()
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError("log_weights holds NaN or +inf: the weights of these paths are undefined")
    n = log_weights.numel()
    log_z = torch.logsumexp(log_weights, 0) - math.log(n)
    normalised = torch.exp(log_weights - log_z)
    if n < 2 or not torch.isfinite(log_z):  # one weight, or none with mass: no error to estimate
        ess = 0.0 if not torch.isfinite(log_z) else 1.0
        return {"log_z": float(log_z), "stderr": math.inf, "elbo": float(log_weights.mean()), "ess": ess,
                "num_paths": n}  # fmt: skip
    return {"log_z": float(log_z), "stderr": float(normalised.std() / math.sqrt(n)), "elbo": float(log_weights.mean()),
            "ess": float(normalised.sum() ** 2 / (normalised**2).sum()), "num_paths": n}  # fmt: skip


class PathSample(dict):
    """Batched paths: ``z`` ``(B, D)`` latents, ``log_path`` ``(B,)`` (:math:`L`, the log density of
    ``z`` under the sampler), ``log_target`` ``(B,)`` (:math:`\\log\\rho(z)`, if computed), ``log_weight``
    ``(B,)``, and ``states`` ``(B, K+1, D)`` (process states :math:`y_k`, with
    :math:`z = m + s\\odot y_K`) / ``eps`` ``(B, K+1, D)`` when kept."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:  # hasattr, getattr with a default and copy need AttributeError
            raise AttributeError(name) from None


def _observed_sites(model, args: tuple, kwargs: dict) -> set[str]:
    """The observed sample sites of one quiet run of ``model``."""
    trace = quiet_trace(model, args, kwargs)
    return {name for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]}


def _none_pattern(args: tuple, kwargs: dict) -> tuple:
    """Which arguments are ``None`` (e.g. targets left out to predict): a hashable summary."""
    return tuple(a is None for a in args), tuple(sorted((k, v is None) for k, v in kwargs.items()))


def _argument_stamp(args: tuple, kwargs: dict) -> tuple:
    """The arguments with each tensor's version counter, into tuples, lists and dicts (a dict or list
    argument changed in place is new data): equal stamps (tensors compared by identity) mean the same,
    unmodified data. Holding the objects keeps their ids from being reused."""
    return tuple(sorted(kwargs)), _stamp_item(list(args) + [kwargs[k] for k in sorted(kwargs)])


def _stamp_item(a):
    if torch.is_tensor(a):
        return ("tensor", a, a._version)
    if isinstance(a, list | tuple):
        return ("sequence", type(a), tuple(_stamp_item(x) for x in a))
    if isinstance(a, dict):
        return ("dict", type(a), tuple((k, _stamp_item(v)) for k, v in a.items()))
    return ("item", a)


def _same_stamped(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return a[1] is b[1] and a[2] == b[2]
    if a[0] == "sequence":
        return a[1] is b[1] and len(a[2]) == len(b[2]) and all(map(_same_stamped, a[2], b[2]))
    if a[0] == "dict":
        return (a[1] is b[1] and len(a[2]) == len(b[2])
                and all(k == q and _same_stamped(v, w) for (k, v), (q, w) in zip(a[2], b[2])))  # fmt: skip
    return _same_item(a[1], b[1])


def _same_stamp(stamp: tuple | None, other: tuple) -> bool:
    return stamp is not None and stamp[0] == other[0] and _same_stamped(stamp[1], other[1])


def _same_item(a, b) -> bool:
    """The same object, or equal plain values (a tensor only as the same object)."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. an array's elementwise comparison
        return False


def _effective_settings(settings: dict) -> dict:
    """The settings in effect: the default horizon (1) for ``None``, and no beta schedule for PIS nor time
    grid for DDS and DIS (their values there change nothing, so loading must not compare them)."""
    out = dict(settings)
    if "horizon" in out and out["horizon"] is None:
        out["horizon"] = 1.0
    for key in ("beta_min", "beta_max") if out.get("process") == "pis" else ("grid_power",):
        out.pop(key, None)
    return out


class AutoDiffusion(AutoContinuous):
    """Diffusion-sampler posterior over all continuous latent sites of ``model``.

    :param process: ``"pis"`` (Brownian reference), ``"dds"`` (variance-preserving reference,
        exponential-integrator steps) or ``"dis"`` (the time reversal of the same reference with
        Euler-Maruyama forward and backward kernels, Berner, Richter and Ullrich; every step must
        contract, :math:`\\bar\\beta_k \\Delta t / 2 < 1` for the step-mean :math:`\\bar\\beta_k`, so
        ``num_steps >= 10`` with the default schedule). See :mod:`~pyro_gpx.diffusion.processes`.
    :param num_steps: time steps :math:`K` (an integer >= 1).
    :param sigma: diffusion scale :math:`\\sigma` (PIS) / reference stationary scale (DDS, DIS).
    :param horizon: :math:`T` (PIS only, default 1; the time scale of DDS and DIS is set by
        ``beta_min, beta_max``, so giving them another horizon is an error).
    :param grid_power: PIS's time grid :math:`t_k = T(1 - (1 - k/K)^p)` (``1``: uniform; ``p > 1``:
        shorter final steps, so less final noise; see :func:`~pyro_gpx.diffusion.processes.make_process`).
        On Neal's funnel ``p = 2`` took PIS-KL's log Z error from −0.43 / −0.36 to −0.34 / −0.30 (two seeds,
        ``benchmarks/samplers.py --grid-power 2``).
    :param hidden: width of the drift network's hidden layers.
    :param depth: number of its hidden layers.
    :param use_score: feed :math:`\\nabla\\log\\rho` to the drift (one model gradient per step). Turn
        it off inside an ``AutoGuideList``: there the guide sees a blocked model, whose score misses
        the other guides' sites (they are redrawn from their priors; hidden observations are dropped).
        A guide that is part of another autoguide, or built on a ``poutine.block(model, expose=...)``,
        warns at set-up if it is left on.
    :param beta_min: DDS / DIS noise schedule, its smallest rate.
    :param beta_max: its largest rate.
    :param affine: the learned frame :math:`z = m + S y`: ``"diagonal"`` (:math:`D` scales),
        ``"full"`` (lower-triangular :math:`S`, :math:`D(D+1)/2` parameters, for correlated
        posteriors) or ``"fixed"`` (:math:`m, S` keep their initial values).
    :param init_scale: initial :math:`S = \\text{init\\_scale}\\cdot I`.
    :param vectorized: whether the model runs batched under a plate over paths; ``None`` probes it
        (batched against row-by-row evaluation), which a model with internal randomness (e.g. the
        simulated flow of :class:`~pyro_gpx.diffgp.DifferentialGP`) cannot pass: say ``True`` for it.
    :param drift_clip: softly bound the drift network's output (see :class:`~pyro_gpx.diffusion.drift.DriftNet`).
    :param flow: a bijection of the unconstrained latent space applied after the affine frame,
        :math:`z = f(m + S y)`: a :class:`~pyro.distributions.torch_transform.TransformModule` (trained
        with the guide; e.g. a trained ``AutoIAFNormal``'s ``transform``, as a warm start) or a
        callable ``latent_dim -> TransformModule``. With a flow, the score fed to the drift is that
        of the pulled-back density :math:`\\nabla_y[\\log\\rho(z) + \\log|\\det\\partial z/\\partial y|]`
        (detached); on Neal's funnel that score made training diverge, and ``use_score=False`` with a
        ``drift_clip`` trained stably. A fresh flow (e.g. ``flow=affine_autoregressive``) is trained jointly
        with the drift: on Neal's funnel the drift halved the KL of the same flow trained alone, and the
        log Z error was -0.14 to -0.19 over five seeds (``benchmarks/samplers.py``, ``PIS-KL+IAF``).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoDiffusion(model, num_steps=8, hidden=16)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        >>> loss = svi.step()
        >>> guide()["x"].shape
        torch.Size([2])

    In the frame of a normalising flow (with a zero drift it is exactly the flow's guide)::

        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> guide = AutoDiffusion(model, num_steps=8, hidden=16, flow=affine_autoregressive, use_score=False)
        >>> guide()["x"].shape
        torch.Size([2])
    """

    def __init__(
        self,
        model,
        process: str = "pis",
        num_steps: int = 64,
        sigma: float = 1.0,
        horizon: float | None = None,
        hidden: int = 128,
        depth: int = 2,
        use_score: bool = True,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        init_loc_fn=init_to_median,
        affine: str = "diagonal",
        init_scale: float = 1.0,
        vectorized: bool | None = None,
        drift_clip: float | None = None,
        flow=None,
        grid_power: float = 1.0,
    ):
        if not is_finite_at_least(init_scale, 0.0, strict=True):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        for arg, value in (("hidden", hidden), ("depth", depth)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        if not is_bool(use_score):  # the string "no" would count as True
            raise TypeError(f"use_score must be True or False, got {use_score!r}")
        if not (vectorized is None or is_bool(vectorized)):
            raise TypeError(f"vectorized must be True or False or None, got {vectorized!r}")
        use_score, vectorized = bool(use_score), None if vectorized is None else bool(vectorized)
        if drift_clip is not None and not is_finite_at_least(drift_clip, 0.0, strict=True):
            raise ValueError(f"drift_clip must be a positive finite number or None, got {drift_clip!r}")
        if affine not in ("fixed", "diagonal", "full"):
            raise ValueError(f"affine must be 'fixed', 'diagonal' or 'full', got {affine!r}")
        if flow is not None and not callable(flow):
            raise TypeError(f"flow must be a TransformModule or a callable latent_dim -> TransformModule, got {flow!r}")
        self.affine, self._init_scale = affine, float(init_scale)
        self._flow_spec = (flow,)  # a tuple: the module is registered only once the prototype is set up
        self.process = make_process(process, num_steps, sigma, horizon, beta_min, beta_max, grid_power)
        # the settings a trained drift belongs to that no parameter shape records: saved with the state
        self._settings = _effective_settings({
            "process": process, "num_steps": int(num_steps), "sigma": float(sigma),
            "horizon": None if horizon is None else float(horizon), "beta_min": float(beta_min),
            "beta_max": float(beta_max), "grid_power": float(grid_power),
            "drift_clip": None if drift_clip is None else float(drift_clip)})  # fmt: skip
        self._net_config = {"hidden": hidden, "depth": depth, "use_score": use_score, "drift_clip": drift_clip}
        super().__init__(model, init_loc_fn=init_loc_fn)
        # self.model is wrapped in an InitMessenger, which costs at every trace; a tuple keeps a PyroModule
        # model from being registered as a submodule (as AutoGuide does)
        self._raw_model = (model,)
        self._vectorized = vectorized
        # plate nesting, and per enclosing-plate context whether the model runs batched
        self._target_info: dict = {"vectorized": {}}
        self._pending_state = None  # a state dict given before set-up
        # the arguments of the latest call with the training data's structure: the posterior the drift
        # learned is that data's, so a prediction call (targets None) takes its score from them
        self._train_call: tuple | None = None
        self._observed_sites: frozenset = frozenset()
        self._missing_by_pattern: dict = {}
        self._checked_data: tuple | None = None  # the arguments whose observed values were last checked
        self._quick_checks: dict[str, str] | None = None  # UnconstrainedTarget.check_observed's record
        self._data_changed = False  # gradient calls saw different data objects (minibatches?)
        self._setting_data = False  # inside set_training_data
        self._masked_non_finite: set[str] = set()  # observed sites with NaN placeholders seen by this call's score

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(f"AutoDiffusion needs continuous latents; site {name!r} is discrete")
        if self._net_config["use_score"] and (self.master is not None or _blocks_sample_sites(self._raw_model[0])):
            warnings.warn(
                "AutoDiffusion sees a blocked model (it is part of an AutoGuideList, or its model is a "
                "poutine.block): the score fed to its drift omits the hidden sites (other guides' latents are "
                "redrawn from their priors, hidden observations are dropped), so it is not the posterior's "
                "score. Pass use_score=False.",
                UserWarning,
                stacklevel=4,
            )
        dtype = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"].dtype
        drift = DriftNet(self.latent_dim, **self._net_config).to(dtype)
        to_pyro_module_(drift)
        self.drift = drift
        loc = self._init_loc().detach()
        scale = torch.full_like(loc, self._init_scale)
        if self.affine == "fixed":
            self.register_buffer("loc", loc)
            self.register_buffer("scale", scale)
        elif self.affine == "diagonal":
            self.loc = PyroParam(loc)
            self.scale = PyroParam(scale, constraint=constraints.softplus_positive)
        else:
            self.loc = PyroParam(loc)
            self.scale_tril = PyroParam(torch.diag(scale), constraint=constraints.softplus_lower_cholesky)
        self._target_info = {"vectorized": {}}
        try:  # the prototype trace hides the observed sites
            self._observed_sites = frozenset(_observed_sites(self._raw_model[0], args, kwargs))
        except Exception:  # a model that fails at some prior draw: prediction calls keep their own arguments
            self._observed_sites = frozenset()
        self._train_call = (_none_pattern(args, kwargs), args, kwargs)
        self._missing_by_pattern = {}
        self._checked_data = None
        self._quick_checks = None
        self._data_changed = False
        flow = self._flow_spec[0]
        if flow is not None and not isinstance(flow, torch.distributions.Transform):
            flow = flow(self.latent_dim)
        if flow is not None and not (flow.bijective and flow.domain.event_dim == 1):
            raise ValueError(f"flow must be a bijection of vectors (event_dim 1), got {flow!r}")
        self.flow = flow  # a plain nn.Module child: its parameters are registered by pyro.module on access
        if self._pending_state is not None:
            state, strict, assign = self._pending_state
            self._pending_state = None
            saved = state.get("loc", state.get("loc_unconstrained"))
            if saved is not None and saved.numel() != self.latent_dim:
                raise ValueError(
                    f"the loaded state is for {saved.numel()} latent dimensions, but this first call makes "
                    f"{self.latent_dim}: call the guide first with the training data's arguments (a call "
                    "without targets makes them latent sites)"
                )
            self.load_state_dict(state, strict=strict, assign=assign)
            if not torch.is_grad_enabled() and not self._setting_data:
                warnings.warn(
                    "a loaded AutoDiffusion guide was set up by a call without gradients (an evaluation): it "
                    "samples the posterior of this call's data, which may be held-out data; call "
                    "guide.set_training_data(<training data>) after loading to sample the trained posterior",
                    UserWarning,
                    stacklevel=4,
                )

    def get_extra_state(self) -> dict:
        """The process and drift settings, saved in ``state_dict`` and checked on loading."""
        return dict(self._settings)

    def set_extra_state(self, state: dict) -> None:
        state = _effective_settings(state)
        different = {k: (v, self._settings.get(k)) for k, v in state.items() if self._settings.get(k) != v}
        if different:
            listed = ", ".join(f"{k}={saved!r} (this guide: {own!r})" for k, (saved, own) in different.items())
            raise ValueError(
                f"the loaded AutoDiffusion state was trained with {listed}: its drift belongs to those settings, "
                "so build the guide with the saved ones"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        if prefix + "_extra_state" in state_dict:  # check the settings now, also before the first call
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        # before the guide's first call its parameters do not exist yet: keep its part of the state and load
        # it once the guide has set itself up (also when the state is loaded through an AutoGuideList)
        if self.prototype_trace is None:
            own = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
            if own:
                self._pending_state = (own, strict, bool(local_metadata.get("assign_to_params_buffers", False)))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _sync_params(self) -> None:
        """Point the drift network's (and a flow's) parameters at the param store's tensors of the same
        names, as ``PyroParam`` s are: after ``pyro.get_param_store().load(...)`` the guide then runs
        with the loaded values (Pyro registers a plain ``nn.Parameter`` in the store, but never reads it
        back). Call inside the guide's Pyro context (a ``pyro_method`` or ``forward``)."""
        if pyro.settings.get("module_local_params"):  # no global store to follow
            return
        store = pyro.get_param_store()
        for module in self.drift.modules():  # accessing self.drift names its submodules
            prefix = module._pyro_name
            for name, param in list(module._parameters.items()):
                fullname = f"{prefix}.{name}" if prefix else name
                if param is None or fullname not in store:
                    continue
                # the store's tensors carry unconstrained(), which Pyro's annotations (torch.Tensor) omit
                stored = store.get_param(fullname).unconstrained()  # type: ignore[attr-defined]
                if stored.shape != param.shape:
                    raise ValueError(
                        f"the param store holds {fullname!r} with shape {tuple(stored.shape)}, but this guide's "
                        f"is {tuple(param.shape)} (left by another guide of the same name?): call "
                        "pyro.clear_param_store() between models"
                    )
                if stored is not param:
                    if not isinstance(stored, torch.nn.Parameter):  # keep the store and the module on one tensor
                        store[fullname] = torch.nn.Parameter(stored.detach())
                        stored = store.get_param(fullname).unconstrained()  # type: ignore[attr-defined]
                    module._parameters[name] = stored
        flow = self.flow
        if flow is not None:
            pyro.module(f"{self._pyro_name}.flow" if self._pyro_name else "flow", flow, update_module_params=True)

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.affine == "full":
            return self.loc + y @ self.scale_tril.T
        return self.loc + self.scale * y

    def frame(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`z = f(m + S y)` and :math:`\log|\det\partial z/\partial y|` for the rows of ``y``."""
        x = self._affine(y)
        scale = self.scale_tril.diagonal() if self.affine == "full" else self.scale
        log_det = scale.log().sum().expand(y.shape[:-1])
        flow = self.flow
        if flow is None:
            return x, log_det
        z = flow(x)
        return z, log_det + flow.log_abs_det_jacobian(x, z)

    def frame_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """The process state :math:`y` with :math:`f(m + S y) = z`, for the rows of ``z``."""
        x = z if self.flow is None else self.flow.inv(z)
        if self.affine == "full":
            return torch.linalg.solve_triangular(self.scale_tril, (x - self.loc).unsqueeze(-1), upper=False)[..., 0]
        return (x - self.loc) / self.scale

    def state_score(self, target: UnconstrainedTarget, y: torch.Tensor) -> torch.Tensor:
        """The score in the process frame, :math:`S^\\top\\nabla\\log\\rho(m + S y)` (the target
        score is detached; the frame is not). With a flow, the detached score of the pulled-back
        density :math:`\\nabla_y[\\log\\rho(z) + \\log|\\det\\partial z/\\partial y|]`."""
        if self.flow is not None:
            with torch.enable_grad():
                y = y.detach().requires_grad_()
                z, log_det = self.frame(y)
                score = self._score(target, z.detach())
                return torch.autograd.grad((z * score).sum() + log_det.sum(), y)[0]
        score = self._score(target, self._affine(y))
        return score @ self.scale_tril if self.affine == "full" else self.scale * score

    def target(self, *args, **kwargs) -> UnconstrainedTarget:
        """The model's batched unconstrained log density for these arguments (plate nesting is found
        once; whether the model runs batched is found once per context of enclosing plates, e.g. inside
        and outside ``Trace_ELBO``'s vectorised particles, and cached).

        A call that leaves unobserved a site the guide was trained with observed (a prediction,
        ``Predictive(model, guide)(X_new)`` with ``y=None``) gets the density of the latest training
        data instead: the drift learned that data's posterior, and the model with ``y`` unobserved is
        the prior. Explicit calls (this method, :meth:`sample_paths`, :meth:`log_normalizer`) score the
        data they are given, e.g. the full data set after minibatch training; calls of the guide
        itself under ``torch.no_grad()`` sample the latest training data's posterior whatever data they
        get (:meth:`set_training_data` moves it)."""
        args, kwargs = self._target_arguments(args, kwargs)
        info, context = self._target_info, plate_context()
        vectorized = self._vectorized if self._vectorized is not None else info["vectorized"].get(context)
        # with Pyro's validation on, the observed values are checked once per data set, not every step
        stamp = _argument_stamp(args, kwargs) if is_validation_enabled() else None
        checked = stamp is None or _same_stamp(self._checked_data, stamp)
        # new data (a minibatch) after a first full check: that check recorded which observed sites can be
        # checked from the target's own batched run, which then needs no extra model run
        quick = None if checked else self._quick_checks
        target = UnconstrainedTarget(self, self._raw_model[0], args, kwargs, info.get("nesting"), vectorized,
                                     observed_checked=checked or quick is not None)  # fmt: skip
        info["nesting"] = target.max_plate_nesting
        if quick is not None:  # these data count as checked once the first batched run has passed
            target.quick_checks = quick
            target.on_quick_checked = lambda: setattr(self, "_checked_data", stamp)
        elif not checked:
            self._quick_checks = target.check_observed()
            # a check of one minibatch of a subsampled plate does not vouch for the rest of the data
            self._checked_data = None if target.checked_subsample else stamp
        return target

    def set_training_data(self, *args, **kwargs) -> None:
        """Make these model arguments the data whose posterior the guide samples. Every call with
        gradients enabled (training: ``SVI.step``, ``fit_lbfgs``, a hand-written loop over
        ``differentiable_loss``; minibatches included) sets them; calls under ``torch.no_grad()``
        (``to_inference_data``, the ``predict`` helpers) sample the posterior of the data set last, so
        held-out targets do not leak in. Call this after minibatch training to sample the full-data
        posterior (a guide call that samples the trained posterior after gradient calls on changing data,
        with none set since, warns once), and after reloading a saved guide, before evaluating it under
        ``no_grad``."""
        if self.prototype_trace is None:
            self._setting_data = True
            try:
                self._setup_prototype(*args, **kwargs)
            finally:
                self._setting_data = False
        self._train_call = (_none_pattern(args, kwargs), args, kwargs)
        self._data_changed = False

    def _trained_arguments(self) -> tuple[tuple, dict]:
        """The data the drift was trained on, for a call that samples its posterior; warns once if the
        gradient calls saw changing data (minibatches) and none was set since."""
        assert self._train_call is not None
        if self._data_changed:
            self._data_changed = False
            n = [tuple(a.shape) for a in self._train_call[1] if torch.is_tensor(a)]
            warnings.warn(
                "AutoDiffusion was trained on changing data (minibatches?) and samples the posterior of the "
                f"latest (argument shapes {n}): call guide.set_training_data(<full data>) to sample the "
                "full data's posterior",
                UserWarning,
                stacklevel=4,
            )
        return self._train_call[1], self._train_call[2]

    def _target_arguments(self, args: tuple, kwargs: dict, guide_call: bool = False) -> tuple[tuple, dict]:
        if self._train_call is None:  # not set up yet
            return args, kwargs
        pattern = _none_pattern(args, kwargs)
        evaluating = guide_call and not torch.is_grad_enabled()
        if pattern == self._train_call[0]:  # the training data's structure
            if evaluating:  # under no_grad a guide call samples the trained posterior, whatever data it
                return self._trained_arguments()  # gets (held-out targets must not leak in)
            if torch.is_grad_enabled():  # training (any minibatch): the drift's target follows it
                if not _same_stamp(_argument_stamp(*self._train_call[1:]), _argument_stamp(args, kwargs)):
                    self._data_changed = True
                self._train_call = (pattern, args, kwargs)
            return args, kwargs
        missing = self._missing_by_pattern.get(pattern)
        if missing is None:  # once per argument structure: which trained observations are missing
            try:
                observed = _observed_sites(self._raw_model[0], args, kwargs)
            except Exception:  # the model itself will report it when the target runs
                return self._trained_arguments() if evaluating else (args, kwargs)
            missing = self._missing_by_pattern[pattern] = sorted(self._observed_sites - observed)
        # a prediction, or (under no_grad) the data passed another way, e.g. y=... as a keyword
        return self._trained_arguments() if missing or evaluating else (args, kwargs)

    def _remember(self, target: UnconstrainedTarget) -> None:
        self._masked_non_finite.update(target.masked_non_finite)
        if target.vectorized is not None:
            self._target_info["vectorized"][target.context] = target.vectorized

    def _log_density(self, target: UnconstrainedTarget, z: torch.Tensor) -> torch.Tensor:
        out = target.log_density(z)
        self._remember(target)
        return out

    def _score(self, target: UnconstrainedTarget, z: torch.Tensor) -> torch.Tensor:
        out = target.score(z)
        self._remember(target)
        return out

    # -- simulation ------------------------------------------------------------------------------
    def _simulate(self, eps: torch.Tensor, args, kwargs, keep_path: bool = False) -> PathSample:
        """Run the controlled SDE for ``eps`` of shape ``(B, K+1, D)``."""
        process = self.process
        target = self.target(*args, **kwargs) if self.drift.use_score else None
        times = process.times()
        y, log_path = process.initial(eps[:, 0])
        states = [y]
        drift_fn = self.drift.functional(times)
        for k in range(process.num_steps):
            try:
                score = self.state_score(target, y) if target is not None else None
            except FloatingPointError as error:
                largest = float(y.detach().abs().max())
                raise FloatingPointError(
                    f"{error}, at step {k} of the sampler's SDE, where the largest |state| is {largest:.3g} "
                    "(if that is huge, the drift overflowed; a smaller learning rate or drift_clip bounds it)"
                ) from error
            y = process.advance(k, y, drift_fn(y, float(times[k]), score), eps[:, k + 1])
            if not bool(torch.isfinite(y).all()):  # before the score blames the model for it
                self._check_finite(y, torch.zeros((), dtype=y.dtype))
            states.append(y)
        # the path's transition densities in one vectorised evaluation (K small ones cost more than the drift)
        path_states = torch.stack(states, 1)
        log_path = log_path + process.path_log_ratio(path_states, eps[:, 1:])
        z, log_det = self.frame(y)
        out = PathSample(z=z, log_path=log_path - log_det)
        if keep_path:
            out["states"] = path_states
            out["eps"] = eps
        return out

    def _noise_shape(self) -> tuple[int, int]:
        return (self.process.num_steps + 1, self.latent_dim)

    def _check_finite(self, z: torch.Tensor, log_density: torch.Tensor) -> None:
        """Raise ``FloatingPointError`` naming the sites whose simulated latent, or whose path
        log-density, is not finite (``Trace_ELBO`` would otherwise return an inf/NaN loss)."""
        if bool(torch.isfinite(z).all()) and bool(torch.isfinite(log_density).all()):
            return
        sites, bad, pos = [], [], 0
        for name, _ in self.prototype_trace.iter_stochastic_nodes():
            size = math.prod(self._unconstrained_shapes[name])
            sites.append(name)
            if not torch.isfinite(z[..., pos : pos + size]).all():
                bad.append(name)
            pos += size
        params = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        cause = (
            f"the guide's parameters {', '.join(params[:3])}{', ...' if len(params) > 3 else ''} are not finite, "
            "e.g. after a step on a non-finite loss"
            if params
            else "the drift overflowed; a smaller learning rate or drift_clip bounds it"
        )
        if bad:
            raise FloatingPointError(
                f"the simulated latent of site(s) {', '.join(map(repr, bad))} is not finite ({cause})"
            )
        raise FloatingPointError(
            f"the path log-density of the latent site(s) {', '.join(map(repr, sites))} is not finite ({cause})"
        )

    def sample_latent(self, *args, **kwargs):
        self._sync_params()
        name = self._pyro_name
        dtype = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"].dtype
        noise = dist.Normal(torch.zeros(self._noise_shape(), dtype=dtype), 1.0).to_event(2)
        eps = pyro.sample(f"_{name}_noise", noise, infer={"is_auxiliary": True})
        batch_shape = eps.shape[:-2]
        flat = eps.reshape((-1,) + self._noise_shape())
        if self.drift.use_score:
            args, kwargs = self._target_arguments(args, kwargs, guide_call=True)
        self._masked_non_finite = set()
        path = self._simulate(flat, args, kwargs)
        if self._masked_non_finite and torch.is_grad_enabled():
            sites = ", ".join(map(repr, sorted(self._masked_non_finite)))
            raise ValueError(
                f"the observed values of site(s) {sites} hold NaN or inf in masked-out entries: their weight is "
                "zero, but the gradient of their log density is NaN, so a Pyro ELBO (Trace_ELBO ...) would make "
                "the guide's parameters NaN, as for any Pyro guide. Replace the placeholders by finite values in "
                "the support (e.g. y.nan_to_num()), or train with PathELBO, which scores them at a point of it"
            )
        # the Delta carries log q(z) minus the noise site's log density, which the ELBO adds back: computed as
        # the noise site's own log_prob, and in float64, the two cancel to rounding of log q(z), not of the
        # noise's much larger (K D terms) density (float32, K D = 2.6e5: 0.07 nats per particle)
        noise_log_density = noise.log_prob(eps).double()
        log_density = path.log_path.reshape(batch_shape).double() - noise_log_density
        z = path.z.reshape(batch_shape + (self.latent_dim,))
        self._check_finite(z, log_density)
        return pyro.sample(
            f"_{name}_latent", dist.Delta(z, log_density=log_density, event_dim=1), infer={"is_auxiliary": True}
        )

    def _path_noise(self, num_paths: int, args, kwargs) -> torch.Tensor:
        """Standard-normal increments ``(num_paths, K+1, D)`` (the prototype is set up if needed)."""
        if not is_integer(num_paths) or num_paths < 1:
            raise ValueError(f"num_paths must be an integer >= 1, got {num_paths!r}")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        dtype = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"].dtype
        return torch.randn((num_paths,) + self._noise_shape(), dtype=dtype)

    @pyro_method
    def sample_paths(self, num_paths: int, *args, keep_path: bool = False, log_target: bool = True, **kwargs):
        """Simulate ``num_paths`` paths (batched), with :math:`\\log\\rho(z_K)` and :math:`\\log w`.

        Differentiable in the drift's parameters; call inside ``torch.no_grad()`` for evaluation.
        """
        eps = self._path_noise(num_paths, args, kwargs)
        self._sync_params()
        path = self._simulate(eps, args, kwargs, keep_path=keep_path)
        if log_target:
            path["log_target"] = self._log_density(self.target(*args, **kwargs), path.z)
            path["log_weight"] = path.log_target - path.log_path
        return path

    @torch.no_grad()
    @pyro_method
    def explore_paths(self, num_paths: int, *args, noise_scale: float = 1.0, **kwargs) -> torch.Tensor:
        """States ``(num_paths, K+1, D)`` of paths driven by the current (detached) drift with every
        Gaussian increment multiplied by ``noise_scale``: a wider, off-policy path distribution for the
        log-variance loss, which may be evaluated on any paths (Richter and Berner, ICLR 2024)."""
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale}")
        eps = noise_scale * self._path_noise(num_paths, args, kwargs)
        self._sync_params()
        return self._simulate(eps, args, kwargs, keep_path=True).states

    @torch.no_grad()
    @pyro_method
    def backward_paths(self, z: torch.Tensor) -> torch.Tensor:
        """States ``(B, K+1, D)`` of the *reference* run backwards from given end points ``z`` ``(B, D)``
        (unconstrained latents, e.g. from a :class:`~pyro_gpx.diffusion.buffer.ReplayBuffer`): off-policy
        paths that reach wherever ``z`` lies, so the log-variance loss on them pulls the sampler towards
        mass it does not yet cover [Sendera et al., NeurIPS 2024]."""
        if self.prototype_trace is None:
            raise RuntimeError("backward_paths needs a set-up guide: simulate or train it once first")
        if z.dim() != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have shape (num_paths, {self.latent_dim}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("z must be finite")
        self._sync_params()
        process = self.process
        y = self.frame_inverse(z.to(self.loc.dtype))
        states = [y]
        for k in reversed(range(process.num_steps)):
            y = process.backward_step(k, y, torch.randn_like(y))
            states.append(y)
        return torch.stack(states[::-1], 1)

    @pyro_method
    def rescore_paths(self, states: torch.Tensor, *args, **kwargs) -> PathSample:
        """The current sampler's log density ``log_path``, the end points ``z``, ``log_target`` and
        ``log_weight`` of given process states ``(B, K+1, D)`` (e.g. from :meth:`explore_paths`);
        differentiable in the drift and the frame (the log-variance loss)."""
        if self.prototype_trace is None:
            raise RuntimeError("rescore_paths needs a set-up guide: simulate or train it once first")
        expected = self._noise_shape()
        if states.dim() != 3 or tuple(states.shape[1:]) != expected:
            raise ValueError(
                f"states must have shape (num_paths, {', '.join(map(str, expected))}), got {tuple(states.shape)}"
            )
        self._sync_params()
        process = self.process
        target = self.target(*args, **kwargs)
        times = process.times()
        z_end, log_det = self.frame(states[:, -1])  # gradients reach m, S (and a flow)
        log_path = process.initial_log_density(states[:, 0]) - log_det
        drift_fn = self.drift.functional(times)
        for k in range(process.num_steps):
            y, y_next = states[:, k], states[:, k + 1]
            score = self.state_score(target, y) if self.drift.use_score else None
            drift = drift_fn(y, float(times[k]), score)
            log_path = log_path + process.forward_log_density(k, y, drift, y_next)
        log_path = log_path - process.path_backward_log_density(states)
        log_target = self._log_density(target, z_end)
        return PathSample(z=z_end, log_path=log_path, log_target=log_target, log_weight=log_target - log_path)

    @torch.no_grad()
    def log_normalizer(self, num_paths: int = 1000, *args, batch_size: int = 1000, **kwargs) -> dict:
        """Importance-sampling estimate of :math:`\\log Z` with its standard error, and the ELBO.

        :math:`\\widehat{\\log Z} = \\log\\frac1N\\sum_i w_i`; the standard error is the delta-method
        :math:`\\operatorname{sd}(w)/(\\sqrt N\\,\\bar w)`. It is estimated from the same weights, so it
        is itself unreliable when a few weights dominate: with an effective sample size ``ess`` near 1
        (of ``num_paths``) it understates the error (the estimate is then biased low, by an unknown
        amount); trust it only when ``ess`` is a sizeable fraction of ``num_paths``.

        :param num_paths: number of paths (>= 1); :param batch_size: paths simulated at once (>= 1).
        :returns: ``{"log_z", "stderr", "elbo", "ess", "num_paths"}``.
        :raises ValueError: if the model subsamples a plate with these arguments: a scaled minibatch
            likelihood inside a mean of weights does not estimate :math:`Z` (and paths sharing one
            minibatch make the standard error look small). Pass arguments that use all the data.
        """
        for arg, value in (("num_paths", num_paths), ("batch_size", batch_size)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        partial = self._subsampled_plates(args, kwargs)
        if partial:
            raise ValueError(
                f"log_normalizer needs the full-data likelihood, but the model subsamples {', '.join(partial)} "
                "with these arguments; pass model arguments that use all the data"
            )
        weights = []
        for start in range(0, num_paths, batch_size):
            weights.append(self.sample_paths(min(batch_size, num_paths - start), *args, **kwargs).log_weight)
        return importance_estimate(torch.cat(weights))

    def _subsampled_plates(self, args: tuple, kwargs: dict) -> list[str]:
        """The plates that the model subsamples with these arguments, as ``"'name' (used of size)"``."""
        trace = quiet_trace(self.model, args, kwargs)
        subsampled = [(name, len(site["value"]), site["fn"].size) for name, site in trace.nodes.items()
                      if site["type"] == "sample" and site_is_subsample(site)]  # fmt: skip
        return [f"{name!r} ({used} of {size})" for name, used, size in subsampled if used < size]

    #: paths behind :meth:`median` and :meth:`quantiles`
    summary_paths: int = 512

    def _summary_draws(self, *args, **kwargs) -> torch.Tensor:
        """``summary_paths`` unconstrained draws under a fixed seed, so that repeated calls agree and the
        global random state is left as it was. Without arguments, those of the latest training data."""
        if not args and not kwargs and self._train_call is not None:  # as AutoContinuous.median() works
            args, kwargs = self._train_call[1], self._train_call[2]
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return self.sample_paths(self.summary_paths, *args, log_target=False, **kwargs).z

    def _loc_scale(self, *args, **kwargs):
        z = self._summary_draws(*args, **kwargs)
        return z.mean(0), z.std(0)

    def _constrained_summary_draws(self, *args, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor, Transform]]:
        """Per latent site: the :attr:`summary_paths` draws unconstrained and constrained, and the bijection."""
        z = self._summary_draws(*args, **kwargs)
        num = z.shape[0]  # the draws' dim left of every site's dims, as _unpack_latent broadcasts it
        depth = max((len(shape) for shape in self._unconstrained_shapes.values()), default=0)
        draws = {}
        for site, value in self._unpack_latent(z.reshape((num,) + (1,) * depth + z.shape[-1:])):
            value = value.reshape((num,) + self._unconstrained_shapes[site["name"]])
            transform = biject_to(site["fn"].support)
            draws[site["name"]] = (value, transform(value), transform)
        return draws

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Each latent's marginal median, estimated from :attr:`summary_paths` paths drawn under a fixed
        seed (the same on every call; the guide's law need not be Gaussian, so not its mean), equal to
        ``quantiles([0.5])``. A site whose support couples its coordinates (a simplex, a Cholesky factor)
        gets instead the image of its unconstrained coordinates' medians, a point in the support (as
        Pyro's autoguides give), since its coordinates' medians need not lie in it."""
        result = {}
        for name, (unconstrained, constrained, transform) in self._constrained_summary_draws(*args, **kwargs).items():
            if _coordinatewise(transform):
                result[name] = torch.quantile(constrained, 0.5, dim=0)
            else:
                result[name] = transform(torch.quantile(unconstrained, 0.5, dim=0))
        return result

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Each latent's marginal quantiles (empirical, from :attr:`summary_paths` paths drawn under a
        fixed seed, of the constrained draws: for a simplex they need not lie on the simplex), stacked
        along a new leading dimension, as ``AutoContinuous.quantiles`` returns them."""
        draws = self._constrained_summary_draws(*args, **kwargs)
        dtype = next(iter(draws.values()))[1].dtype if draws else torch.get_default_dtype()
        levels = torch.as_tensor(quantiles, dtype=dtype)
        if levels.dim() != 1 or not ((levels >= 0) & (levels <= 1)).all():
            raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles}")
        return {name: torch.quantile(constrained, levels.to(constrained.device), dim=0)
                for name, (_, constrained, _) in draws.items()}  # fmt: skip


def _coordinatewise(transform: Transform) -> bool:
    """Whether ``transform`` maps each coordinate on its own (exp, sigmoid, affine ...), so that it maps
    each coordinate's median to the constrained coordinate's median."""
    if isinstance(transform, IndependentTransform):
        return _coordinatewise(transform.base_transform)
    if isinstance(transform, ComposeTransform):
        return all(_coordinatewise(part) for part in transform.parts)
    return transform.domain.event_dim == 0 and transform.codomain.event_dim == 0
