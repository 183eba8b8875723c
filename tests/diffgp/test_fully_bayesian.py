"""Fully Bayesian DiffGP: flow hyperparameters with priors under the diffusion guide and autoguides."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from pyro_gpx.diffgp import DifferentialGP, FlowKernel, InducingNormal, predict
from pyro_gpx.diffusion import AutoDiffusion, PathELBO

HYPER = ["flow.lengthscale", "flow.outputscale"]
INDUCING = ["flow_inducing", "output_inducing"]


def _model():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)
    flow = FlowKernel(2, lengthscale_prior=dist.LogNormal(0.0, 1.0), outputscale_prior=dist.LogNormal(-2.0, 1.0))
    return DifferentialGP(X, num_inducing=6, flow=flow, num_paths=2, num_steps=4, noise=0.1), X, y


def test_diffusion_over_hyperparameters_with_inducing_normal(float64):
    """AutoDiffusion over theta beside InducingNormal over u, trained with vectorised Trace_ELBO particles;
    the trained hyperparameter draws move the likelihood."""
    model, X, y = _model()
    guide = AutoGuideList(model)
    guide.append(AutoDiffusion(poutine.block(model, expose=HYPER), num_steps=4, hidden=16, use_score=False,
                               init_scale=0.1))  # fmt: skip
    guide.append(InducingNormal(poutine.block(model, expose=INDUCING)))
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    losses = [svi.step(X, y) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    draws = [guide(X, y) for _ in range(20)]
    ls = torch.stack([d["flow.lengthscale"] for d in draws])
    assert (ls > 0).all() and ls.std(0).min() > 0  # a distribution over theta, not a point
    assert predict(model, guide, X, num_samples=3).loc.shape == (6, 40)


def test_joint_diffusion_guide_with_path_elbo(float64):
    """One AutoDiffusion over (theta, u) jointly, trained by PathELBO on the batched target."""
    model, X, y = _model()
    guide = AutoDiffusion(model, num_steps=4, hidden=32, use_score=False, init_scale=0.1, vectorized=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), PathELBO(num_paths=4))
    losses = [svi.step(X, y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert guide(X, y)["flow_inducing"].shape == (2, 6)


def test_autonormal_over_everything(float64):
    model, X, y = _model()
    guide = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    assert all(math.isfinite(svi.step(X, y)) for _ in range(5))
