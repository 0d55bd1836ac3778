"""sandwich: Triton vs reference and float64 dense math, including the block-tridiagonal
pass of Sec 4.3 (alpha=-1, beta=1, transposes read in place)."""
import pytest
import torch

from _kernel_utils import assert_close_scaled, needs_compiled_triton, noncontig, spd
from kfac_fast.ops import sandwich
from kfac_fast.ops.sandwich import _left_first, _sandwich_triton

# Gradient shapes (d_out, d_in + 1) of a small network whose widths include 1, 7, 33, 130.
SHAPES = [(7, 34), (33, 8), (1, 34), (130, 2)]


def _tridiag_inputs(shapes, dtype=torch.float32, device="cpu"):
    """Ξᵀ-pass operands: U_i = V_i − Ψ^Gᵀ_{i-1,i} V_{i-1} Ψ^Ā_{i-2,i-1}, for i = 1..ℓ-1."""
    Vprev = [torch.randn(*shapes[i - 1], device=device).to(dtype) for i in range(1, len(shapes))]
    V = [torch.randn(*shapes[i], device=device).to(dtype) for i in range(1, len(shapes))]
    PsiG = [torch.randn(shapes[i - 1][0], shapes[i][0], device=device).to(dtype) / 4 for i in range(1, len(shapes))]
    PsiA = [torch.randn(shapes[i - 1][1], shapes[i][1], device=device).to(dtype) / 4 for i in range(1, len(shapes))]
    return PsiG, Vprev, PsiA, V


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tridiagonal_pass(dtype):
    PsiG, Vprev, PsiA, V = _tridiag_inputs(SHAPES, dtype)
    U = sandwich(PsiG, Vprev, PsiA, alpha=-1.0, V=V, beta=1.0, transpose_L=True, backend="triton")
    R = sandwich(PsiG, Vprev, PsiA, alpha=-1.0, V=V, beta=1.0, transpose_L=True, backend="torch")
    for u, r, v, g, w, a in zip(U, R, V, PsiG, Vprev, PsiA):
        assert u.shape == v.shape and u.dtype == dtype
        assert_close_scaled(u, r.float(), dtype)
        want = v.double() - g.double().T @ w.double() @ a.double()
        assert_close_scaled(u, want, dtype, factor=2.0)


def test_both_transposes_noncontiguous_and_per_layer_scalars():
    # Ξ pass: U_i = V_i − Ψ^G_{i,i+1} V_{i+1} Ψ^Āᵀ_{i-1,i}; R stored (n_i, n_{i+1}) and read transposed.
    L = [torch.randn(7, 33), noncontig(torch.randn(130, 1))]
    W = [noncontig(torch.randn(7, 8)), torch.randn(130, 34)]
    R = [torch.randn(34, 8), noncontig(torch.randn(2, 34))]
    V = [torch.randn(33, 34), torch.randn(1, 2)]
    U = sandwich(L, W, R, alpha=[-1.0, 0.5], V=V, beta=[1.0, 2.0], transpose_L=True, transpose_R=True,
                 backend="triton")
    for u, l, w, r, v, a, b in zip(U, L, W, R, V, [-1.0, 0.5], [1.0, 2.0]):
        assert_close_scaled(u, b * v.double() + a * l.double().T @ w.double() @ r.double().T, torch.float32)


def test_inverse_apply_without_V_and_both_associations():
    # U = G⁻¹ V A⁻¹ (block-diagonal apply with explicit inverses)
    shapes = [(7, 34), (33, 2), (130, 8)]
    Gi = [torch.linalg.inv(spd(p)).float() for p, _ in shapes]
    Ai = [torch.linalg.inv(spd(n)).float() for _, n in shapes]
    V = [torch.randn(p, n) for p, n in shapes]
    U = sandwich(Gi, V, Ai, backend="triton")
    for u, g, v, a in zip(U, Gi, V, Ai):
        assert_close_scaled(u, g.double() @ v.double() @ a.double(), torch.float32)
    # rectangular chains where the cheaper association differs between layers
    L = [torch.randn(3, 33), torch.randn(40, 2)]
    W = [torch.randn(33, 2), torch.randn(2, 40)]
    R = [torch.randn(2, 50), torch.randn(40, 1)]
    assert _left_first(3, 33, 2, 50) and not _left_first(40, 2, 40, 1)
    V = [torch.full((3, 50), float("nan")), torch.randn(40, 1)]
    U = sandwich(L, W, R, alpha=2.0, V=V, beta=[0.0, -1.0], backend="triton")
    assert_close_scaled(U[0], 2 * L[0].double() @ W[0].double() @ R[0].double(), torch.float32)
    assert_close_scaled(U[1], -V[1].double() + 2 * L[1].double() @ W[1].double() @ R[1].double(), torch.float32)


def test_errors():
    L, W, R = [torch.randn(3, 4)], [torch.randn(4, 5)], [torch.randn(5, 2)]
    with pytest.raises(ValueError, match="do not chain"):
        sandwich(L, W, [torch.randn(4, 2)])
    with pytest.raises(ValueError, match="V has shape"):
        sandwich(L, W, R, V=[torch.randn(2, 3)], beta=1.0)
    with pytest.raises(ValueError, match="lengths"):
        sandwich(L, W, R + R)
    with pytest.raises(TypeError, match="float32"):
        sandwich([L[0].double()], W, R, backend="triton")
    assert sandwich([L[0].double()], [W[0].double()], [R[0].double()], backend="auto")[0].dtype == torch.float64


def test_opcheck():
    L, W, R, V = [torch.randn(3, 4)], [torch.randn(4, 5)], [torch.randn(5, 2)], [torch.randn(3, 2)]
    torch.library.opcheck(_sandwich_triton, (L, W, R, [-1.0], V, [1.0], False, False))
    torch.library.opcheck(_sandwich_triton, (L, W, R, [2.0], [None], [0.0], False, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tridiagonal_pass_cuda(dtype):
    needs_compiled_triton()
    shapes = [(1000, 785), (500, 1001), (250, 501), (30, 251), (250, 31), (500, 251)]
    PsiG, Vprev, PsiA, V = _tridiag_inputs(shapes, dtype, device="cuda")
    U = sandwich(PsiG, Vprev, PsiA, alpha=-1.0, V=V, beta=1.0, transpose_L=True, backend="triton")
    R = sandwich(PsiG, Vprev, PsiA, alpha=-1.0, V=V, beta=1.0, transpose_L=True, backend="torch")
    for u, r in zip(U, R):
        assert_close_scaled(u, r.float(), dtype, factor=10.0 if torch.backends.cuda.matmul.allow_tf32 else 1.0)
