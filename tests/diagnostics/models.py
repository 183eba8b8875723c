"""Small Pyro models shared by the diagnostics tests, with hand-written log-likelihoods."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch


def linreg(X, y=None):
    """Shape-safe Bayesian linear regression (vectorises over draws)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (X * w).sum(-1) + b
    with pyro.plate("data", X.shape[0]):
        pyro.deterministic("mean", mean, event_dim=0)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def linreg_log_lik(samples, X, y):
    """(draws, n) pointwise log-likelihood of ``linreg`` by hand."""
    mean = samples["w"] @ X.T + samples["b"][:, None]
    return dist.Normal(mean, samples["sigma"][:, None]).log_prob(y)


def linreg_matmul(X, y=None):
    """The same model written with ``X @ w``: not shape-safe, so draws must be looped."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w + b, sigma), obs=y)


def masked_with_factor(y, mask):
    """Masked observations plus a ``pyro.factor`` (which is not data)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    pyro.factor("shrink", -0.5 * mu**2)
    with pyro.plate("data", y.shape[0]), poutine.mask(mask=mask):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def dist_masked(y, mask):
    """Masking through ``Distribution.mask`` instead of ``poutine.mask``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).mask(mask), obs=y)


def scaled(y, scale):
    """A tempered likelihood: ``poutine.scale`` on the observations."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", y.shape[0]), poutine.scale(scale=scale):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def subsampled(y, batch_size):
    """Observations in a subsampled plate (scale N / batch_size inside Pyro)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("data", y.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("y", dist.Normal(mu, sigma), obs=y[idx])


def branching(y):
    """Branches on ``.item()``: fails when batched over draws."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    scale = 1.0 if mu.item() > 0 else 2.0
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def reducing(y):
    """Sums a latent vector with ``.sum()``: batched evaluation runs but is silently wrong."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)


def two_plates(y):
    """A (groups x members) grid of observations with a group-level latent."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", y.shape[0], dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("members", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(theta, 0.5), obs=y)


def draws(num, **shapes):
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, shape in shapes.items():
        value = torch.randn((num,) + tuple(shape), generator=gen)
        out[name] = value.abs() + 0.1 if name == "sigma" else value
    return out


def sign_branching(y):
    """Shape-safe for one draw, but its Python branch reads every draw's sign at once."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = 2.0 if bool((mu > 0).all()) else 1.0
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)
