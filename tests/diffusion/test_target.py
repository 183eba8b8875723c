"""The batched unconstrained log density against a per-point Pyro trace, for shape-safe and unsafe models."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_gpx.diffusion import AutoDiffusion

X = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(6, 2)
Y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)


def shape_safe(X, y):  # Pyro's idiom: a batched w is (..., 1, D) and broadcasts against the data plate
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=s * (X * w).sum(-1)), obs=y)


def shape_unsafe(X, y):  # correct for a single w only: the extra unsqueeze breaks batching
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=s * (X * w.unsqueeze(-2)).sum(-1)), obs=y)


def reference(z):  # log joint at (w, exp(u)) plus the log-Jacobian u of the HalfNormal's exp bijection
    w, u = z[:2], z[2]
    s = u.exp()
    lp = dist.Normal(torch.zeros(2, dtype=z.dtype), 1.0).log_prob(w).sum() + dist.HalfNormal(1.0).log_prob(s)
    return lp + dist.Bernoulli(logits=s * (X @ w)).log_prob(Y).sum() + u


@pytest.mark.parametrize("model, batched", [(shape_safe, True), (shape_unsafe, False)])
def test_log_density_and_score_match_reference(model, batched):
    pyro.set_rng_seed(0)
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    if batched:
        guide(X, Y)
    else:  # found (and reported) at the first simulation
        with pytest.warns(RuntimeWarning, match="one path at a time"):
            guide(X, Y)
    target = guide.target(X, Y)
    assert target.vectorized is batched
    z = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.stack([reference(row) for row in z])
    actual = target.log_density(z)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    expected_score = torch.stack([torch.func.grad(reference)(row) for row in z])
    torch.testing.assert_close(target.score(z), expected_score, rtol=1e-10, atol=1e-10)
