"""The symmetric matrix function behind the dual repriorisation: value and Daleckii-Krein gradient."""

import pytest
import torch

from pyro_gpx.bnn.matrix_function import inverse_sqrt_shrinkage


def _symmetric_input(S):
    return lambda A: inverse_sqrt_shrinkage(0.5 * (A + A.T))


def test_value_is_the_symmetric_inverse_square_root(float64):
    gen = torch.Generator().manual_seed(0)
    Phi, noise = torch.randn(4, 9, generator=gen), 0.7
    shrink = inverse_sqrt_shrinkage(Phi @ Phi.T / noise)
    root = torch.eye(9) + Phi.T @ shrink @ Phi / noise
    torch.testing.assert_close(root, root.T)
    torch.testing.assert_close(root @ root, noise * torch.linalg.inv(Phi.T @ Phi + noise * torch.eye(9)))


@pytest.mark.parametrize("kind", ["full rank", "rank one", "repeated"])
def test_gradient_matches_finite_differences(float64, kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "full rank":
        A = torch.randn(4, 6, generator=gen)
        S = A @ A.T
    elif kind == "rank one":  # three equal zero eigenvalues: eigh's own backward would divide by zero
        v = torch.randn(4, 1, generator=gen)
        S = v @ v.T
    else:
        S = 2.0 * torch.eye(4)
    S.requires_grad_()
    assert torch.autograd.gradcheck(_symmetric_input(S), (S,))
    loss = inverse_sqrt_shrinkage(S).square().sum()
    (grad,) = torch.autograd.grad(loss, S)
    assert torch.isfinite(grad).all()


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        inverse_sqrt_shrinkage(torch.ones(2, 3))
