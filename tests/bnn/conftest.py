import pytest
import torch


@pytest.fixture
def data(float64):
    """40 regression points in 3-d (float64)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen)
    y = torch.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.1 * torch.randn(40, generator=gen)
    return X, y
