"""GradientMassMatrix: exact on a diagonal Gaussian, the population limit on a correlated one, errors."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS

from pyro_gpx.bnn import GradientMassMatrix


def _configured(size: int) -> GradientMassMatrix:
    adapter = GradientMassMatrix()
    adapter.configure({("a", "b"): (size,)}, options={"dtype": torch.float64})
    return adapter


def _feed(adapter, z: np.ndarray, g: np.ndarray) -> None:
    for zi, gi in zip(torch.as_tensor(z), torch.as_tensor(g)):
        adapter.update({"a": zi[:2], "b": zi[2:].reshape(-1, 1)}, {"a": gi[:2], "b": gi[2:].reshape(-1, 1)})


def test_a_diagonal_gaussian_is_recovered_exactly_from_a_few_draws(float64):
    # g = (z - mu) / sigma^2 makes sqrt(Var z / Var g) = sigma^2 and mean z - sigma^2 mean g = mu for any draws
    rng = np.random.default_rng(0)
    mu, sigma = np.array([1.0, -2.0, 0.0, 5.0]), np.array([0.01, 1.0, 3.0, 100.0])
    z = mu + sigma * rng.standard_normal((30, 4)) * 0.3 + 0.7  # biased, too narrow: no matter
    adapter = _configured(4)
    _feed(adapter, z, (z - mu) / sigma**2)
    adapter.end_adaptation()
    np.testing.assert_allclose(adapter.inverse_mass_matrix[("a", "b")].numpy(), sigma**2, rtol=1e-10)
    np.testing.assert_allclose(adapter.centre[("a", "b")].numpy(), mu, rtol=1e-10, atol=1e-10)


def test_a_correlated_gaussian_gives_the_geometric_mean_of_variance_and_inverse_precision(float64):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((3, 3))
    cov = A @ A.T + 0.5 * np.eye(3)
    prec = np.linalg.inv(cov)
    z = rng.multivariate_normal(np.zeros(3), cov, size=20_000)
    adapter = _configured(3)
    _feed(adapter, z, z @ prec)
    adapter.end_adaptation()
    expected = np.sqrt(np.diag(cov) / np.diag(prec))
    np.testing.assert_allclose(adapter.inverse_mass_matrix[("a", "b")].numpy(), expected, rtol=0.03)
    np.testing.assert_allclose(adapter.centre[("a", "b")].numpy(), 0.0, atol=0.05 * np.sqrt(np.diag(cov)).max())
    assert (expected <= np.diag(cov)).all() and (expected >= 1 / np.diag(prec)).all()


def test_nuts_with_the_adapter_learns_a_badly_scaled_diagonal_gaussian_exactly(float64):
    scale = torch.tensor([0.1, 1.0, 10.0])

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), scale).to_event(1))

    pyro.set_rng_seed(0)
    kernel = NUTS(model)
    kernel.mass_matrix_adapter = GradientMassMatrix()
    mcmc = MCMC(kernel, num_samples=500, warmup_steps=150, disable_progbar=True)
    mcmc.run()
    # whatever draws the last window saw, a diagonal Gaussian's variance comes out exactly
    learned = kernel.mass_matrix_adapter.inverse_mass_matrix[("x",)]
    torch.testing.assert_close(learned, scale**2, rtol=1e-8, atol=0)
    x = mcmc.get_samples()["x"]
    torch.testing.assert_close(x.std(0) / scale, torch.ones(3), rtol=0.15, atol=0)


def test_errors(float64):
    for name, bad in (("init_scale", 0.0), ("init_scale", -1.0), ("min_variance", -1.0)):  # init_scale 0 hung NUTS
        with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
            GradientMassMatrix(**{name: bad})
    adapter = GradientMassMatrix()
    with pytest.raises(NotImplementedError, match="full_mass"):
        adapter.configure({("a",): (3, 3)})
    adapter = _configured(4)
    with pytest.raises(ValueError, match="z_grad"):
        adapter.update({"a": torch.zeros(2), "b": torch.zeros(2, 1)}, None)
    adapter.update({"a": torch.zeros(2), "b": torch.zeros(2, 1)}, {"a": torch.ones(2), "b": torch.ones(2, 1)})
    with pytest.raises(RuntimeError, match="Insufficient"):
        adapter.end_adaptation()
