r"""Policies: how a computation-aware GP chooses its actions :math:`S`.

A policy maps the current state (data, kernel, noise, residual :math:`y - \mu(X)`) to an
:class:`~pyro_gpx.gp.actions.Actions`. With :math:`i` actions the posterior costs
:math:`O(n i)` memory; the policy decides which :math:`i`-dimensional projection of the data is
conditioned on, and the posterior's computational uncertainty accounts for the rest [1, 2].

* :class:`UnitVectorPolicy`: unit vectors; all :math:`n` of them is the exact (Cholesky) GP.
* :class:`CGPolicy`: (preconditioned) conjugate-gradient directions (IterGP-CG / CaGP-CG).
* :class:`PseudoInputPolicy`: kernel columns :math:`k(X, z_j)` at inducing points.
* :class:`BlockSparsePolicy`: learned block-sparse actions (CaGP-Opt), trained with the
  hyperparameters.
* :class:`RandomSketchPolicy`: a fixed Gaussian sketch.

References:

[1] J. Wenger, G. Pleiss, M. Pförtner, P. Hennig, J. Cunningham. Posterior and computational
    uncertainty in Gaussian processes. NeurIPS 2022.
[2] J. Wenger, K. Wu, P. Hennig, J. Gardner, G. Pleiss, J. Cunningham. Computation-aware Gaussian
    processes: model selection and linear-time inference. NeurIPS 2024.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro.nn import PyroModule, PyroParam

from .._validation import check_finite, check_positive_int, check_positive_or_none, is_integer
from . import settings
from .actions import Actions, BlockSparseActions, DenseActions, IndexActions, StackedActions
from .cg import CGResult, conjugate_gradients
from .kernel_fn import KernelFn
from .kernel_ops import training_matmul
from .partition import kd_partition, random_partition
from .preconditioners import build_preconditioner
from .projection import independent_columns

__all__ = [
    "PolicyContext",
    "Policy",
    "UnitVectorPolicy",
    "CGPolicy",
    "PseudoInputPolicy",
    "BlockSparsePolicy",
    "RandomSketchPolicy",
]


@dataclass
class PolicyContext:
    """What a policy may look at: training inputs, residual :math:`y - \\mu(X)`, kernel, noise."""

    X: torch.Tensor
    residual: torch.Tensor
    kernel: KernelFn
    noise: torch.Tensor


def _resolution(dtype: torch.dtype) -> float:
    """Unit roundoff of kernel products in ``dtype`` (float64's for non-float dtypes)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


def _check_num_actions(num_actions: int | None, n: int) -> int:
    if num_actions is None:
        return n
    if not is_integer(num_actions) or int(num_actions) < 1:
        raise ValueError(f"num_actions must be an integer >= 1, got {num_actions!r}")
    if int(num_actions) > n:
        raise ValueError(f"num_actions ({num_actions}) exceeds the number of data points ({n})")
    return int(num_actions)


class Policy(PyroModule):
    """Base class: ``actions(context) -> Actions``."""

    #: whether gradients of the objective flow into the actions (False: they are treated as fixed)
    differentiable: bool = True

    def actions(self, context: PolicyContext) -> Actions:
        raise NotImplementedError

    def validate(self, num_data: int) -> None:
        """Raise if this policy cannot act on ``num_data`` points."""
        _check_num_actions(getattr(self, "num_actions", None), num_data)

    def validate_inputs(self, X: torch.Tensor) -> None:
        """Raise if this policy cannot act on the training inputs ``X`` (``(n, d)``); by default
        :meth:`validate` with ``n``."""
        self.validate(X.shape[0])

    def forward(self, context: PolicyContext) -> Actions:
        return self.actions(context)


class UnitVectorPolicy(Policy):
    """Unit-vector actions on ``num_actions`` data points (all points if ``None``: the exact GP).

    :param order: ``"random"`` (a seeded random subset) or ``"first"`` (the first points).
    """

    def __init__(self, num_actions: int | None = None, order: str = "random", seed: int = 0):
        super().__init__()
        if order not in ("random", "first"):
            raise ValueError(f"order must be 'random' or 'first', got {order!r}")
        self.num_actions, self.order, self.seed = num_actions, order, seed

    def actions(self, context):
        n = context.X.shape[0]
        i = _check_num_actions(self.num_actions, n)
        if i == n or self.order == "first":
            idx = torch.arange(i)
        else:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:i]
        return IndexActions(idx, n, dtype=torch.float64)


class RandomSketchPolicy(Policy):
    r"""A fixed Gaussian sketch :math:`S_{kj} \sim N(0, 1/n)`, seeded (the same for the same ``n``)."""

    def __init__(self, num_actions: int, seed: int = 0):
        super().__init__()
        self.num_actions, self.seed = num_actions, seed

    def actions(self, context):
        n = context.X.shape[0]
        i = _check_num_actions(self.num_actions, n)
        gen = torch.Generator().manual_seed(self.seed)
        S = torch.randn(n, i, generator=gen, dtype=torch.float64) / math.sqrt(n)
        return DenseActions(S.to(context.X.dtype))


class PseudoInputPolicy(Policy):
    r"""Kernel columns at inducing points :math:`Z`: :math:`S = K(X, Z)`.

    With these actions the CaGP posterior mean lies in the span of :math:`k(\cdot, X)K(X, Z)`.

    :param inducing_points: ``(m, d)`` inducing inputs.
    :param learn: optimise :math:`Z` with the hyperparameters.
    """

    inducing_points: torch.Tensor  # a PyroParam or a buffer: PyroModule reads it back as a tensor

    def __init__(self, inducing_points: torch.Tensor, learn: bool = False):
        super().__init__()
        if not isinstance(inducing_points, torch.Tensor) or inducing_points.dim() != 2:
            # (the message itself failed on a non-tensor: AttributeError 'int' object has no attribute 'shape')
            shape = torch.is_tensor(inducing_points)
            got = f"shape {tuple(inducing_points.shape)}" if shape else type(inducing_points).__name__
            raise ValueError(f"inducing_points must be a (m, d) tensor, got {got}")
        check_finite("inducing_points", inducing_points)
        if learn:
            self.inducing_points = PyroParam(inducing_points.clone())  # type: ignore[assignment]
        else:
            self.register_buffer("inducing_points", inducing_points.clone())

    def validate(self, num_data: int) -> None:
        _check_num_actions(self.inducing_points.shape[0], num_data)

    def validate_inputs(self, X: torch.Tensor) -> None:
        self._check_features(self.inducing_points, X)
        self.validate(X.shape[0])

    @staticmethod
    def _check_features(Z: torch.Tensor, X: torch.Tensor) -> None:
        if Z.shape[1:] != X.shape[1:]:
            raise ValueError(f"inducing_points have {Z.shape[1]} features; X has {X.shape[1]}")

    def actions(self, context):
        Z = self.inducing_points
        self.validate_inputs(context.X)
        check_finite("inducing_points", Z)  # learned ones can diverge
        return DenseActions(context.kernel(context.X, Z.to(context.X.dtype)))


class BlockSparsePolicy(Policy):
    r"""Learned block-sparse actions (CaGP-Opt [2]).

    The training points are split into ``num_actions`` disjoint blocks of about :math:`n/i` points;
    action :math:`j` has learnable entries on block :math:`j` and zeros elsewhere. :math:`K S` then
    costs one kernel entry per pair of points, memory is O(n), and :math:`S^\top S` is diagonal.
    The entries are Pyro parameters, trained by SVI together with the hyperparameters.

    :param init: ``"constant"`` (default: each action averages its block, so the first posterior
        conditions on block means of the data), ``"targets"`` (the residual :math:`y - \mu` on each
        block) or ``"random"`` (Gaussian); every block is normalised to unit norm.
    :param partition: ``"kd"`` (default: blocks of nearby points, the leaves of a balanced k-d
        tree in the kernel's scaled inputs :math:`x/\ell` when the kernel is a supported
        stationary one, see :func:`~pyro_gpx.gp.partition.kd_partition`) or ``"random"`` (a seeded
        random split). Local blocks act like learned inducing functions; on the UCI benchmark
        they fit better than random ones at the same cost.

    The partition is made when the policy first sees the data (and again after ``set_data`` with
    a different number of points), with the kernel's lengthscales at that moment. It is a buffer
    of the module: save and restore a trained model with ``state_dict`` / ``load_state_dict`` (the
    Pyro param store alone holds the entries but not which points they act on). A loaded state is
    checked against the data the model then sees: other inputs, or the same in another row order,
    raise ``ValueError`` (the indices would act on the wrong points); another number of points
    warns and starts a new partition.

    The entries live in Pyro's global param store under the policy's name (``"policy.blocks"`` in a
    :class:`~pyro_gpx.gp.model.ComputationAwareGP`), like every Pyro parameter: two models built in
    one process share them. A second model would take the first one's trained entries (this warns)
    or, if its partition has another shape, cannot use them (a ``ValueError`` naming the parameter).
    Call ``pyro.clear_param_store()`` between models.
    """

    def __init__(self, num_actions: int, init: str = "constant", partition: str = "kd", seed: int = 0):
        super().__init__()
        if init not in ("constant", "targets", "random"):
            raise ValueError(f"init must be 'constant', 'targets' or 'random', got {init!r}")
        if partition not in ("kd", "random"):
            raise ValueError(f"partition must be 'kd' or 'random', got {partition!r}")
        self.num_actions, self.init, self.partition, self.seed = num_actions, init, partition, seed
        self._num_data = None
        self._loaded = False

    def _partition(self, context: PolicyContext) -> tuple[torch.Tensor, torch.Tensor]:
        n = context.X.shape[0]
        i = _check_num_actions(self.num_actions, n)
        if self.partition == "random":
            return random_partition(n, i, self.seed)
        Z = context.X.detach().double()
        spec = context.kernel.spec
        if spec is not None:
            Z = spec.columns(Z) / spec.lengthscale.detach().double()
        return kd_partition(Z.reshape(n, -1), i)

    def _initial_blocks(self, context: PolicyContext, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.init == "constant":
            values = torch.ones(index.shape, dtype=torch.float64)
        elif self.init == "targets":
            values = context.residual.detach().double()[index]
        else:
            gen = torch.Generator().manual_seed(self.seed + 1)
            values = torch.randn(index.shape, generator=gen, dtype=torch.float64)
        values = values * mask
        norms = values.norm(dim=-1, keepdim=True)
        flat = norms[:, 0] <= 1e-12 * norms.max().clamp_min(1e-300)  # e.g. targets all zero on a block
        if flat.any():  # a zero block is no action: start it constant instead
            values[flat] = mask[flat].to(values.dtype)
            norms[flat] = values[flat].norm(dim=-1, keepdim=True)
        return (values / norms.clamp_min(1e-300)).to(context.X.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a policy that has not seen data yet takes its partition (and entries) from the saved state
        if self._num_data is None and prefix + "index" in state_dict and prefix + "mask" in state_dict:
            index, mask = state_dict[prefix + "index"], state_dict[prefix + "mask"]
            if index.shape[0] != self.num_actions:
                raise ValueError(
                    f"the loaded state has {index.shape[0]} block actions, but this policy was built with "
                    f"num_actions={self.num_actions}: build the model with the saved settings"
                )
            self.register_buffer("index", index.clone())
            self.register_buffer("mask", mask.clone())
            checksum = state_dict.get(prefix + "inputs_checksum")
            if checksum is not None:
                self.register_buffer("inputs_checksum", checksum.clone())
            saved = state_dict.get(prefix + "blocks_unconstrained")  # a placeholder of its shape, loaded below
            self.blocks = PyroParam(torch.zeros(index.shape, dtype=saved.dtype if saved is not None else None))
            self._num_data = int(mask.sum())
        self._loaded = True  # the next data seen must be the inputs the partition was made on
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_inputs(self, X: torch.Tensor) -> None:
        """After a load: the partition's point indices must refer to the same training inputs, in order."""
        self._loaded = False
        n = X.shape[0]
        if self._num_data != n:
            warnings.warn(
                f"the loaded partition is for {self._num_data} training points, this model has {n}: its trained "
                "block entries are discarded and a new partition is made",
                UserWarning,
                stacklevel=3,
            )
            return
        stored = getattr(self, "inputs_checksum", None)
        if stored is not None and not torch.allclose(_inputs_checksum(X), stored, rtol=1e-6, atol=1e-8):
            raise ValueError(
                "the loaded block actions were trained on other training inputs (other points, or the same "
                "points in another row order): their point indices would act on the wrong points. Build the "
                "model on the saved model's training inputs, in their order"
            )

    def _stored_blocks_error(self, stored_shape, shape) -> ValueError:
        name = self._pyro_get_fullname("blocks")
        return ValueError(
            f"the Pyro param store holds {name!r} with shape {tuple(stored_shape)}, but this policy's "
            f"partition needs {tuple(shape)} ({shape[0]} blocks of up to {shape[1]} points): it belongs to "
            "another model or an earlier run sharing the store. Call pyro.clear_param_store() before "
            "building this model (Pyro parameters are global, keyed by name: two models with the same "
            "names cannot be trained side by side in one store)"
        )

    def actions(self, context):
        n = context.X.shape[0]
        if self._loaded:
            self._check_loaded_inputs(context.X)
        if self._num_data != n:
            index, mask = self._partition(context)
            init = self._initial_blocks(context, index, mask)
            if self._num_data is None and self._pyro_context.active:  # our first blocks: not in the store yet
                name = self._pyro_get_fullname("blocks")
                store = pyro.get_param_store()
                if name in store:
                    stored_shape = store[name].shape
                    if stored_shape != init.shape:
                        raise self._stored_blocks_error(stored_shape, init.shape)
                    warnings.warn(
                        f"the Pyro param store already holds {name!r} (another model, or an earlier run, "
                        "sharing the store); this policy uses it instead of initialising its own. Call "
                        "pyro.clear_param_store() first if that is not intended",
                        UserWarning,
                        stacklevel=2,
                    )
            self.register_buffer("index", index)
            self.register_buffer("mask", mask)
            self.register_buffer("inputs_checksum", _inputs_checksum(context.X))
            self.blocks = PyroParam(init)  # replaces (and removes from the store) blocks of an earlier n
            self._num_data = n
        blocks = self.blocks
        if blocks.shape != self.index.shape:
            raise self._stored_blocks_error(blocks.shape, self.index.shape)
        return BlockSparseActions(self.index, blocks, self.mask, n)


def _inputs_checksum(X: torch.Tensor) -> torch.Tensor:
    """An order-sensitive summary of the training inputs, ``(d,)`` in float64: row-weighted column sums."""
    flat = X.detach().double().reshape(X.shape[0], -1)
    weights = torch.cos(1.3 * torch.arange(flat.shape[0], dtype=torch.float64) + 0.2)
    return weights @ flat


def _outside_pivots(directions: torch.Tensor, pivots: torch.Tensor) -> DenseActions:
    """An orthonormal basis of the part of span(``directions``) that the unit vectors at ``pivots`` do
    not span (their rows zeroed; rank by singular values), so that stacked with those unit vectors
    the actions are independent and span the same space."""
    D = directions.detach().double().clone()
    D[pivots] = 0.0
    U, sv, _ = torch.linalg.svd(D, full_matrices=False)
    rank = int((sv > sv.max().clamp_min(1e-300) * 1e-8).sum()) if sv.numel() else 0
    rank = min(rank, D.shape[0] - len(pivots))
    return DenseActions(U[:, :rank].to(directions.dtype))


class CGPolicy(Policy):
    r"""Conjugate-gradient directions for :math:`\hat K v = y - \mu(X)` (IterGP-CG / CaGP-CG).

    Runs at most ``num_actions`` iterations of preconditioned CG with re-orthogonalisation (see
    :func:`~pyro_gpx.gp.cg.conjugate_gradients`) and returns the directions. The directions are
    recomputed at each evaluation and treated as fixed (not differentiated), as in [2]; under
    HMC/NUTS prefer a policy whose actions do not depend on the hyperparameters.

    :param tol: relative residual at which CG stops early (default
        :class:`~pyro_gpx.gp.settings.cg_tolerance`; 0 runs all ``num_actions`` iterations unless
        CG breaks down). CG also stops when a new direction falls below the resolution of the
        kernel products' dtype (float32: about :math:`10^{-7}\|K\|`), see
        :func:`~pyro_gpx.gp.cg.conjugate_gradients`. A zero residual (targets equal to the prior
        mean) gives no directions, and the posterior is the prior.
    :param preconditioner: ``None``, ``"pivoted"`` (greedy pivoted Cholesky) or ``"rpcholesky"``.
        Preconditioned directions span what the preconditioner leaves unresolved, not the kernel's
        dominant directions, so on their own they make a poor ELBO (80 points, rank 5: -237 with 3
        directions, -231 with 10, against -9.3 for 10 plain CG directions): add the pivots
        (``pivot_actions=True``) when the actions are to be trained or scored by the ELBO.
    :param preconditioner_rank: rank of the preconditioner.
    :param preconditioner_block_size: RPCholesky pivots per step (block RPCholesky,
        :func:`~pyro_gpx.gp.preconditioners.partial_cholesky`); worth it for ranks in the hundreds.
    :param max_seconds: wall-clock limit of one solve, preconditioner included; CG stops after
        the iteration that crosses it (at least one iteration runs). Useful for prediction-time
        refinement under a time budget: the posterior conditions on the directions found so far.
    :param pivot_actions: also return unit vectors at the preconditioner's pivots (the points
        whose kernel columns built it), so the posterior conditions on those observations exactly.
        CG's directions resolve the mean; with a small noise they leave the variance at new points
        near the prior (computational uncertainty), and the pivots, spread over the data by
        RPCholesky, bring it down to at most a subset-of-data GP's. They cost a kernel column each.
    :param reorthogonalize: orthogonalise each new direction twice against the earlier ones (keeps
        them conjugate in finite precision).
    :param seed: seed of the randomised (``"rpcholesky"``) preconditioner's pivots.
    """

    differentiable = False

    def __init__(
        self,
        num_actions: int,
        tol: float | None = None,
        preconditioner: str | None = None,
        preconditioner_rank: int = 100,
        reorthogonalize: bool = True,
        seed: int = 0,
        max_seconds: float | None = None,
        preconditioner_block_size: int = 1,
        pivot_actions: bool = False,
    ):
        super().__init__()
        if pivot_actions and preconditioner is None:
            raise ValueError("pivot_actions needs a preconditioner (its pivots are the actions)")
        self.pivot_actions = pivot_actions
        self.last_pivots: torch.Tensor | None = None
        if preconditioner not in (None, "pivoted", "rpcholesky"):
            raise ValueError(f"preconditioner must be None, 'pivoted' or 'rpcholesky', got {preconditioner!r}")
        check_positive_or_none("max_seconds", max_seconds)
        if tol is not None and not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0 or None, got {tol}")
        check_positive_int("preconditioner_rank", preconditioner_rank)
        self.max_seconds = max_seconds
        self.preconditioner_block_size = check_positive_int("preconditioner_block_size", preconditioner_block_size)
        self.num_actions, self.tol = num_actions, tol
        self.preconditioner, self.preconditioner_rank = preconditioner, preconditioner_rank
        self.reorthogonalize, self.seed = reorthogonalize, seed
        self.last_result: CGResult | None = None

    @torch.no_grad()
    def solve(self, context: PolicyContext) -> CGResult:
        start = time.perf_counter()
        n = context.X.shape[0]
        i = _check_num_actions(self.num_actions, n)
        noise = context.noise.detach().double()
        X = context.X.detach()
        precond = None
        if self.preconditioner is not None:
            pivoting = "greedy" if self.preconditioner == "pivoted" else "rpcholesky"
            gen = torch.Generator().manual_seed(self.seed)
            factor = build_preconditioner(
                context.kernel,
                X,
                noise,
                self.preconditioner_rank,
                pivoting=pivoting,
                generator=gen,
                block_size=self.preconditioner_block_size,  # greedy pivoting ignores it
            )
            precond, self.last_pivots = factor.solve, factor.pivots

        def matvec(v):
            return training_matmul(context.kernel, X, v[:, None])[:, 0] + noise * v.double()

        tol = self.tol if self.tol is not None else settings.cg_tolerance.value()
        seconds = None if self.max_seconds is None else max(self.max_seconds - (time.perf_counter() - start), 1e-9)
        result = conjugate_gradients(
            matvec,
            context.residual.detach(),
            i,
            tol,
            precond,
            self.reorthogonalize,
            max_seconds=seconds,
            resolution=_resolution(X.dtype),
        )
        self.last_result = result
        return result

    def actions(self, context):
        result = self.solve(context)
        # unit-norm columns: the span is what matters, and late directions can be tiny. A zero
        # residual (y equal to the prior mean) gives no directions: the posterior is the prior.
        norms = result.directions.norm(dim=0, keepdim=True).clamp_min(1e-300)
        directions = result.directions / norms
        if directions.shape[1] > 1:  # directions past a stalled residual (tol 0, tiny noise) lose conjugacy
            G = directions.T @ (result.K_directions / norms)  # and would make a stacked Gram matrix singular
            directions = directions[:, independent_columns(0.5 * (G + G.T))]
        dense = DenseActions(directions.to(context.X.dtype))
        if not self.pivot_actions or self.last_pivots is None or len(self.last_pivots) == 0:
            return dense
        n = context.X.shape[0]  # partial_cholesky never repeats a pivot (it would observe its point twice)
        pivots = IndexActions(self.last_pivots, n, context.X.dtype)
        if dense.num_actions + len(self.last_pivots) > n:  # the columns cannot be independent
            dense = _outside_pivots(directions, self.last_pivots)
        return StackedActions([dense, pivots]) if dense.num_actions else pivots
