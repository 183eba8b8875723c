"""StandardizedGenerator: the generated weights keep zero mean and unit variance whatever g learns."""

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_gpx.bll import BayesianLastLayer, GaussianHead, ImplicitWeightPrior, StandardizedGenerator
from pyro_gpx.diffusion import AutoDiffusion, PathELBO


def test_linear_generator_is_the_closed_form_affine_map(float64):
    # g(z) = A z + b: the standardized prior is N(D^-1 (b - m), D^-1 A A^T D^-1) with m, D from the probes
    A = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 0.3]])
    b = torch.tensor([0.7, -2.0, 0.1])
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(A)
        linear.bias.copy_(b)
    g = StandardizedGenerator(linear, latent_dim=2, num_probes=64, seed=5)
    probes = g.probes.numpy()
    reference = probes @ A.numpy().T + b.numpy()
    m, d = reference.mean(0), reference.std(0, ddof=1)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(1))
    expected = (z.numpy() @ A.numpy().T + b.numpy() - m) / d
    torch.testing.assert_close(g(z), torch.as_tensor(expected))
    # over the probes: exactly zero mean and unit standard deviation per weight
    out = g(g.probes)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(0), torch.ones(3))


def test_moments_hold_under_training_and_fresh_latents(float64):
    X, y = torch.randn(40, 3), torch.randn(40) + 3.0  # a large offset pulls the last layer's bias away from 0
    prior = ImplicitWeightPrior.mlp(5, latent_dim=2, hidden=8, standardize=True, learn_scale=True)
    model = BayesianLastLayer(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), 4, GaussianHead(0.5), prior)
    guide = AutoDiffusion(model, num_steps=4, hidden=8)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), PathELBO(num_paths=8))
    before = None
    for step in range(30):
        svi.step(X, y)
        if step == 0:
            before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for name in ("prior.generator.generator.0.weight", "prior.scale"):
        assert not torch.equal(pyro.param(name).detach(), before[name]), name
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        W = model.prior.generator(z)
    # Monte Carlo error of the 256 probes and of the 20 000 fresh draws
    assert W.mean(0).abs().max() < 0.2
    assert (W.std(0) - 1).abs().max() < 0.2


def test_state_dict_round_trip_and_bad_input(float64):
    g = StandardizedGenerator(nn.Linear(2, 3), latent_dim=2)
    copy = StandardizedGenerator(nn.Linear(2, 3), latent_dim=2, seed=9)
    copy.load_state_dict(g.state_dict())
    z = torch.randn(4, 2)
    torch.testing.assert_close(copy(z), g(z))
    with pytest.raises(ValueError, match="num_probes"):
        StandardizedGenerator(nn.Linear(2, 3), latent_dim=2, num_probes=1)
    with pytest.raises(ValueError, match="latent_dim"):
        StandardizedGenerator(nn.Linear(2, 3), latent_dim=0)
