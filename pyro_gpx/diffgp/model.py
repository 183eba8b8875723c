r"""The differential GP as a Pyro model: a GP flow of the inputs, then a sparse GP output layer.

.. math::

    dx_t = \mu_f(x_t)\,dt + \Sigma_f(x_t)^{1/2} dW_t,\quad x_0 = x, \qquad
    g(x_T)\mid u_g \sim \mathcal N\big(k_{x_T Z_g}L_g^{-\top}u_g,\ k(x_T,x_T) - Q(x_T,x_T)\big), \qquad
    y \sim p(y\mid g),

with whitened inducing outputs :math:`u_f \in \mathbb R^{D\times M}` (one GP per input dimension),
:math:`u_g \in \mathbb R^{C\times M_g}`, both :math:`\mathcal N(0, I)` a priori. Each model run
draws ``num_paths`` flow paths per input and averages the likelihood over them (a ``"paths"``
plate scaled by ``1 / num_paths``), so with any guide :math:`q(u_f, u_g[, \theta])` the ELBO is

.. math::

    \mathbb E_q\Big[\tfrac1S\textstyle\sum_s \log p(y\mid g(x_T^{(s)}))\Big]
    - \mathrm{KL}(q\,\|\,p(u_f)\,p(u_g)[\,p(\theta)]),

as in [1]; with latent flow hyperparameters :math:`\theta` (``FlowKernel`` priors) it is the fully
Bayesian DiffGP of [2], and the sampled :math:`\theta` enters the flow kernel on every run.

Sites: ``flow.lengthscale`` / ``flow.outputscale`` (fully Bayesian only), ``flow_inducing``
``(D, M)``, ``output_inducing`` ``(C, M_g)``, and in the plates ``paths`` (dim -2) × ``data``
(dim -1) the observations ``y``. Point parameters: inducing inputs, kernels, noise.

ArviZ: :func:`~pyro_gpx.diagnostics.to_inference_data` gives ``y``'s log-likelihood per (path, data
point), each term scaled by ``1 / num_paths``; ``az.loo`` would count every path as data. For a
Gaussian likelihood the term is the predictive density :math:`\log\mathcal N(y; m, v + \sigma^2)` of
the output GP given :math:`u_g` and the path (the ELBO's variational expectation, a lower bound on it, is
what SVI uses); for classification it is the likelihood at one draw of :math:`g` per path. For PSIS-LOO,
reduce the paths first, to the log of the path average of the likelihood:
``ll = (S * idata.log_likelihood["y"]).reduce(scipy.special.logsumexp, dim="paths") - log(S)``.

Saving: the point parameters, the GPyTorch kernels' included, live in Pyro's parameter store, so
``pyro.get_param_store().save`` / ``load`` into a rebuilt model restores it, and ``state_dict``
does too. Call the (rebuilt) guide once with the training data before predicting, so that it sets
itself up with ``y`` observed. Two models in one store share parameters of the same name: clear the
store between them or give them different ``name`` s (a stored parameter of another shape or dtype is
refused on the first run, but one of the same shape is taken silently).

[1] P. Hegde, M. Heinonen, H. Lähdesmäki, S. Kaski. Deep learning with differential Gaussian
    process flows. AISTATS 2019.
[2] J. Xu, D. Zhang, ..., fully Bayesian differential Gaussian processes through stochastic
    differential equations (2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gpytorch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from .._validation import check_finite, check_positive_int, is_finite_at_least
from .flow import GPVectorField, integrate_flow
from .flow_kernel import FlowKernel, KernelState, draw_shape
from .inducing import jittered_cholesky, kmeans_inducing, whitened_conditional
from .likelihoods import LIKELIHOODS, observation

__all__ = ["DifferentialGP", "FlowOutput"]


@dataclass
class FlowOutput:
    """What a model run returns: output-GP moments ``loc``, ``var`` ``(..., S, n, C)``, flow end
    points ``x_T`` ``(..., S, n, D)`` and, with ``keep_path``, the path ``(K+1, ..., S, n, D)``."""

    loc: torch.Tensor
    var: torch.Tensor
    x_T: torch.Tensor
    path: torch.Tensor | None = None


def _flatten_draws(value: torch.Tensor, own: torch.Size, lead: torch.Size) -> torch.Tensor:
    """A global ``(..., R, M)`` latent with draw dims ``own`` as ``(B, R, M)`` over the draws ``lead``
    (``B = lead.numel()``)."""
    return value.reshape(own + value.shape[-2:]).expand(lead + value.shape[-2:]).reshape(-1, *value.shape[-2:])


def _check_dtype(name: str, module: torch.nn.Module, dtype: torch.dtype, fix: str) -> None:
    """``ValueError`` if ``module``'s floating-point parameters are not ``dtype`` (a float32 kernel in a
    float64 model would run with its hyperparameters rounded to float32)."""
    found = next((t.dtype for t in module.parameters() if t.is_floating_point()), dtype)
    if found != dtype:
        raise ValueError(f"{name} has dtype {found} but init_inputs are {dtype}; {fix}")


def _default_output_kernel(dim: int, outputs: int, dtype: torch.dtype) -> gpytorch.kernels.Kernel:
    batch = torch.Size() if outputs == 1 else torch.Size([outputs])
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=dim, batch_shape=batch), batch_shape=batch
    ).to(dtype)
    kernel.base_kernel.lengthscale = torch.full(batch + (1, dim), math.sqrt(dim), dtype=dtype)
    return kernel


class DifferentialGP(PyroModule):
    """Differential GP (flow GP on the inputs + sparse GP output layer) for Pyro's SVI.

    :param init_inputs: ``(n, D)`` training inputs (dimension, and k-means initial inducing inputs).
    :param num_inducing: :math:`M` for the flow; :param output_inducing: :math:`M_g` (default :math:`M`);
        each at most ``n`` (larger values are capped at the number of training inputs).
    :param flow: a :class:`~pyro_gpx.diffgp.flow_kernel.FlowKernel` (give it priors for the fully
        Bayesian model), a GPyTorch kernel, or ``None`` (ARD RBF per dimension).
    :param output_kernel: GPyTorch kernel of the output GP (batch shape ``(C,)`` for ``C > 1``).
    :param likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"`` (with ``num_classes``).
    :param noise: Gaussian noise variance (initial value, or fixed with ``learn_noise=False``).
    :param horizon: flow time :math:`T`; :param num_steps: Euler–Maruyama steps; :param num_paths:
        flow paths :math:`S` per input and model run.
    :param num_classes: classes of the categorical likelihood; :param learn_noise: learn the Gaussian
        noise variance (else it is fixed at ``noise``).
    :param jitter: added to the inducing points' kernel diagonal before its Cholesky factor (``None``:
        1e-6 in float64, 1e-4 in float32).
    :param seed: seed of the k-means initialisation of the inducing inputs.
    :param name: a prefix for the sample sites, plates and Pyro parameters (``"<name>.y"``,
        ``"<name>.flow_Z"`` ...), to use several models in one parameter store or one Pyro model
        (without one, a parent ``PyroModule`` names the parameters by attribute path, as usual).

    Example::

        >>> import torch, pyro
        >>> from pyro_gpx.diffgp import DifferentialGP, InducingNormal
        >>> X = torch.randn(40, 2, dtype=torch.float64); y = X.sin().sum(-1)
        >>> model = DifferentialGP(X, num_inducing=8, num_paths=2, num_steps=5)
        >>> guide = InducingNormal(model)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
        >>> loss = svi.step(X, y)
        >>> tuple(model(X).loc.shape)  # (paths, n, outputs)
        (2, 40, 1)
    """

    # PyroParams (or a buffer): PyroModule reads them back as tensors
    flow_Z: torch.Tensor
    output_Z: torch.Tensor
    noise: torch.Tensor

    def __init__(
        self,
        init_inputs: torch.Tensor,
        *,
        num_inducing: int = 100,
        output_inducing: int | None = None,
        flow: FlowKernel | gpytorch.kernels.Kernel | None = None,
        output_kernel: gpytorch.kernels.Kernel | None = None,
        likelihood: str = "gaussian",
        num_classes: int | None = None,
        noise: float = 0.1,
        learn_noise: bool = True,
        horizon: float = 1.0,
        num_steps: int = 20,
        num_paths: int = 5,
        jitter: float | None = None,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(name=name or "")  # a name also prefixes the Pyro parameters
        if not isinstance(init_inputs, torch.Tensor) or init_inputs.dim() != 2:
            raise ValueError(
                f"init_inputs must be an (n, D) tensor, got shape {tuple(getattr(init_inputs, 'shape', ()))}"
            )
        if init_inputs.shape[0] == 0 or not init_inputs.is_floating_point():  # else a num_inducing or .to() error
            raise ValueError(
                f"init_inputs must hold at least one row of floating-point inputs, got shape "
                f"{tuple(init_inputs.shape)} and {init_inputs.dtype}"
            )
        check_finite("init_inputs", init_inputs)
        if not is_finite_at_least(horizon, 0.0, strict=True):  # NumPy and 0-d tensor numbers too, not a bool
            raise ValueError(f"horizon must be a positive number, got {horizon!r}")
        num_steps, num_paths = check_positive_int("num_steps", num_steps), check_positive_int("num_paths", num_paths)
        num_inducing = check_positive_int("num_inducing", num_inducing)
        if output_inducing is not None:
            output_inducing = check_positive_int("output_inducing", output_inducing)
        if jitter is not None and not is_finite_at_least(jitter, 0.0):
            raise ValueError(f"jitter must be a finite number >= 0 or None, got {jitter}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "categorical" and (num_classes is None or check_positive_int("num_classes", num_classes) < 2):
            raise ValueError(f"a categorical likelihood needs num_classes >= 2, got {num_classes}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        if not is_finite_at_least(noise, 0.0, strict=True):
            raise ValueError(f"noise must be a positive number, got {noise!r}")
        X = init_inputs.detach()
        self.dim, self.dtype = X.shape[1], X.dtype
        self.likelihood = likelihood
        self.num_outputs = int(num_classes) if likelihood == "categorical" and num_classes is not None else 1
        self.horizon, self.num_steps, self.num_paths = float(horizon), num_steps, num_paths
        self.jitter = jitter if jitter is not None else (1e-6 if self.dtype == torch.float64 else 1e-4)
        if flow is None or isinstance(flow, gpytorch.kernels.Kernel):
            flow = FlowKernel(self.dim, flow, dtype=self.dtype)
        if not isinstance(flow, FlowKernel):
            raise TypeError(f"flow must be a FlowKernel, a gpytorch Kernel or None, got {type(flow).__name__}")
        if flow.dim != self.dim:
            raise ValueError(f"the flow kernel has dimension {flow.dim} but the inputs have {self.dim}")
        _check_dtype("flow", flow, self.dtype, f"build the FlowKernel with dtype={self.dtype} (or convert the inputs)")
        self.flow = flow
        self.output_kernel = output_kernel if output_kernel is not None else _default_output_kernel(
            self.dim, self.num_outputs, self.dtype)  # fmt: skip
        if not isinstance(self.output_kernel, gpytorch.kernels.Kernel):
            raise TypeError(f"output_kernel must be a gpytorch Kernel, got {type(self.output_kernel).__name__}")
        _check_dtype("output_kernel", self.output_kernel, self.dtype, f"convert it with .to({self.dtype})")
        if tuple(self.output_kernel.batch_shape) not in ((), (self.num_outputs,)):
            raise ValueError(
                f"output_kernel's batch shape must be () or ({self.num_outputs},) (one per output), got "
                f"{tuple(self.output_kernel.batch_shape)}"
            )
        self.name = name
        self.y_site, self.paths_plate, self.data_plate = (self.site_name(base) for base in ("y", "paths", "data"))
        self._store_checked = False
        m_g = num_inducing if output_inducing is None else output_inducing
        self.flow_Z = PyroParam(kmeans_inducing(X, min(num_inducing, len(X)), seed=seed))  # type: ignore[assignment]
        self.output_Z = PyroParam(kmeans_inducing(X, min(m_g, len(X)), seed=seed + 1))  # type: ignore[assignment]
        noise_t = torch.tensor(float(noise), dtype=self.dtype)
        if learn_noise:
            self.noise = PyroParam(noise_t, constraints.positive)  # type: ignore[assignment]
        else:
            self.register_buffer("noise", noise_t)

    def site_name(self, base: str) -> str:
        """``base`` with the model's ``name`` prefix (``"<name>.<base>"``; ``base`` without a name)."""
        return f"{self.name}.{base}" if self.name else base

    def _pyro_set_supermodule(self, name: str, context) -> None:
        # under a parent PyroModule, a named model keeps its own prefix (as a BayesianLastLayer does)
        super()._pyro_set_supermodule(self.name if self.name is not None else name, context)

    def _check_store(self) -> None:
        """Refuse a parameter store entry under one of this model's names with another shape or dtype: it
        belongs to another model (the store is global), and the model would silently run with it."""
        stored = dict(pyro.get_param_store().named_parameters())
        own = [(self._pyro_get_fullname(k), getattr(self, k + "_unconstrained")) for k in self._pyro_params]
        for prefix, module in ((self._pyro_get_fullname("output_kernel"), self.output_kernel),
                               (self.flow._pyro_get_fullname("kernel"), self.flow.kernel)):  # fmt: skip
            own += [(f"{prefix}$$${path}", t) for path, t in module.named_parameters()]
        for key, tensor in own:
            other = stored.get(key)
            if other is not None and other is not tensor and (other.shape, other.dtype) != (tensor.shape, tensor.dtype):
                raise ValueError(
                    f"Pyro's parameter store holds {key!r} with shape {tuple(other.shape)} and {other.dtype}, but "
                    f"this model's has shape {tuple(tensor.shape)} and {tensor.dtype}: it is another model's. Call "
                    "pyro.clear_param_store() between models, or give each a different name="
                )
        self._store_checked = True

    def get_extra_state(self) -> dict:
        """The flow's time settings and the likelihood (no parameter shape records them), saved in
        ``state_dict`` and checked on loading (a state saved without one of them loads unchecked there)."""
        return {"horizon": self.horizon, "num_steps": self.num_steps, "likelihood": self.likelihood}

    def set_extra_state(self, state: dict) -> None:
        own = self.get_extra_state()
        different = {k: v for k, v in state.items() if own.get(k) != v}
        if different:
            listed = ", ".join(f"{k}={v!r} (this model: {own.get(k)!r})" for k, v in different.items())
            raise ValueError(
                f"the loaded DifferentialGP state was trained with {listed}: build the model with the saved "
                "settings (to integrate the trained flow on another grid on purpose, set model.num_steps after "
                "loading)"
            )

    # -- the pieces ------------------------------------------------------------------------------
    def _check_inputs(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        if X.dim() != 2 or X.shape[1] != self.dim or X.shape[0] == 0:
            raise ValueError(f"X must be (n, {self.dim}) with n >= 1 (the flow's dimension), got {tuple(X.shape)}")
        check_finite("X", X)
        if y is None:
            return
        if y.shape != X.shape[:1]:
            raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {tuple(y.shape)}")
        if self.likelihood == "gaussian":
            check_finite("y", y)
        if self.likelihood == "bernoulli" and not ((y == 0) | (y == 1)).all():
            raise ValueError("y must hold 0/1 labels for a Bernoulli likelihood")
        if self.likelihood == "categorical" and (
            y.dtype.is_floating_point or y.min() < 0 or y.max() >= self.num_outputs
        ):
            raise ValueError(f"y must hold integer labels in [0, {self.num_outputs}) for a categorical likelihood")

    def _inducing(self, name: str, rows: int, cols: int) -> torch.Tensor:
        eye = torch.eye(cols, dtype=self.dtype)
        prior = dist.MultivariateNormal(torch.zeros(rows, cols, dtype=self.dtype), scale_tril=eye).to_event(1)
        return pyro.sample(self._pyro_get_fullname(name), prior)

    def _output_moments(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output GP at ``x`` ``(B, n, D)`` given ``u`` ``(B, C, M_g)``: loc, var ``(B, n, C)``."""
        # update_module_params: after pyro.get_param_store().load the kernel uses (and trains) the stored values
        pyro.module(self._pyro_get_fullname("output_kernel"), self.output_kernel, update_module_params=True)
        kernel, Z = KernelState(kernel=self.output_kernel), self.output_Z
        L = jittered_cholesky(kernel.gram(Z), self.jitter)  # (1, C?, M, M)
        Kxz, kxx = kernel.cross(x, Z), kernel.diag(x)  # (B, C?, n, M), (B, C?, n)
        loc, var = whitened_conditional(Kxz, kxx, L, u)  # (B, C, n); var (B, 1, n) for one shared kernel
        loc = loc.transpose(-1, -2)
        return loc, var.transpose(-1, -2).expand_as(loc)

    # -- the model -------------------------------------------------------------------------------
    def forward(
        self, X: torch.Tensor, y: torch.Tensor | None = None, *, num_data: int | None = None, keep_path: bool = False
    ) -> FlowOutput:
        """Run the model on a (mini)batch ``X`` ``(n, D)``; ``num_data`` is the data set size when ``X`` is a
        minibatch (the likelihood is scaled by ``num_data / n``)."""
        self._check_inputs(X, y)
        n, S = X.shape[0], self.num_paths
        size = n if num_data is None else check_positive_int("num_data", num_data)
        if not self._store_checked:
            self._check_store()
        if size < n:
            raise ValueError(f"num_data ({size}) is smaller than the batch ({n})")
        state = self.flow.state()
        u_f = self._inducing("flow_inducing", self.dim, self.flow_Z.shape[0])
        u_g = self._inducing("output_inducing", self.num_outputs, self.output_Z.shape[0])
        lead_f = draw_shape(u_f.shape[:-2], "site 'flow_inducing'")
        lead_g = draw_shape(u_g.shape[:-2], "site 'output_inducing'")
        lead = torch.broadcast_shapes(state.lead, lead_f, lead_g)
        if state.lead not in (torch.Size(), lead):
            raise ValueError(
                f"flow hyperparameter draws {tuple(state.lead)} do not match the inducing draws {tuple(lead)}"
            )
        u_f, u_g = _flatten_draws(u_f, lead_f, lead), _flatten_draws(u_g, lead_g, lead)
        B = lead.numel()
        field = GPVectorField(state, self.flow_Z, u_f, self.jitter)
        x0 = X.to(self.dtype).unsqueeze(0).expand(B * S, n, self.dim).reshape(B, S * n, self.dim)
        num_steps = check_positive_int("model.num_steps", self.num_steps)  # an attribute users may set (see loading)
        if not is_finite_at_least(self.horizon, 0.0, strict=True):
            raise ValueError(f"model.horizon must be a positive number, got {self.horizon!r}")
        path = integrate_flow(field, x0, float(self.horizon), num_steps, keep_path=keep_path, copies=S)
        x_T = path[-1] if keep_path else path
        loc, var = self._output_moments(x_T, u_g)
        shape = lead + (S, n)
        loc, var = loc.reshape(shape + (-1,)), var.reshape(shape + (-1,))
        x_T = x_T.reshape(shape + (self.dim,))
        if keep_path:
            path = path.reshape((path.shape[0],) + shape + (self.dim,))
        with (
            pyro.plate(self.paths_plate, S, dim=-2),
            pyro.plate(self.data_plate, size, subsample=torch.arange(n), dim=-1),
            poutine.scale(scale=1.0 / S),
        ):
            if y is not None and self.likelihood == "bernoulli":
                y = y.to(loc.dtype)  # integer 0/1 labels are accepted; Bernoulli scores floats
            pyro.sample(self.y_site, observation(self.likelihood, loc, var, self.noise), obs=y)
        return FlowOutput(loc=loc, var=var, x_T=x_T, path=path if keep_path else None)
