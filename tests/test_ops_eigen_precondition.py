"""eigen_precondition: Triton vs reference, and the three uses (factored Tikhonov, exact
Tikhonov eqn (6), Appendix B) against float64 dense Kronecker algebra."""
import pytest
import torch

from _kernel_utils import assert_close_scaled, needs_compiled_triton, noncontig, orth, spd
from kfac_fast.ops import eigen_precondition, eigen_precondition_ref
from kfac_fast.ops.eigen_precondition import _eigen_precondition_triton

# (d_out, d_in + 1) gradient shapes: odd, mixed, including 1 and 130.
SHAPES = [(130, 34), (7, 1), (1, 8), (33, 131)]


def _inputs(shapes, dtype=torch.float32, device="cpu"):
    V = [torch.randn(p, n, device=device).to(dtype) for p, n in shapes]
    QL = [orth(p, device=device).to(dtype) for p, _ in shapes]
    QR = [orth(n, device=device).to(dtype) for _, n in shapes]
    sL = [torch.rand(p, device=device) + 0.1 for p, _ in shapes]
    sR = [torch.rand(n, device=device) + 0.1 for _, n in shapes]
    return V, QL, sL, QR, sR


def _vec(V):  # column-major vec, so (A ⊗ G) vec(V) = vec(G V Aᵀ)
    return V.T.reshape(-1)


def _unvec(v, p, n):
    return v.reshape(n, p).T


@pytest.mark.parametrize("dtype, sigma", [(torch.float32, 1), (torch.float32, -1), (torch.float16, -1),
                                          (torch.bfloat16, 1)])
def test_matches_reference(dtype, sigma):
    V, QL, sL, QR, sR = _inputs(SHAPES, dtype)
    kw = dict(cL=[0.1, 0.2, 0.3, 0.4], cR=0.5, c0=[0.0, 0.01, 2.0, 0.3], sigma=sigma)
    if sigma == -1:  # keep D away from 0: σ(sL+cL)(sR+cR) + c0 with c0 > max product
        kw["c0"] = 5.0
    U = eigen_precondition(V, QL, sL, QR, sR, backend="triton", **kw)
    R = eigen_precondition(V, QL, sL, QR, sR, backend="torch", **kw)
    for u, r, v in zip(U, R, V):
        assert u.dtype == v.dtype and u.shape == v.shape
        # reference in fp32 from the same 16-bit inputs; the kernel rounds once at the end
        assert_close_scaled(u, r.float(), dtype)


def test_factored_tikhonov_against_dense():
    # (G + γ/π I)⁻¹ V (Ā + πγ I)⁻¹ through the eigenbases of G and Ā (Sec 6.3)
    shapes = [(7, 34), (33, 8)]
    gamma, pi = 0.3, 1.7
    V = [torch.randn(p, n) for p, n in shapes]
    G = [spd(p) for p, _ in shapes]
    A = [spd(n) for _, n in shapes]
    sG, QG = zip(*[torch.linalg.eigh(g) for g in G])
    sA, QA = zip(*[torch.linalg.eigh(a) for a in A])
    f = lambda xs: [x.float() for x in xs]  # noqa: E731
    U = eigen_precondition([noncontig(V[0]), V[1]], f(QG), f(sG), f(QA), f(sA), cL=gamma / pi, cR=pi * gamma,
                           backend="triton")
    for u, v, g, a in zip(U, V, G, A):
        Ig, Ia = torch.eye(g.shape[0], dtype=torch.float64), torch.eye(a.shape[0], dtype=torch.float64)
        want = torch.linalg.solve(g + gamma / pi * Ig, v.double()) @ torch.linalg.inv(a + pi * gamma * Ia)
        assert_close_scaled(u, want, torch.float32)


def test_exact_tikhonov_eqn6_against_dense():
    # (Ā ⊗ G + (λ+η) I)⁻¹ vec V with cL = cR = 0, c0 = λ + η
    p, n, c0 = 5, 4, 0.2
    V = torch.randn(p, n)
    G, A = spd(p, shift=0.1), spd(n, shift=0.1)
    sG, QG = torch.linalg.eigh(G)
    sA, QA = torch.linalg.eigh(A)
    (u,) = eigen_precondition([V], [QG.float().T.contiguous().T], [sG.float()], [QA.float()], [sA.float()], c0=c0,
                              backend="triton")
    M = torch.kron(A, G) + c0 * torch.eye(p * n, dtype=torch.float64)
    want = _unvec(torch.linalg.solve(M, _vec(V.double())), p, n)
    assert_close_scaled(u, want, torch.float32)


@pytest.mark.parametrize("sigma", [1, -1])
def test_appendix_b_against_dense(sigma):
    # (A ⊗ B ± C ⊗ D)⁻¹ v = vec(K2 ((K2ᵀ V K1) ⊘ (11ᵀ ± s2 s1ᵀ)) K1ᵀ), K1 = A^-1/2 E1, K2 = B^-1/2 E2
    p, n = 6, 5  # V is (p, n); B, D are p x p (left), A, C are n x n (right)
    A, B = spd(n), spd(p)
    C, D = 0.3 * spd(n, shift=0.1), 0.3 * spd(p, shift=0.1)

    def inv_sqrt(M):
        s, Q = torch.linalg.eigh(M)
        return Q @ torch.diag(s.rsqrt()) @ Q.T

    Ai, Bi = inv_sqrt(A), inv_sqrt(B)
    s1, E1 = torch.linalg.eigh(Ai @ C @ Ai)
    s2, E2 = torch.linalg.eigh(Bi @ D @ Bi)
    K1, K2 = Ai @ E1, Bi @ E2
    V = torch.randn(p, n)
    (u,) = eigen_precondition([V], [K2.float()], [s2.float()], [K1.float()], [s1.float()], c0=1.0, sigma=sigma,
                              backend="triton")
    (u64,) = eigen_precondition([V.double()], [K2], [s2], [K1], [s1], c0=1.0, sigma=sigma, backend="torch")
    M = torch.kron(A, B) + sigma * torch.kron(C, D)
    want = _unvec(torch.linalg.solve(M, _vec(V.double())), p, n)
    assert_close_scaled(u64, want, torch.float64)
    assert_close_scaled(u, want, torch.float32, factor=10.0)


def test_errors():
    V, QL, sL, QR, sR = _inputs([(3, 4)])
    with pytest.raises(ValueError, match="sigma"):
        eigen_precondition(V, QL, sL, QR, sR, sigma=2)
    with pytest.raises(ValueError, match="QR \\(4, 4\\)"):
        eigen_precondition(V, QL, sL, [torch.eye(3)], sR)
    with pytest.raises(ValueError, match="lengths"):
        eigen_precondition(V, QL, sL, QR, [])
    with pytest.raises(TypeError, match="float32"):
        eigen_precondition([V[0].double()], QL, sL, QR, sR, backend="triton")
    (u,) = eigen_precondition([V[0].double()], [q.double() for q in QL], sL, [q.double() for q in QR], sR,
                              backend="auto")
    assert u.dtype == torch.float64


def test_opcheck():
    V, QL, sL, QR, sR = _inputs([(3, 4), (5, 2)])
    torch.library.opcheck(_eigen_precondition_triton, (V, QL, sL, QR, sR, [0.1, 0.2], [0.3, 0.4], [0.0, 1.0],
                                                       [1.0, -1.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_cuda(dtype):
    needs_compiled_triton()
    shapes = [(1000, 785), (500, 1001), (250, 501), (30, 251), (784, 1001)]
    V, QL, sL, QR, sR = _inputs(shapes, dtype, device="cuda")
    for sigma, c0 in ((1, 0.0), (-1, 5.0)):
        U = eigen_precondition(V, QL, sL, QR, sR, cL=0.1, cR=0.2, c0=c0, sigma=sigma, backend="triton")
        R = eigen_precondition_ref(V, QL, sL, QR, sR, cL=0.1, cR=0.2, c0=c0, sigma=sigma)
        for u, r in zip(U, R):
            assert_close_scaled(u, r.float(), dtype, factor=10.0 if torch.backends.cuda.matmul.allow_tf32 else 1.0)
