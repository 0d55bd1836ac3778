"""factor_update / cross_factor_update: Triton (interpreter on CPU here) vs the torch
reference and float64 dense math."""
import pytest
import torch

from _kernel_utils import assert_close_scaled, needs_compiled_triton, noncontig
from kfac_fast.ops import cross_factor_update, factor_update, factor_update_ref
from kfac_fast.ops.factor_update import _cross_factor_update_triton, _factor_update_triton

SIZES = (1, 7, 33, 130)
HOMOG = (True, False, True, True)


def _xbar64(X, h, rows):
    X = X.to(torch.float64)
    if rows is not None:
        X = X[:rows] if isinstance(rows, int) else X[rows]
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], 1) if h else X


def _factors(sizes, hs, dtype=torch.float32, device="cpu"):
    out = []
    for d, h in zip(sizes, hs):
        F = torch.randn(d + h, d + h, dtype=dtype, device=device)
        out.append(F + F.T)
    return out


def _rows(kind, m, device="cpu"):
    if kind == "all":
        return None
    if kind == "leading":
        return min(3, m)
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, m, (5,), generator=g).to(device)  # with repeats, unsorted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows_kind", ["all", "leading", "index"])
def test_factor_update_matches_reference_and_dense(dtype, rows_kind):
    m = 257
    xs = [torch.randn(m, d).to(dtype) for d in SIZES]
    rows = _rows(rows_kind, m)
    Fs = _factors(SIZES, HOMOG)
    F0 = [F.clone() for F in Fs]
    ref = [F.clone() for F in Fs]
    factor_update(Fs, xs, eps=0.95, scale=[0.1, 0.2, 0.3, 0.05], homogeneous=HOMOG, rows=rows, backend="triton")
    factor_update(ref, xs, eps=0.95, scale=[0.1, 0.2, 0.3, 0.05], homogeneous=HOMOG, rows=rows, backend="torch")
    for F, R, F_0, X, h, s in zip(Fs, ref, F0, xs, HOMOG, [0.1, 0.2, 0.3, 0.05]):
        assert torch.equal(F, F.T), "the Triton update must leave F exactly symmetric"
        assert_close_scaled(F, R, torch.float32)
        Xb = _xbar64(X, h, rows)
        assert_close_scaled(F, 0.95 * F_0.double() + s * Xb.T @ Xb, torch.float32)


@pytest.mark.parametrize("m", [1, 3])
def test_factor_update_small_batches(m):
    xs = [torch.randn(m, d) for d in SIZES]
    Fs = _factors(SIZES, HOMOG)
    ref = [F.clone() for F in Fs]
    factor_update(Fs, xs, eps=0.5, scale=1.0 / m, homogeneous=HOMOG, backend="triton")
    factor_update_ref(ref, xs, eps=0.5, scale=1.0 / m, homogeneous=HOMOG)
    for F, R in zip(Fs, ref):
        assert_close_scaled(F, R, torch.float32)


def test_factor_update_noncontiguous_inputs_and_fp64_torch_path():
    xs = [noncontig(torch.randn(11, 33)), torch.randn(11, 14)[:, ::2]]
    hs = [True, False]
    Fs = _factors((33, 7), hs)
    ref = [F.double() for F in Fs]
    factor_update(Fs, xs, eps=0.0, scale=1.0, homogeneous=hs, backend="triton")
    factor_update(ref, [x.double() for x in xs], eps=0.0, scale=1.0, homogeneous=hs, backend="torch")
    for F, R in zip(Fs, ref):
        assert_close_scaled(F, R, torch.float32)


def test_eps_zero_ignores_nan_in_old_factor():
    F = torch.full((8, 8), float("nan"))
    X = torch.randn(5, 7)
    factor_update([F], [X], eps=0.0, scale=1.0, homogeneous=True, backend="triton")
    assert torch.isfinite(F).all()
    assert F[-1, -1].item() == 5.0  # the ones column: sum over 5 rows of 1*1


def test_empty_row_subset_only_decays():
    xs = [torch.randn(4, 7), torch.randn(4, 2)]
    Fs = _factors((7, 2), (True, False))
    F0 = [F.clone() for F in Fs]
    factor_update(Fs, xs, eps=0.5, scale=1.0, homogeneous=[True, False], rows=0, backend="triton")
    factor_update(Fs, xs, eps=2.0, scale=1.0, homogeneous=[True, False], rows=torch.tensor([], dtype=torch.int64),
                  backend="triton")
    for F, F_0 in zip(Fs, F0):
        assert_close_scaled(F, F_0, torch.float32)


@pytest.mark.parametrize("rows_kind", ["all", "index"])
def test_cross_factor_update(rows_kind):
    m = 9
    dx, dy = (7, 33, 1, 130), (33, 1, 7, 2)
    hx, hy = (True, True, False, True), (False, True, True, False)
    X = [torch.randn(m, d) for d in dx]
    Y = [noncontig(torch.randn(m, d)) for d in dy]
    rows = _rows(rows_kind, m)
    Fs = [torch.randn(a + h, b + g) for a, b, h, g in zip(dx, dy, hx, hy)]
    F0 = [F.clone() for F in Fs]
    ref = [F.clone() for F in Fs]
    cross_factor_update(Fs, X, Y, eps=0.9, scale=0.25, homogeneous_x=hx, homogeneous_y=hy, rows=rows, backend="triton")
    cross_factor_update(ref, X, Y, eps=0.9, scale=0.25, homogeneous_x=hx, homogeneous_y=hy, rows=rows, backend="torch")
    for F, R, F_0, x, y, a, b in zip(Fs, ref, F0, X, Y, hx, hy):
        assert_close_scaled(F, R, torch.float32)
        assert_close_scaled(F, 0.9 * F_0.double() + 0.25 * _xbar64(x, a, rows).T @ _xbar64(y, b, rows), torch.float32)


def test_cross_factor_update_fp16_leading_rows():
    X, Y = [torch.randn(6, 7).half()], [torch.randn(6, 5).half()]
    F, R = torch.zeros(8, 5), torch.zeros(8, 5)
    cross_factor_update([F], X, Y, eps=1.0, scale=1.0, homogeneous_x=True, homogeneous_y=False, rows=4,
                        backend="triton")
    cross_factor_update([R], X, Y, eps=1.0, scale=1.0, homogeneous_x=True, homogeneous_y=False, rows=4,
                        backend="torch")
    assert_close_scaled(F, R, torch.float32)


def test_errors():
    X = [torch.randn(4, 3)]
    with pytest.raises(TypeError, match="float32"):
        factor_update([torch.zeros(4, 4, dtype=torch.float64)], X, eps=1, scale=1, homogeneous=True, backend="triton")
    with pytest.raises(TypeError, match="inputs of dtype"):
        factor_update([torch.zeros(4, 4)], [X[0].double()], eps=1, scale=1, homogeneous=True, backend="triton")
    # auto never fails on dtype: fp64 runs the reference
    F = torch.zeros(4, 4, dtype=torch.float64)
    factor_update([F], [X[0].double()], eps=1, scale=1, homogeneous=True, backend="auto")
    assert F[-1, -1].item() == 4.0
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        factor_update([torch.zeros(3, 3)], X, eps=1, scale=1, homogeneous=True, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        factor_update([torch.zeros(4, 4).T], X, eps=1, scale=1, homogeneous=True, backend="triton")
    with pytest.raises(ValueError, match="one per layer"):
        factor_update([torch.zeros(4, 4)], X, eps=[1, 2], scale=1, homogeneous=True)
    with pytest.raises(ValueError, match="rows=9"):
        factor_update([torch.zeros(4, 4)], X, eps=1, scale=1, homogeneous=True, rows=9, backend="triton")
    with pytest.raises(TypeError, match="index tensor"):
        factor_update([torch.zeros(4, 4)], X, eps=1, scale=1, homogeneous=True, rows=torch.tensor([0.5]),
                      backend="triton")
    with pytest.raises(RuntimeError, match="rows indices"):
        factor_update([torch.zeros(4, 4)], X, eps=1, scale=1, homogeneous=True, rows=torch.tensor([0, 4]),
                      backend="triton")
    with pytest.raises(ValueError, match="rows"):
        cross_factor_update([torch.zeros(4, 2)], X, [torch.randn(5, 2)], eps=1, scale=1, homogeneous_x=True,
                            homogeneous_y=False, backend="triton")


def test_opcheck():
    xs = [torch.randn(5, 7), torch.randn(5, 2).half()]
    Fs = _factors((7, 2), (True, False))
    torch.library.opcheck(_factor_update_triton, (Fs, xs, [0.5, 0.5], [1.0, 2.0], [True, False], None, -1))
    torch.library.opcheck(_factor_update_triton, (Fs, xs, [0.5, 0.5], [1.0, 2.0], [True, False],
                                                  torch.tensor([4, 0]), 2))
    C = [torch.randn(8, 2), torch.randn(3, 8)]
    torch.library.opcheck(_cross_factor_update_triton, (C, xs, xs[::-1], [0.5, 0.5], [1.0, 2.0], [True, False],
                                                        [False, True], None, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_factor_update_cuda(dtype):
    needs_compiled_triton()
    sizes, hs = (784, 1000, 500, 250, 30, 1023), (True,) * 6
    m = 1025
    xs = [torch.randn(m, d, device="cuda").to(dtype) for d in sizes]
    for rows in (None, 500, torch.randperm(m, device="cuda")[:300]):
        Fs = _factors(sizes, hs, device="cuda")
        ref = [F.clone() for F in Fs]
        factor_update(Fs, xs, eps=0.95, scale=0.05 / m, homogeneous=hs, rows=rows, backend="triton")
        factor_update(ref, xs, eps=0.95, scale=0.05 / m, homogeneous=hs, rows=rows, backend="torch")
        torch.cuda.synchronize()
        for F, R in zip(Fs, ref):
            assert torch.equal(F, F.T)
            assert_close_scaled(F, R, torch.float32, factor=10.0 if torch.backends.cuda.matmul.allow_tf32 else 1.0)
    X = [torch.randn(m, d, device="cuda").to(dtype) for d in sizes[:-1]]
    Y = [torch.randn(m, d, device="cuda").to(dtype) for d in sizes[1:]]
    Fs = [torch.randn(a + 1, b, device="cuda") for a, b in zip(sizes[:-1], sizes[1:])]
    ref = [F.clone() for F in Fs]
    cross_factor_update(Fs, X, Y, eps=0.9, scale=1.0 / m, homogeneous_x=True, homogeneous_y=False, backend="triton")
    cross_factor_update(ref, X, Y, eps=0.9, scale=1.0 / m, homogeneous_x=True, homogeneous_y=False, backend="torch")
    for F, R in zip(Fs, ref):
        assert_close_scaled(F, R, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [None, 5, "idx"])
def test_torch_backend_aligned_pieces_equal_the_reference(dtype, rows):
    """The torch backend builds a homogeneous factor from d-wide pieces on CPU (XᵀX, column
    sums, m): the same result as the (d+1)-wide reference, eps = 0 ignoring NaNs in F."""
    g = torch.Generator().manual_seed(3)
    X = [torch.randn(13, d, generator=g, dtype=dtype) for d in (1, 7, 400, 385)]
    r = torch.tensor([0, 3, 4, 9, 12]) if rows == "idx" else rows
    for eps in (0.0, 0.9):
        F1 = [torch.randn(d + 1, d + 1, generator=g, dtype=dtype) for d in (1, 7, 400, 385)]
        if eps == 0.0:
            F1[1][0, 0] = float("nan")
        F2 = [f.clone() for f in F1]
        factor_update(F1, X, eps=eps, scale=[0.1, 0.2, 0.3, 0.4], homogeneous=True, rows=r, backend="torch")
        factor_update_ref(F2, X, eps=eps, scale=[0.1, 0.2, 0.3, 0.4], homogeneous=True, rows=r)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(F1, F2):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
