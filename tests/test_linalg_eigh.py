"""kfac_fast.linalg.eigh: the native Jacobi engine against numpy.linalg.eigh (and torch).

Checks per dtype: eigenvalues vs numpy, residual ‖AQ − QΛ‖/‖A‖, orthogonality ‖QᵀQ − I‖,
hard spectra (repeated, zero, rank-deficient, cond 1e12), NaN/inf errors naming the matrix,
warm starts needing fewer sweeps, the custom op through torch.library.opcheck.
"""
import numpy as np
import pytest
import torch

import kfac_fast
from kfac_fast.linalg import eigh
from kfac_fast.linalg.native_eigh import _eigh_native, native_eigh

pytestmark = pytest.mark.native

# (eigenvalue atol relative to ||A||_2, residual rel. to ||A||_F, orthogonality defect)
TOLS = {torch.float64: (1e-11, 1e-10, 1e-11), torch.float32: (2e-6, 1e-5, 2e-5)}
DTYPES = [torch.float64, torch.float32]


def _with_spectrum(w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(w)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = torch.as_tensor(w, dtype=torch.float64)
    A = (Q * w) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def _wishart(n, k=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k or 2 * n, generator=g, dtype=torch.float64)
    return (X @ X.T / X.shape[1]).to(dtype)


def _check(A, w, Q, dtype):
    eig_tol, res_tol, orth_tol = TOLS[dtype]
    n = A.shape[0]
    assert w.dtype == dtype and Q.dtype == dtype and w.shape == (n,) and Q.shape == (n, n)
    if n == 0:
        return
    A64, w64, Q64 = A.double(), w.double(), Q.double()
    ref = np.linalg.eigh(A64.numpy())[0]
    scale = max(float(np.abs(ref).max()), 1e-300)
    assert np.all(np.diff(w64.numpy()) >= 0), "eigenvalues not ascending"
    np.testing.assert_allclose(w64.numpy(), ref, rtol=0, atol=eig_tol * scale * max(1, n / 64))
    fro = max(float(A64.norm()), 1e-300)
    assert float((A64 @ Q64 - Q64 * w64).norm()) <= res_tol * fro * max(1, n / 256)
    assert float((Q64.T @ Q64 - torch.eye(n, dtype=torch.float64)).norm()) <= orth_tol * max(1, n / 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64, 130])
def test_random_vs_numpy(dtype, n):
    A = _wishart(n, dtype=dtype, seed=n) - 0.5 * torch.eye(n, dtype=dtype)  # indefinite
    r = eigh(A, backend="native")
    _check(A, r.eigenvalues, r.eigenvectors, dtype)
    assert len(r.sweeps) == 1 and 0 <= r.sweeps[0] <= 15


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_size_list_and_batch(dtype):
    mats = [_wishart(n, dtype=dtype, seed=n) for n in (5, 0, 31, 1, 9, 31)]
    r = eigh(mats, backend="native")
    assert isinstance(r.eigenvalues, list) and len(r.sweeps) == len(mats)
    for A, w, Q in zip(mats, r.eigenvalues, r.eigenvectors):
        _check(A, w, Q, dtype)
    batch = torch.stack([_wishart(12, dtype=dtype, seed=s) for s in range(4)])
    rb = eigh(batch, backend="native")
    assert rb.eigenvalues.shape == (4, 12) and rb.eigenvectors.shape == (4, 12, 12)
    for A, w, Q in zip(batch, rb.eigenvalues, rb.eigenvectors):
        _check(A, w, Q, dtype)
    rt = eigh(batch, backend="torch")
    torch.testing.assert_close(rb.eigenvalues, rt.eigenvalues, rtol=0, atol=TOLS[dtype][0] * 10)


def _hard_cases(dtype):
    n = 24
    return {
        "repeated": _with_spectrum([1.0] * 8 + [2.0] * 8 + [-3.0] * 8, dtype),
        "identity": torch.eye(n, dtype=dtype),
        "scaled_identity_exact": 7.0 * torch.eye(n, dtype=dtype),
        "zero": torch.zeros(n, n, dtype=dtype),
        "rank_deficient": _wishart(n, k=3, dtype=dtype),
        "cond_1e12": _with_spectrum(np.logspace(0, -12, n), dtype),
        "rank_one": torch.ones(n, n, dtype=dtype),
        "tiny_scale": _wishart(n, dtype=dtype) * 1e-30,
        "huge_scale": _wishart(n, dtype=dtype) * 1e30,
        "diagonal_unsorted": torch.diag(torch.arange(n, 0, -1, dtype=dtype)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(_hard_cases(torch.float64)))
def test_hard_spectra(dtype, case):
    A = _hard_cases(dtype)[case]
    r = eigh(A, backend="native")
    _check(A, r.eigenvalues, r.eigenvectors, dtype)
    if case in ("identity", "scaled_identity_exact", "zero", "diagonal_unsorted"):
        assert r.sweeps == [0]  # already diagonal: no rotation
    if case == "cond_1e12" and dtype == torch.float64:
        # eigenvalues accurate in absolute terms (relative to ||A||), as any backward-stable solver
        w = r.eigenvalues.numpy()
        np.testing.assert_allclose(w, np.sort(np.logspace(0, -12, 24)), rtol=0, atol=1e-13)


def test_size_4096_structured():
    # Diagonal plus a few couplings: 4096-sized buffers, a handful of O(n) rotations.
    n = 4096
    d = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    A = torch.diag(d)
    pairs = [(0, 4095), (17, 2048), (100, 101), (3000, 4000)]
    for p, q in pairs:
        A[p, q] = A[q, p] = 0.25
    r = eigh(A, backend="native")
    w, Q = r.eigenvalues, r.eigenvectors
    assert 1 <= r.sweeps[0] <= 3
    assert float((A @ Q - Q * w).norm()) <= 1e-12 * float(A.norm())
    # the four 2x2 blocks have known eigenvalues
    expect = d.clone()
    for p, q in pairs:
        a, b = float(d[p]), float(d[q])
        m, h = (a + b) / 2, ((a - b) ** 2 / 4 + 0.0625) ** 0.5
        expect[p], expect[q] = m - h, m + h
    torch.testing.assert_close(w, torch.sort(expect).values, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_raises_with_index(bad):
    mats = [torch.eye(3), _wishart(4, dtype=torch.float32), _wishart(5, dtype=torch.float32)]
    mats[2][1, 3] = bad
    with pytest.raises(ValueError, match="matrix 2"):
        eigh(mats, backend="native")
    # the C++ engine itself also refuses (and names the index), without hanging
    with pytest.raises(RuntimeError, match=r"matrix 2 \(size 5\).*NaN or inf"):
        native_eigh(mats)


def test_nonfinite_warm_start_raises():
    A = _wishart(6)
    Q = torch.eye(6, dtype=torch.float64)
    Q[0, 0] = float("nan")
    with pytest.raises(ValueError, match="warm_start 0"):
        eigh([A], warm_start=[Q], backend="native")
    with pytest.raises(ValueError, match="shape"):
        eigh([A], warm_start=[torch.eye(5, dtype=torch.float64)], backend="native")


def test_no_convergence_raises_with_index():
    mats = [torch.eye(4, dtype=torch.float64), _wishart(40, seed=3)]
    with pytest.raises(RuntimeError, match=r"matrix 1 \(size 40\).*did not converge in max_sweeps=1"):
        eigh(mats, backend="native", max_sweeps=1)


def test_threads_give_identical_results():
    mats = [_wishart(n, seed=n) for n in (3, 40, 200, 17, 64, 8)]  # 200: a team of threads on one matrix
    one = native_eigh(mats, num_threads=1)
    two = native_eigh(mats, num_threads=2)
    for a, b in zip(one[1], two[1]):
        assert torch.equal(a, b)
    assert one[2] == two[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_fewer_sweeps(dtype):
    mats = [_wishart(n, dtype=dtype, seed=n) for n in (10, 48, 96)]
    cold = eigh(mats, backend="native")
    # EMA-like refresh: A' = 0.95 A + 0.05 (new batch statistics)
    new = [0.95 * A + 0.05 * _wishart(A.shape[0], dtype=dtype, seed=100 + i) for i, A in enumerate(mats)]
    ref = eigh(new, backend="native")
    warm = eigh(new, warm_start=cold.eigenvectors, backend="native")
    for A, w, Q in zip(new, warm.eigenvalues, warm.eigenvectors):
        _check(A, w, Q, dtype)
    for s_warm, s_cold in zip(warm.sweeps, ref.sweeps):
        assert s_warm < s_cold, (warm.sweeps, ref.sweeps)
    # exact eigenbasis as warm start: converged at once
    again = eigh(new, warm_start=warm.eigenvectors, backend="native")
    assert max(again.sweeps) <= 1


def test_warm_start_from_perturbed_non_orthonormal_basis():
    A = _wishart(64, seed=7)
    exact = eigh(A, backend="native")
    g = torch.Generator().manual_seed(1)
    Q0 = exact.eigenvectors + 1e-3 * torch.randn(64, 64, generator=g, dtype=torch.float64)  # not orthonormal
    warm = eigh(A, warm_start=Q0, backend="native")
    _check(A, warm.eigenvalues, warm.eigenvectors, torch.float64)
    assert warm.sweeps[0] < exact.sweeps[0]


def test_preconditioned_gradient_matches_torch():
    # the accuracy that matters to K-FAC: U = Q diag(1/(s + gamma)) Q^T V
    A = _wishart(80, k=40, dtype=torch.float32, seed=2)
    A2 = 0.95 * A + 0.05 * _wishart(80, k=40, dtype=torch.float32, seed=3)
    prev = eigh(A, backend="native").eigenvectors
    V = torch.randn(80, 30)
    gamma = 1e-3 * float(torch.linalg.matrix_norm(A2, ord=2))

    def precond(w, Q):
        return Q @ ((Q.T @ V.double()) / (w[:, None] + gamma))

    e = torch.linalg.eigh(A2.double())
    U_ref = precond(e.eigenvalues, e.eigenvectors)
    r = eigh(A2, warm_start=prev, backend="native")
    U = precond(r.eigenvalues.double(), r.eigenvectors.double())
    assert float((U - U_ref).norm() / U_ref.norm()) <= 1e-4


def test_matches_torch_backend():
    mats = [_wishart(n, seed=n) for n in (6, 20)]
    a, b = eigh(mats, backend="native"), eigh(mats, backend="torch")
    for wa, wb, Qa, Qb in zip(a.eigenvalues, b.eigenvalues, a.eigenvectors, b.eigenvectors):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-12)
        # eigenvectors agree up to sign (distinct eigenvalues)
        torch.testing.assert_close((Qa.T @ Qb).abs(), torch.eye(wa.shape[0], dtype=wa.dtype), rtol=0, atol=1e-8)


def test_opcheck():
    mats = [_wishart(5), _wishart(3, seed=4), _wishart(5, seed=5)]
    torch.library.opcheck(_eigh_native, (mats, [], 1e-12, 30, 1))
    warm = [torch.linalg.eigh(A).eigenvectors for A in mats]
    torch.library.opcheck(_eigh_native, (mats, warm, 1e-12, 30, 1))
    f32 = [m.float() for m in mats]
    torch.library.opcheck(_eigh_native, (f32, [], 1e-7, 30, 2))


def _gpu_ready():
    return kfac_fast.build_info()["cuda"] not in ("", "none", None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_numpy_and_warm(dtype):
    if not _gpu_ready():
        pytest.skip("native module built without CUDA")
    sizes = (1, 2, 7, 33, 64, 65, 130, 300)
    mats = [_wishart(n, dtype=dtype, seed=n) for n in sizes]
    r = eigh([A.cuda() for A in mats], backend="native")
    for A, w, Q in zip(mats, r.eigenvalues, r.eigenvectors):
        assert w.is_cuda and Q.is_cuda
        _check(A, w.cpu(), Q.cpu(), dtype)
    for A in _hard_cases(dtype).values():
        rh = eigh(A.cuda(), backend="native")
        _check(A, rh.eigenvalues.cpu(), rh.eigenvectors.cpu(), dtype)
    new = [0.95 * A + 0.05 * _wishart(A.shape[0], dtype=dtype, seed=99) for A in mats]
    cold = eigh([A.cuda() for A in new], backend="native")
    warm = eigh([A.cuda() for A in new], warm_start=r.eigenvectors, backend="native")
    for A, w, Q in zip(new, warm.eigenvalues, warm.eigenvectors):
        _check(A, w.cpu(), Q.cpu(), dtype)
    assert all(sw <= sc for sw, sc in zip(warm.sweeps, cold.sweeps)) and sum(warm.sweeps) < sum(cold.sweeps)
    bad = [m.cuda() for m in mats[:3]]
    bad[1][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="matrix 1"):
        native_eigh(bad)
    torch.library.opcheck(_eigh_native, ([m.cuda() for m in mats[:3]], [], 1e-12, 30, 1))
