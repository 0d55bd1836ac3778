"""The native eigensolver behind ``eigh(..., backend="native")``.

Algorithm (csrc/cpu/eigh_jacobi.cpp, csrc/cuda/eigh_jacobi.cu): parallel-order (round-robin)
threshold Jacobi in float64 on ``B = Q0ᵀ A Q0`` with the rotations accumulated into ``Q0``
(``Q0 = I`` for a cold start). The projection ``Q0ᵀ A Q0`` is two matrix products done here
with ``torch.matmul`` (MKL / cuBLAS), batched over equal sizes; the rotations are the compiled
engine: C++ threads (a team per large matrix, one thread per small matrix) on CPU, one CUDA
thread block per matrix on GPU.

Inputs are read as ``(A + Aᵀ)/2``; float32 inputs are projected in float32 and rotated in
float64 (so the float32 results are often more accurate than float32 LAPACK), outputs are
returned in the input dtype. A warm start that is not orthonormal to working precision
(checked with a random probe, O(n²)) is re-orthonormalised by QR first, so a perturbed basis
is a valid warm start, just a slower one.

Convergence: a rotation is skipped when ``|b_pq| <= max(tol·‖A‖_F/n, 4·eps64·‖A‖_F)``; the
result has ``off(QᵀAQ)_F <= max(tol, 4·n·eps64)·‖A‖_F``, i.e. eigenvalue errors are absolute
(relative to ‖A‖), as for LAPACK. Non-convergence within ``max_sweeps`` is an error naming
the matrix (never a hang); so is NaN/inf input.

Limits (measured, benchmarks/results/eigh_cpu.csv): a full Jacobi sweep costs about as much as
a whole LAPACK eigh, so the engine is fast only for small matrices (n <~ 64: many small
factors, warm or cold) and slow for large ones even warm-started, where ``backend="torch"``
stays the right choice. The CUDA kernel is one block per matrix (B in shared memory for
n <= 64, global memory above): correct for any n up to 65536 but meant for batches of small
matrices.

The whole engine is one ``torch.library`` custom op, ``kfac_fast::eigh_native``, with a fake
(meta) implementation so it traces under ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._native import cuda_stream_handle, native

# Default tolerance on off(Q^T A Q)_F / ||A||_F per input dtype.
DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-7}
DEFAULT_MAX_SWEEPS = 30
# Orthonormality defect above which a warm start is re-orthonormalised.
_ORTHO_DEFECT = {torch.float64: 1e-10, torch.float32: 1e-4}


def _orthonormal_warm(Q0: torch.Tensor) -> torch.Tensor:
    """(b, n, n) warm starts, each re-orthonormalised by QR if its probe defect is too large."""
    n = Q0.shape[-1]
    g = torch.Generator(device=Q0.device).manual_seed(1234)
    x = torch.randn(n, 2, generator=g, device=Q0.device, dtype=Q0.dtype)
    defect = torch.linalg.vector_norm(Q0.mT @ (Q0 @ x) - x, dim=(-2, -1)) / x.norm()
    bad = (defect > _ORTHO_DEFECT.get(Q0.dtype, 1e-4)).nonzero().flatten().tolist()
    if not bad:
        return Q0
    Q0 = Q0.clone()
    Q, R = torch.linalg.qr(Q0[bad])
    d = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    Q0[bad] = Q * d[:, None, :]
    return Q0


def _project(mats: list[torch.Tensor], warm: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """float64 work buffers B = Q0ᵀ sym(A) Q0 and Vt = Q0ᵀ, batched over equal sizes."""
    Bs: list[Optional[torch.Tensor]] = [None] * len(mats)
    Vts: list[Optional[torch.Tensor]] = [None] * len(mats)
    groups: dict[int, list[int]] = {}
    for i, A in enumerate(mats):
        groups.setdefault(A.shape[0], []).append(i)
    for n, idx in groups.items():
        A = torch.stack([mats[i] for i in idx])
        A = 0.5 * (A + A.mT)
        if warm:
            Q0 = _orthonormal_warm(torch.stack([warm[i].to(mats[i].dtype) for i in idx]))
            B = Q0.mT @ (A @ Q0)
            B = (0.5 * (B + B.mT)).to(torch.float64)
            Vt = Q0.mT.to(torch.float64)
        else:
            B = A.to(torch.float64)
            Vt = torch.eye(n, dtype=torch.float64, device=A.device).expand(len(idx), n, n)
        B = B.contiguous()  # fresh buffers: never alias the caller's tensors
        Vt = Vt.contiguous()
        for j, i in enumerate(idx):
            Bs[i], Vts[i] = B[j], Vt[j]
    return Bs, Vts  # type: ignore[return-value]


@torch.library.custom_op("kfac_fast::eigh_native", mutates_args=())
def _eigh_native(
    mats: list[torch.Tensor], warm: list[torch.Tensor], tol: float, max_sweeps: int, num_threads: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    if not mats:
        return [], [], torch.zeros(0, dtype=torch.int64)
    Bs, Vts = _project(mats, warm)
    sizes = [int(A.shape[0]) for A in mats]
    mod = native()
    B_ptrs = [B.data_ptr() for B in Bs]
    V_ptrs = [V.data_ptr() for V in Vts]
    if mats[0].device.type == "cuda":
        sweeps = mod.eigh_jacobi_cuda(B_ptrs, V_ptrs, sizes, tol, max_sweeps, cuda_stream_handle(mats[0]))
    else:
        sweeps = mod.eigh_jacobi_cpu(B_ptrs, V_ptrs, sizes, tol, max_sweeps, num_threads)
    vals, vecs = [], []
    for A, B, Vt in zip(mats, Bs, Vts):
        w, order = torch.sort(torch.diagonal(B))
        vals.append(w.to(A.dtype))
        vecs.append(Vt[order].to(A.dtype).mT)  # eigenvectors as columns (column-major, as LAPACK)
    return vals, vecs, torch.tensor(sweeps, dtype=torch.int64)


@_eigh_native.register_fake
def _(mats, warm, tol, max_sweeps, num_threads):
    vals = [A.new_empty(A.shape[0]) for A in mats]
    vecs = [A.new_empty(A.shape).mT for A in mats]
    return vals, vecs, torch.empty(len(mats), dtype=torch.int64)


def native_eigh(
    mats: Sequence[torch.Tensor],
    *,
    warm_start: Optional[Sequence[torch.Tensor]] = None,
    tol: Optional[float] = None,
    max_sweeps: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Eigendecompose ``mats`` (list of (n_i, n_i) float32/float64 tensors on one device).

    Returns (eigenvalues ascending, eigenvectors as columns, sweeps per matrix).
    Raises ``kfac_fast._C.NativeError`` (a RuntimeError) naming the matrix index on
    NaN/inf or non-convergence within ``max_sweeps``.
    """
    mats = list(mats)
    if not mats:
        return [], [], []
    devices = {A.device for A in mats}
    if len(devices) != 1:
        raise ValueError(f"native eigh: all matrices must be on one device, got {sorted(map(str, devices))}")
    for i, A in enumerate(mats):
        if A.dtype not in DEFAULT_TOL:
            raise TypeError(f"native eigh: matrix {i} has dtype {A.dtype}; use float32 or float64")
    warm = list(warm_start) if warm_start is not None else []
    if tol is None:
        tol = min(DEFAULT_TOL[A.dtype] for A in mats)
    if max_sweeps is None:
        max_sweeps = DEFAULT_MAX_SWEEPS
    if num_threads is None:
        num_threads = torch.get_num_threads()
    vals, vecs, sweeps = _eigh_native(mats, warm, float(tol), int(max_sweeps), int(num_threads))
    return list(vals), list(vecs), [int(s) for s in sweeps.tolist()]
