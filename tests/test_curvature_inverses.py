"""F̆⁻¹v, F̂⁻¹v and Appendix B against dense float64 solves."""
import math

import pytest
import torch
from torch import nn

from kfac_fast.curvature import (BlockDiagonal, BlockTridiagonal, KroneckerFactors, kron_sum_inverse,
                                 kron_sum_inverse_identity, kronecker_factors, pi_trace)

from dense import blocks_to_vec, mlp, vec, vec_to_blocks

D = torch.float64


def spd(n, cond=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    s = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (Q * s) @ Q.t()


def psd(n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g, dtype=D)
    return X @ X.t() / rank


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("a,b", [(1, 1), (3, 5), (7, 4)])
def test_kron_sum_inverse_matches_dense(sign, a, b):
    A, B = spd(a, seed=1), spd(b, seed=2)
    scale = 0.3 if sign < 0 else 1.0  # keep A⊗B − C⊗D positive definite
    C, Dm = scale * psd(a, 2, seed=3), scale * psd(b, 3, seed=4)
    inv = kron_sum_inverse(A, B, C, Dm, sign=sign)
    M = torch.kron(A, B) + sign * torch.kron(C, Dm)
    if sign < 0:
        assert float(torch.linalg.eigvalsh(M).min()) > 0
    V = torch.randn(b, a, dtype=D)
    expected = torch.linalg.solve(M, vec(V))
    torch.testing.assert_close(vec(inv.apply(V)), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sign", [1, -1])
def test_kron_sum_inverse_identity_form(sign):
    C, Dm = psd(4, 4, seed=5), psd(3, 2, seed=6)
    xi = 2.5
    inv = kron_sum_inverse_identity(xi, C, Dm, sign=sign)
    M = xi * torch.eye(12, dtype=D) + sign * torch.kron(C, Dm)
    V = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(vec(inv.apply(V)), torch.linalg.solve(M, vec(V)), rtol=1e-9, atol=1e-11)


def test_kron_sum_errors():
    A = spd(3)
    with pytest.raises(ValueError, match="sign"):
        kron_sum_inverse(A, A, A, A, sign=2)
    with pytest.raises(ValueError, match="positive definite"):
        kron_sum_inverse(torch.zeros(3, 3, dtype=D), A, A, A)
    with pytest.raises(ValueError, match="not positive definite"):
        kron_sum_inverse(A, A, 2 * A, A, sign=-1)
    with pytest.raises(ValueError, match="NaN"):
        kron_sum_inverse(A, A, A * float("nan"), A)


def _factors(sizes=(5, 6, 4, 3), act=nn.Tanh, loss="softmax_cross_entropy", m=9, bias=True, seed=0):
    model = mlp(list(sizes), act, bias=bias, seed=seed)
    x = torch.randn(m, sizes[0], dtype=D)
    return model, kronecker_factors(model, x, loss, fisher="exact", tridiagonal=True)


def _damped(f, gamma, pi):
    A = f.A + pi * gamma * torch.eye(f.A.shape[0], dtype=D)
    G = f.G + gamma / pi * torch.eye(f.G.shape[0], dtype=D)
    return A, G


def _random_grads(factors):
    return [torch.randn(f.G.shape[0], f.A.shape[0], dtype=D) for f in factors]


@pytest.mark.parametrize("gamma", [0.0, 0.05, 1.3])
@pytest.mark.parametrize("pi", ["trace", 0.7])
@pytest.mark.parametrize("factorization", ["eigh", "cholesky"])
def test_block_diagonal_matches_dense_solve(gamma, pi, factorization):
    # m > d_in + 1 so the undamped factors are invertible
    # squared error: G is invertible (softmax's G is singular: logits are shift-invariant)
    _, fac = _factors(sizes=(4, 5, 3), m=12, loss="squared_error")
    bd = BlockDiagonal(fac, damping=gamma, pi=pi, factorization=factorization)
    assert bd.factorization == ("cholesky" if factorization == "cholesky" and gamma > 0 else "eigh")
    bd = bd.with_damping(gamma)
    V = _random_grads(fac)
    U = bd.apply(V)
    for f, v, u in zip(fac, V, U):
        p = pi_trace(f.A, f.G) if pi == "trace" else pi
        A, G = _damped(f, gamma, p)
        expected = torch.linalg.solve(torch.kron(A, G), vec(v))
        torch.testing.assert_close(vec(u), expected, rtol=1e-8, atol=1e-10)


def test_pi_trace_formula():
    A, G = spd(4, seed=1), spd(3, seed=2)
    expected = math.sqrt((torch.trace(A) / 4) / (torch.trace(G) / 3))
    assert abs(pi_trace(A, G) - expected) < 1e-12


@pytest.mark.parametrize("gamma", [0.0, 0.4])
def test_block_diagonal_exact_damping(gamma):
    _, fac = _factors(sizes=(3, 4, 2), m=10, loss="squared_error")
    bd = BlockDiagonal(fac, damping=gamma, exact_damping=True)
    V = _random_grads(fac)
    for f, v, u in zip(fac, V, bd.apply(V)):
        M = torch.kron(f.A, f.G) + gamma ** 2 * torch.eye(f.A.shape[0] * f.G.shape[0], dtype=D)
        torch.testing.assert_close(vec(u), torch.linalg.solve(M, vec(v)), rtol=1e-7, atol=1e-9)


def _dense_Fhat_inverse(fac, gamma):
    """F̂⁻¹ = ΞᵀΛΞ built densely from the definitions of Sec 4.3 (dense Kronecker products)."""
    L = len(fac)
    pis = [pi_trace(f.A, f.G) for f in fac]
    diag = []
    for f, p in zip(fac, pis):
        A, G = _damped(f, gamma, p)
        diag.append(torch.kron(A, G))
    cross = [torch.kron(fac[i].A_next, fac[i].G_next) for i in range(L - 1)]  # F̃_{i,i+1}
    sizes = [d.shape[0] for d in diag]
    offs = [sum(sizes[:i]) for i in range(L)]
    n = sum(sizes)
    Xi = torch.eye(n, dtype=D)
    Lam = torch.zeros(n, n, dtype=D)
    for i in range(L):
        si = slice(offs[i], offs[i] + sizes[i])
        if i < L - 1:
            sj = slice(offs[i + 1], offs[i + 1] + sizes[i + 1])
            Psi = cross[i] @ torch.linalg.inv(diag[i + 1])
            Xi[si, sj] = -Psi
            Sigma = diag[i] - Psi @ diag[i + 1] @ Psi.t()
        else:
            Sigma = diag[i]
        Lam[si, si] = torch.linalg.inv(Sigma)
    return Xi.t() @ Lam @ Xi, diag, cross, sizes, offs


@pytest.mark.parametrize("gamma,sizes,act,loss", [
    (0.0, (4, 5, 4, 3), nn.Tanh, "squared_error"),
    (0.02, (3, 4, 4, 3, 2), nn.Sigmoid, "squared_error"),
    (0.02, (5, 6, 4, 3), nn.Tanh, "softmax_cross_entropy"),
    (0.5, (5, 6, 4, 3), nn.Tanh, "softmax_cross_entropy"),
    (0.1, (4, 5, 5, 6), nn.ReLU, "sigmoid_cross_entropy"),
])
def test_block_tridiagonal_matches_dense(gamma, sizes, act, loss):
    _, fac = _factors(sizes=sizes, act=act, loss=loss, m=40)
    P, diag, cross, bs, offs = _dense_Fhat_inverse(fac, gamma)
    # F̂ = P⁻¹ agrees with (damped) F̃ on the tridiagonal blocks, and P is block-tridiagonal by construction
    Fhat = torch.linalg.inv(P)
    L = len(fac)
    for i in range(L):
        si = slice(offs[i], offs[i] + bs[i])
        # norm-relative: undamped F̃ is ill-conditioned, so elementwise checks are too strict
        assert float((Fhat[si, si] - diag[i]).norm()) <= 1e-6 * float(diag[i].norm())
        if i < L - 1:
            sj = slice(offs[i + 1], offs[i + 1] + bs[i + 1])
            assert float((Fhat[si, sj] - cross[i]).norm()) <= 1e-6 * float(diag[i].norm())
        for j in range(i + 2, L):
            sj = slice(offs[j], offs[j] + bs[j])
            assert float(P[si, sj].abs().max()) < 1e-9
    bt = BlockTridiagonal(fac, damping=gamma)
    V = _random_grads(fac)
    U = bt.apply(V)
    shapes = [(f.G.shape[0], f.A.shape[0]) for f in fac]
    expected = vec_to_blocks(P @ blocks_to_vec(V), shapes)
    for u, e in zip(U, expected):
        assert float((u - e).norm()) <= 1e-7 * float(e.norm()), float((u - e).norm() / e.norm())


def test_tridiagonal_single_layer_equals_block_diagonal():
    _, fac = _factors(sizes=(4, 3), m=10)
    V = _random_grads(fac)
    torch.testing.assert_close(BlockTridiagonal(fac, damping=0.1).apply(V)[0],
                               BlockDiagonal(fac, damping=0.1).apply(V)[0])


@pytest.mark.parametrize("m", [2, 5, 30])
@pytest.mark.parametrize("factorization", ["eigh", "cholesky"])
def test_rank_m_trick_equals_direct_path(m, factorization):
    model, fac = _factors(sizes=(9, 12, 7, 4), m=20)
    bd = BlockDiagonal(fac, damping=0.3, factorization=factorization)
    X = [torch.randn(m, f.A.shape[0] - 1, dtype=D) for f in fac]
    Gm = [torch.randn(m, f.G.shape[0], dtype=D) for f in fac]
    V = [g.t() @ torch.cat([x, torch.ones(m, 1, dtype=D)], 1) / m for x, g in zip(X, Gm)]
    direct = bd.apply(V)
    for rank_m in (True, False, None):
        U = bd.apply_per_example(X, Gm, scale=1.0 / m, rank_m=rank_m)
        for u, d in zip(U, direct):
            torch.testing.assert_close(u, d, rtol=1e-9, atol=1e-11)


def test_cholesky_falls_back_to_eigh_on_indefinite_factor():
    _, fac = _factors(sizes=(4, 5, 3), m=12, loss="squared_error")
    bad = [KroneckerFactors(A=f.A.clone(), G=f.G.clone()) for f in fac]
    bad[0].A -= 10 * torch.eye(bad[0].A.shape[0], dtype=D)  # indefinite beyond what damping 0.1 fixes
    chol = BlockDiagonal(bad, damping=0.1, factorization="cholesky")
    eig = BlockDiagonal(bad, damping=0.1, factorization="eigh")
    assert chol.factorization == "eigh" and chol.eig is not None
    V = _random_grads(fac)
    for a, b in zip(chol.apply(V), eig.apply(V)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exact_damping=True needs eigendecompositions"):
        BlockDiagonal(fac, damping=0.1, exact_damping=True, factorization="cholesky")
    with pytest.raises(ValueError, match="unknown factorization"):
        BlockDiagonal(fac, damping=0.1, factorization="qr")


def test_inverse_errors():
    _, fac = _factors(sizes=(4, 5, 3), m=3)  # m < d_in+1: Ā singular
    with pytest.raises(ValueError, match="damping"):
        BlockDiagonal(fac, damping=-1.0)
    with pytest.raises(ValueError, match="singular.*use damping > 0"):
        BlockDiagonal(fac, damping=0.0)
    bd = BlockDiagonal(fac, damping=0.1)
    with pytest.raises(ValueError, match="expected 2 gradient blocks"):
        bd.apply(_random_grads(fac)[:1])
    with pytest.raises(ValueError, match="must have shape"):
        bd.apply([torch.zeros(2, 2, dtype=D), torch.zeros(2, 2, dtype=D)])
    bad = [KroneckerFactors(A=f.A.clone(), G=f.G.clone(), A_next=f.A_next, G_next=f.G_next) for f in fac]
    bad[1].G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1: factor G contains NaN"):
        BlockDiagonal(bad, damping=0.1)
    with pytest.raises(ValueError, match="pi must be"):
        BlockDiagonal(fac, damping=0.1, pi="frobenius")
    no_cross = [KroneckerFactors(A=f.A, G=f.G) for f in fac]
    with pytest.raises(ValueError, match="tridiagonal=True"):
        BlockTridiagonal(no_cross, damping=0.1)
