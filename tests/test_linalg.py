import pytest
import torch

from pyro_gpx._linalg import gram


def test_gram_value_and_gradient_match_autograd():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 4, generator=gen, dtype=torch.float64)  # not symmetric: both uses of A count
    (gram(A) * weights).sum().backward()
    ours = A.grad.clone()
    A.grad = None
    ((A.T @ A) * weights).sum().backward()
    assert torch.allclose(gram(A), A.T @ A, rtol=1e-14, atol=0)
    assert torch.allclose(ours, A.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(gram, (A.detach().requires_grad_(),))


def test_gram_of_a_transposed_view():
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    gram(A.T).trace().backward()  # tr(A A^T) = |A|^2: gradient 2A
    assert torch.allclose(A.grad, 2 * A.detach())


def test_gram_rejects_non_matrices():
    with pytest.raises(ValueError, match="matrix"):
        gram(torch.randn(2, 3, 4))
