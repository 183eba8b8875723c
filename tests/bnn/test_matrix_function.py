"""The symmetric matrix function behind the dual repriorisation: value and Daleckii-Krein gradient."""

import pytest
import torch

from pyro_gpx.bnn.matrix_function import inverse_sqrt_shrinkage, whitening_terms


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


def _psd(kind, gen):
    if kind == "full rank":
        A = torch.randn(4, 6, generator=gen)
        return A @ A.T
    if kind == "rank one":
        v = torch.randn(4, 1, generator=gen)
        return v @ v.T
    return 2.0 * torch.eye(4)


@pytest.mark.parametrize("kind", ["full rank", "rank one", "repeated"])
def test_whitening_terms_equal_dense_formulas(float64, kind):
    gen = torch.Generator().manual_seed(2)
    S, V, Y = _psd(kind, gen), torch.randn(4, 2, generator=gen), torch.randn(4, 3, generator=gen)
    shrunk, solved, logdet = whitening_terms(S, V, Y)
    torch.testing.assert_close(shrunk, inverse_sqrt_shrinkage(S) @ V)
    torch.testing.assert_close(solved, torch.linalg.solve(torch.eye(4) + S, Y))
    torch.testing.assert_close(logdet, torch.logdet(torch.eye(4) + S))


@pytest.mark.parametrize("kind", ["full rank", "rank one", "repeated"])
def test_whitening_terms_gradients_match_finite_differences(float64, kind):
    gen = torch.Generator().manual_seed(3)
    S = _psd(kind, gen).requires_grad_()
    V = torch.randn(4, 2, generator=gen, requires_grad=True)
    Y = torch.randn(4, 1, generator=gen, requires_grad=True)
    W = torch.randn(3, generator=gen)  # weights the three outputs so that all of them carry gradient

    def f(A, V, Y):
        shrunk, solved, logdet = whitening_terms(0.5 * (A + A.T), V, Y)
        return W[0] * shrunk.sin().sum() + W[1] * solved.square().sum() + W[2] * logdet

    assert torch.autograd.gradcheck(f, (S, V, Y))


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        inverse_sqrt_shrinkage(torch.ones(2, 3))
    with pytest.raises(ValueError, match="rows"):
        whitening_terms(torch.eye(3), torch.ones(2, 1), torch.ones(3, 1))
