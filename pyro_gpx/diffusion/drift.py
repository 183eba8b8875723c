r"""Time-conditioned drift networks :math:`u_\phi(z, t)`.

.. math::

    u_\phi(z, t) = \mathrm{MLP}_1([z, \gamma(t)]) + \mathrm{MLP}_2(\gamma(t)) \odot \nabla_z\log\rho(z),

with Fourier time features :math:`\gamma(t)`; the second term (optional) feeds the target's score
to the drift as PIS and DDS do [1, 2]. Output layers start at zero, so an untrained sampler is
exactly its reference process (for DIS, that process's Euler-Maruyama chain, which is only close to
stationary; see :mod:`~pyro_gpx.diffusion.processes`).

References:

[1] Q. Zhang, Y. Chen. Path integral sampler: a stochastic control approach for sampling. ICLR 2022.
[2] F. Vargas, W. Grathwohl, A. Doucet. Denoising diffusion samplers. ICLR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_positive_int, check_positive_or_none

__all__ = ["DriftNet"]


def _affine(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:math:`x W^\\top + b` with the transposed weight given (one ``addmm`` for a matrix ``x``)."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight_t)
    return torch.matmul(x, weight_t) + bias


class DriftNet(nn.Module):
    """:param dim: latent dimension; :param hidden: MLP width; :param depth: hidden layers;
    :param use_score: add the score term; :param time_features: number of Fourier time features;
    :param score_clip: the score is clipped to ``[-score_clip, score_clip]`` per coordinate (as PIS
        does): targets such as Neal's funnel have scores that explode in their narrow regions (``None``: no clip).
    :param drift_clip: if given, the drift is softly bounded, :math:`c\\tanh(b / c)` per coordinate, so
        that a poorly trained network cannot throw a path to overflowing values."""

    frequencies: torch.Tensor

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 2,
        use_score: bool = True,
        time_features: int = 16,
        score_clip: float = 100.0,
        drift_clip: float | None = None,
    ):
        super().__init__()
        dim, hidden = check_positive_int("dim", dim), check_positive_int("hidden", hidden)
        depth, time_features = check_positive_int("depth", depth), check_positive_int("time_features", time_features)
        check_positive_or_none("score_clip", score_clip)
        check_positive_or_none("drift_clip", drift_clip)
        self.dim, self.use_score = dim, use_score
        self.score_clip = None if score_clip is None else float(score_clip)  # None: no clipping
        self.drift_clip = drift_clip
        self.register_buffer("frequencies", torch.arange(1, time_features // 2 + 1, dtype=torch.float32) * math.pi)
        layers, width = [], dim + 2 * (time_features // 2)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if use_score:
            embedding = 2 * (time_features // 2)
            gate_in, gate_out = nn.Linear(embedding, hidden), nn.Linear(hidden, dim)
            self.score_gate = nn.Sequential(gate_in, nn.SiLU(), gate_out)
            nn.init.zeros_(gate_out.weight)
            nn.init.zeros_(gate_out.bias)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[..., None] * self.frequencies.to(t.dtype)
        return torch.cat([torch.sin(angles), torch.cos(angles)], -1)

    def functional(self, times: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
        """The forward pass with every parameter read once, as ``f(z, t, score=None)``.

        A path simulation calls the drift at each of its :math:`K` steps. Inside a Pyro guide the
        network is a ``PyroModule``, which looks each parameter up in Pyro's parameter store on every
        access; reading them once per path batch cut an SVI step by a third (16 steps, a 2 x 64
        network, 16 paths: 23 to 15 ms). Gradients reach the parameters through the returned function.

        :param times: the step times the function will be called at (``(K,)``): everything that depends
            on :math:`t` alone (the time features' part of the first layer, the score gate) is then
            computed for all of them at once, and each call runs only the layers that see :math:`z`.
        """
        first, *hidden_layers = [m for m in self.body if isinstance(m, nn.Linear)]
        dim = self.dim
        weight_z, weight_t = first.weight[:, :dim], first.weight[:, dim:]
        # transposed once per path batch: F.linear on a matrix transposes its weight at every call
        weight_z_t = weight_z.T
        rest = [(m.weight.T, m.bias) for m in hidden_layers]
        out = (self.out.weight.T, self.out.bias)
        gate = [(m.weight, m.bias) for m in self.score_gate if isinstance(m, nn.Linear)] if self.use_score else []
        frequencies, use_score = self.frequencies, self.use_score
        score_clip, drift_clip = self.score_clip, self.drift_clip

        def time_terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            angles = t[:, None] * frequencies.to(t.dtype)
            emb = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
            hidden = F.linear(emb, weight_t, first.bias)
            return hidden, F.linear(F.silu(F.linear(emb, *gate[0])), *gate[1]) if use_score else None

        cached = {}
        if times is not None:
            keys = [float(t) for t in times]  # the callers' values, before any cast
            hidden, gates = time_terms(torch.as_tensor(times, dtype=weight_z.dtype))
            cached = {t: (hidden[i], None if gates is None else gates[i]) for i, t in enumerate(keys)}

        def forward(z: torch.Tensor, t: float, score: torch.Tensor | None = None) -> torch.Tensor:
            if float(t) in cached:
                hidden_t, gate_t = cached[float(t)]
            else:
                if not math.isfinite(float(t)):  # a Python number: cheap, and off the cached path
                    raise ValueError(f"t must be a finite number, got {t!r}")
                hidden_t, gate_t = time_terms(torch.tensor([float(t)], dtype=z.dtype))
            h = F.silu(_affine(z, weight_z_t, hidden_t))
            for layer in rest:
                h = F.silu(_affine(h, *layer))
            drift = _affine(h, *out)
            if use_score:
                if score is None:
                    raise ValueError("this drift uses the target's score; pass score=")
                assert gate_t is not None  # time_terms returns the gate whenever use_score
                drift = drift + gate_t * (score if score_clip is None else score.clamp(-score_clip, score_clip))
            if drift_clip is not None:
                drift = drift_clip * torch.tanh(drift / drift_clip)
            return drift

        return forward

    def forward(self, z: torch.Tensor, t: float, score: torch.Tensor | None = None) -> torch.Tensor:
        return self.functional()(z, t, score)
