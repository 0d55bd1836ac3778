"""Kronecker factors against independent dense computation (float64, tiny networks)."""
import pytest
import torch
from torch import nn

from kfac_fast.curvature import kronecker_factors

from dense import block_sizes, dense_factors, exact_fisher, mlp

CASES = [
    ([5, 7, 6, 4], nn.Tanh, "softmax_cross_entropy"),
    ([3, 8, 5, 6], nn.Sigmoid, "sigmoid_cross_entropy"),
    ([4, 6, 6, 3, 2], nn.ReLU, "squared_error"),
    ([6, 5, 8, 3], nn.Softplus, "softmax_cross_entropy"),
]


@pytest.mark.parametrize("sizes,act,loss", CASES)
def test_exact_factors_match_dense(sizes, act, loss):
    model = mlp(sizes, act)
    x = torch.randn(11, sizes[0], dtype=torch.float64)
    fac = kronecker_factors(model, x, loss, fisher="exact", tridiagonal=True)
    A, G = dense_factors(model, x, loss)
    assert len(fac) == len(A)
    for i, f in enumerate(fac):
        torch.testing.assert_close(f.A, A[i][i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.G, G[i][i], rtol=1e-9, atol=1e-12)
        if i + 1 < len(fac):
            torch.testing.assert_close(f.A_next, A[i][i + 1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(f.G_next, G[i][i + 1], rtol=1e-9, atol=1e-12)
        else:
            assert f.A_next is None and f.G_next is None


def test_no_bias_layers_have_no_homogeneous_coordinate():
    model = mlp([4, 5, 3], nn.Tanh, bias=False)
    x = torch.randn(9, 4, dtype=torch.float64)
    fac = kronecker_factors(model, x, "softmax_cross_entropy")
    A, G = dense_factors(model, x, "softmax_cross_entropy")
    assert fac[0].A.shape == (4, 4) and not fac[0].homogeneous
    torch.testing.assert_close(fac[1].A, A[1][1])
    torch.testing.assert_close(fac[1].G, G[1][1])


def test_kronecker_block_equals_exact_fisher_for_linear_gaussian():
    # One linear layer, Gaussian output: F = E[x̄x̄ᵀ] ⊗ I exactly (Sec 3 theory).
    model = mlp([5, 3], bias=True)
    x = torch.randn(13, 5, dtype=torch.float64)
    (f,) = kronecker_factors(model, x, "squared_error", fisher="exact")
    F = exact_fisher(model, x, "squared_error")
    torch.testing.assert_close(torch.kron(f.A, f.G), F, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.G, torch.eye(3, dtype=torch.float64))


def test_kronecker_approximation_vs_exact_fisher_is_reported():
    # Elsewhere F̃ only approximates F: report the relative error of the diagonal blocks.
    model = mlp([4, 6, 5, 3], nn.Tanh)
    x = torch.randn(17, 4, dtype=torch.float64)
    fac = kronecker_factors(model, x, "softmax_cross_entropy")
    F = exact_fisher(model, x, "softmax_cross_entropy").detach()
    off = 0
    for i, (r, c) in enumerate(block_sizes(model)):
        n = r * c
        block = F[off : off + n, off : off + n]
        approx = torch.kron(fac[i].A, fac[i].G)
        rel = float((approx - block).norm() / block.norm())
        print(f"layer {i}: ‖Ā⊗G − F_ii‖/‖F_ii‖ = {rel:.3f}")
        assert rel < 1.0  # same order of magnitude, not equal
        off += n


def test_mc_factors_converge_to_exact():
    model = mlp([3, 5, 4], nn.Tanh)
    x = torch.randn(6, 3, dtype=torch.float64)
    exact = kronecker_factors(model, x, "softmax_cross_entropy", fisher="exact")
    gen = torch.Generator().manual_seed(1)
    mc = kronecker_factors(model, x, "softmax_cross_entropy", fisher="mc", mc_samples=3000, generator=gen)
    for e, m in zip(exact, mc):
        torch.testing.assert_close(m.A, e.A)  # A does not depend on y
        rel = float((m.G - e.G).norm() / e.G.norm())
        assert rel < 0.08, rel


def test_empirical_factors_use_true_targets():
    model = mlp([3, 4, 2], nn.Tanh)
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    fac = kronecker_factors(model, x, "squared_error", fisher="empirical", targets=y)
    # independent: per-example grads of ½‖y − z‖² w.r.t. the last pre-activation are z − y
    with torch.no_grad():
        z = model(x)
    g = z - y
    torch.testing.assert_close(fac[-1].G, g.t() @ g / 7)


def test_factor_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no supported layer"):
        kronecker_factors(nn.Sequential(nn.Tanh()), x, "squared_error")
    with pytest.raises(ValueError, match="unsupported layer nn.Conv3d at model.1"):
        kronecker_factors(nn.Sequential(nn.Linear(3, 3), nn.Conv3d(1, 1, 1)), x, "squared_error")
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="called 2 times"):
        kronecker_factors(nn.Sequential(lin, nn.Tanh(), lin), x, "squared_error")
    with pytest.raises(ValueError, match="unknown loss"):
        kronecker_factors(nn.Sequential(nn.Linear(3, 2)), x, "hinge")
    with pytest.raises(ValueError, match="unknown fisher"):
        kronecker_factors(nn.Sequential(nn.Linear(3, 2)), x, "squared_error", fisher="true")
    with pytest.raises(ValueError, match="targets must have shape"):
        kronecker_factors(nn.Sequential(nn.Linear(3, 2)), x, "softmax_cross_entropy", fisher="empirical",
                          targets=torch.zeros(4, 2, dtype=torch.long))


def test_unused_layer_is_an_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ValueError, match="model.unused was not used"):
        kronecker_factors(M(), torch.randn(4, 3), "squared_error")
