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
the simulated path (PIS/DDS training).

The process runs in a learned affine frame, :math:`z = m + S y` (``loc`` :math:`m` starts at
the ``init_loc_fn`` point, :math:`S` at ``init_scale`` times the identity): the SDE carries :math:`y`,
the drift sees the score :math:`S^\top\nabla\log\rho(z)`, and the path density gains
:math:`-\log|\det S|`. :math:`S` is diagonal (``affine="diagonal"``, ``scale`` :math:`s`) or lower
triangular with a positive diagonal (``affine="full"``, ``scale_tril`` :math:`L`). Adapting the frame is
a cheap preconditioner: a target whose posterior is far from the origin, badly scaled (a funnel's neck
variable) or strongly correlated (a regression's coefficients) no longer has to be reached by the
drift network alone; with a zero drift the DDS guide is exactly the Gaussian :math:`N(m, \sigma^2 SS^\top)`,
so ``affine="full"`` contains ``AutoMultivariateNormal``'s family and the drift learns what is not
Gaussian. A normalising flow :math:`f` may follow the affine map (``flow=``): :math:`z = f(m + S y)`,
and every path gains :math:`-\log|\det \partial f|` at its end point. With a zero drift and the PIS
defaults (:math:`\sigma = T = 1`, so :math:`y_K \sim N(0, I)`) the guide is then exactly the flow's
own guide; a flow trained first (e.g. ``AutoIAFNormal``'s transform) is a warm start that the drift
only has to improve on.
Batched losses and the evidence estimate live in :mod:`~pyro_gpx.diffusion.losses`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam, pyro_method
from pyro.nn.module import to_pyro_module_

from .drift import DriftNet
from .processes import gaussian_log_density, make_process
from .target import UnconstrainedTarget

__all__ = ["AutoDiffusion", "PathSample"]


class PathSample(dict):
    """Batched paths: ``z`` ``(B, D)`` latents, ``log_path`` ``(B,)`` (:math:`L`, the log density of
    ``z`` under the sampler), ``log_target`` ``(B,)`` (:math:`\\log\\rho(z)`, if computed), ``log_weight``
    ``(B,)``, and ``states`` ``(B, K+1, D)`` (process states :math:`y_k`, with
    :math:`z = m + s\\odot y_K`) / ``eps`` ``(B, K+1, D)`` when kept."""

    __getattr__ = dict.__getitem__


class AutoDiffusion(AutoContinuous):
    """Diffusion-sampler posterior over all continuous latent sites of ``model``.

    :param process: ``"pis"`` (Brownian reference) or ``"dds"`` (variance-preserving reference).
    :param num_steps: time steps :math:`K`.
    :param sigma: diffusion scale :math:`\\sigma` (PIS) / reference stationary scale (DDS).
    :param horizon: :math:`T` (PIS).
    :param hidden, depth: size of the drift network.
    :param use_score: feed :math:`\\nabla\\log\\rho` to the drift (one model gradient per step). Turn
        it off inside an ``AutoGuideList``: there the guide sees a blocked model, whose score would
        miss the other guides' sites.
    :param beta_min, beta_max: DDS noise schedule.
    :param affine: the learned frame :math:`z = m + S y`: ``"diagonal"`` (:math:`D` scales),
        ``"full"`` (lower-triangular :math:`S`, :math:`D(D+1)/2` parameters, for correlated
        posteriors) or ``"fixed"`` (:math:`m, S` keep their initial values);
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
        ``drift_clip`` trained stably (``benchmarks/samplers.py``, ``PIS-KL+IAF``).

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
        horizon: float = 1.0,
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
    ):
        if init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if affine not in ("fixed", "diagonal", "full"):
            raise ValueError(f"affine must be 'fixed', 'diagonal' or 'full', got {affine!r}")
        if flow is not None and not callable(flow):
            raise TypeError(f"flow must be a TransformModule or a callable latent_dim -> TransformModule, got {flow!r}")
        self.affine, self._init_scale = affine, float(init_scale)
        self._flow_spec = (flow,)  # a tuple: the module is registered only once the prototype is set up
        self.process = make_process(process, num_steps, sigma, horizon, beta_min, beta_max)
        self._net_config = {"hidden": hidden, "depth": depth, "use_score": use_score, "drift_clip": drift_clip}
        super().__init__(model, init_loc_fn=init_loc_fn)
        # self.model is wrapped in an InitMessenger, which costs at every trace; a tuple keeps a PyroModule
        # model from being registered as a submodule (as AutoGuide does)
        self._raw_model = (model,)
        self._vectorized = vectorized
        self._target_info: dict = {} if vectorized is None else {"vectorized": vectorized}

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(f"AutoDiffusion needs continuous latents; site {name!r} is discrete")
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
        self._target_info = {} if self._vectorized is None else {"vectorized": self._vectorized}
        flow = self._flow_spec[0]
        if flow is not None and not isinstance(flow, torch.distributions.Transform):
            flow = flow(self.latent_dim)
        if flow is not None and not (flow.bijective and flow.domain.event_dim == 1):
            raise ValueError(f"flow must be a bijection of vectors (event_dim 1), got {flow!r}")
        self.flow = flow  # a plain nn.Module child: its parameters are registered by pyro.module on access

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
        """The model's batched unconstrained log density for these arguments (plate nesting and
        whether the model runs batched are found once and cached)."""
        info = self._target_info
        target = UnconstrainedTarget(
            self, self._raw_model[0], args, kwargs, info.get("nesting"), info.get("vectorized")
        )
        info["nesting"] = target.max_plate_nesting
        return target

    def _log_density(self, target: UnconstrainedTarget, z: torch.Tensor) -> torch.Tensor:
        out = target.log_density(z)
        self._target_info["vectorized"] = target.vectorized
        return out

    def _score(self, target: UnconstrainedTarget, z: torch.Tensor) -> torch.Tensor:
        out = target.score(z)
        self._target_info["vectorized"] = target.vectorized
        return out

    # -- simulation ------------------------------------------------------------------------------
    def _simulate(self, eps: torch.Tensor, args, kwargs, keep_path: bool = False) -> PathSample:
        """Run the controlled SDE for ``eps`` of shape ``(B, K+1, D)``."""
        process = self.process
        target = self.target(*args, **kwargs) if self.drift.use_score else None
        times = process.times()
        y, log_path = process.initial(eps[:, 0])
        log_path = log_path + gaussian_log_density(eps[:, 0], torch.zeros_like(eps[:, 0]), 1.0)
        states = [y] if keep_path else None
        drift_fn = self.drift.functional()
        for k in range(process.num_steps):
            score = self.state_score(target, y) if target is not None else None
            drift = drift_fn(y, float(times[k]), score)
            y_next, log_f, log_b = process.step(k, y, drift, eps[:, k + 1])
            log_path = log_path + log_f + gaussian_log_density(eps[:, k + 1], torch.zeros_like(y), 1.0) - log_b
            y = y_next
            if keep_path:
                states.append(y)
        z, log_det = self.frame(y)
        out = PathSample(z=z, log_path=log_path - log_det)
        if keep_path:
            out["states"] = torch.stack(states, 1)
            out["eps"] = eps
        return out

    def _noise_shape(self) -> tuple[int, int]:
        return (self.process.num_steps + 1, self.latent_dim)

    def sample_latent(self, *args, **kwargs):
        name = self._pyro_name
        dtype = next(self.prototype_trace.iter_stochastic_nodes())[1]["value"].dtype
        eps = pyro.sample(
            f"_{name}_noise",
            dist.Normal(torch.zeros(self._noise_shape(), dtype=dtype), 1.0).to_event(2),
            infer={"is_auxiliary": True},
        )
        batch_shape = eps.shape[:-2]
        flat = eps.reshape((-1,) + self._noise_shape())
        path = self._simulate(flat, args, kwargs)
        noise_log_density = gaussian_log_density(flat, torch.zeros_like(flat), 1.0).sum(-1)
        log_density = (path.log_path - noise_log_density).reshape(batch_shape)
        z = path.z.reshape(batch_shape + (self.latent_dim,))
        return pyro.sample(
            f"_{name}_latent", dist.Delta(z, log_density=log_density, event_dim=1), infer={"is_auxiliary": True}
        )

    def _path_noise(self, num_paths: int, args, kwargs) -> torch.Tensor:
        """Standard-normal increments ``(num_paths, K+1, D)`` (the prototype is set up if needed)."""
        if num_paths < 1:
            raise ValueError(f"num_paths must be >= 1, got {num_paths}")
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
        path = self._simulate(eps, args, kwargs, keep_path=keep_path)
        if log_target:
            path["log_target"] = self._log_density(self.target(*args, **kwargs), path.z)
            path["log_weight"] = path.log_target - path.log_path
        return path

    @torch.no_grad()
    def explore_paths(self, num_paths: int, *args, noise_scale: float = 1.0, **kwargs) -> torch.Tensor:
        """States ``(num_paths, K+1, D)`` of paths driven by the current (detached) drift with every
        Gaussian increment multiplied by ``noise_scale``: a wider, off-policy path distribution for the
        log-variance loss, which may be evaluated on any paths (Richter and Berner, ICLR 2024)."""
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale}")
        eps = noise_scale * self._path_noise(num_paths, args, kwargs)
        return self._simulate(eps, args, kwargs, keep_path=True).states

    @torch.no_grad()
    def log_normalizer(self, num_paths: int = 1000, *args, batch_size: int = 1000, **kwargs) -> dict:
        """Importance-sampling estimate of :math:`\\log Z` with its standard error, and the ELBO.

        :math:`\\widehat{\\log Z} = \\log\\frac1N\\sum_i w_i`; the standard error is the delta-method
        :math:`\\operatorname{sd}(w)/(\\sqrt N\\,\\bar w)`.
        """
        weights = []
        for start in range(0, num_paths, batch_size):
            weights.append(self.sample_paths(min(batch_size, num_paths - start), *args, **kwargs).log_weight)
        log_w = torch.cat(weights)
        n = log_w.numel()
        log_z = torch.logsumexp(log_w, 0) - math.log(n)
        normalised = torch.exp(log_w - log_z)
        stderr = normalised.std() / math.sqrt(n)
        ess = float(normalised.sum() ** 2 / (normalised**2).sum())
        return {"log_z": float(log_z), "stderr": float(stderr), "elbo": float(log_w.mean()), "ess": ess,
                "num_paths": n}  # fmt: skip

    def _loc_scale(self, *args, **kwargs):
        with torch.no_grad():
            z = self.sample_paths(512, *args, log_target=False, **kwargs).z
        return z.mean(0), z.std(0)
