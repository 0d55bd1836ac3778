"""Batched symmetric eigendecomposition of lists of matrices of mixed sizes.

``eigh`` is what the curvature blocks call to refresh their inverses (paper Sec 8, task 5):
every factor Ā and G, and for the block-tridiagonal inverse the generalised problems of
Appendix B. Backends: ``torch`` (``torch.linalg.eigh``, batched over equal sizes) and
``native`` (the compiled Jacobi engine, warm-startable; algorithm, tolerances and limits in
:mod:`kfac_fast.linalg.native_eigh`). ``auto`` is ``torch`` on CPU (see backends.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..backends import resolve_backend

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class EighResult:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns), like ``torch.linalg.eigh``.

    Structure follows the input: lists for a list input, (b, n) / (b, n, n) tensors for a
    batched tensor input, (n,) / (n, n) for a single matrix. ``sweeps`` gives the number of
    sweeps/iterations the iterative engine used per matrix (0 for the direct torch solver).
    """

    eigenvalues: TensorOrList
    eigenvectors: TensorOrList
    sweeps: list


def _as_list(matrices: TensorOrList) -> tuple[list[torch.Tensor], str]:
    if isinstance(matrices, torch.Tensor):
        if matrices.dim() == 2:
            return [matrices], "single"
        if matrices.dim() == 3:
            return list(matrices.unbind(0)), "batch"
        raise ValueError(f"eigh expects (n, n), (b, n, n) or a list of (n, n); got shape {tuple(matrices.shape)}")
    mats = list(matrices)
    for i, m in enumerate(mats):
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"eigh: matrix {i} must be a square (n, n) tensor, got {shape}")
    return mats, "list"


def _warm_list(warm_start: TensorOrList, mats: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
    """Normalise ``warm_start`` to a list matching ``mats`` (same structure as the input)."""
    if isinstance(warm_start, torch.Tensor):
        if kind == "single" and warm_start.dim() == 2:
            warm = [warm_start]
        elif warm_start.dim() == 3:
            warm = list(warm_start.unbind(0))
        else:
            raise ValueError(f"eigh: warm_start must have the structure of the input; got shape {tuple(warm_start.shape)}")
    else:
        warm = list(warm_start)
    if len(warm) != len(mats):
        raise ValueError(f"eigh: warm_start has {len(warm)} matrices, the input has {len(mats)}")
    for i, (q, m) in enumerate(zip(warm, mats)):
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != tuple(m.shape):
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"eigh: warm_start {i} must have shape {tuple(m.shape)} like matrix {i}, got {shape}")
        if q.device != m.device:
            raise ValueError(f"eigh: warm_start {i} is on {q.device}, matrix {i} on {m.device}")
        if q.numel() and not bool(torch.isfinite(q).all()):
            raise ValueError(f"eigh: warm_start {i} contains NaN or inf")
    return warm


def _check_finite(mats: list[torch.Tensor]) -> None:
    for i, m in enumerate(mats):
        if m.numel() and not bool(torch.isfinite(m).all()):
            raise ValueError(f"eigh: matrix {i} (size {m.shape[0]}) contains NaN or inf; "
                             "check the factors that produced it (non-finite activations or gradients)")


def _torch_eigh(mats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torch.linalg.eigh, batched over matrices of equal size and dtype."""
    vals: list[Optional[torch.Tensor]] = [None] * len(mats)
    vecs: list[Optional[torch.Tensor]] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[0], m.dtype, m.device), []).append(i)
    for (n, _, _), idx in groups.items():
        if n == 0:
            for i in idx:
                vals[i] = mats[i].new_zeros(0)
                vecs[i] = mats[i].new_zeros(0, 0)
            continue
        batch = torch.stack([mats[i] for i in idx])
        try:
            w, q = torch.linalg.eigh(batch)
        except torch.linalg.LinAlgError:
            # LAPACK's fp32 divide-and-conquer can fail on matrices with many exactly repeated
            # eigenvalues (e.g. Ā of images with constant-zero border pixels): retry in float64.
            if batch.dtype == torch.float64:
                raise
            w, q = torch.linalg.eigh(batch.double())
            w, q = w.to(batch.dtype), q.to(batch.dtype)
        for j, i in enumerate(idx):
            vals[i], vecs[i] = w[j], q[j]
    return vals, vecs  # type: ignore[return-value]


def eigh(
    matrices: TensorOrList,
    *,
    warm_start: Optional[TensorOrList] = None,
    tol: Optional[float] = None,
    max_sweeps: Optional[int] = None,
    backend: str = "auto",
) -> EighResult:
    """Symmetric eigendecomposition of one matrix, a batch, or a list of mixed sizes.

    Args:
        matrices: (n, n), (b, n, n) or a list of (n_i, n_i) symmetric float32/float64 tensors.
        warm_start: previous eigenvectors with the same structure; the iterative native engine
            starts from Q₀ᵀAQ₀ and needs few sweeps when the matrices changed little.
            Ignored by the direct ``torch`` solver.
        tol: native engine: on exit off(QᵀAQ)_F <= max(tol, 4·n·eps64)·‖A‖_F. Default 1e-12
            for float64, 1e-7 for float32 inputs.
        max_sweeps: cap on Jacobi sweeps (native engine, default 30); needing more raises.
        backend: ``"auto"``, ``"torch"`` or ``"native"``.

    Returns:
        :class:`EighResult` with ascending eigenvalues and orthonormal eigenvectors.

    Raises:
        ValueError: non-square input, NaN/inf in matrix ``i`` or in ``warm_start[i]``, or a
            ``warm_start`` whose structure/shapes differ from the input (index in the message).
        RuntimeError: (``kfac_fast._C.NativeError``) the native engine failed on matrix ``i``
            (e.g. no convergence within ``max_sweeps``); the message names ``i`` and the cause.
    """
    mats, kind = _as_list(matrices)
    _check_finite(mats)
    device_type = mats[0].device.type if mats else "cpu"
    which = resolve_backend(backend, device_type, family="eigh")
    if which == "native":
        from .native_eigh import native_eigh  # provided by the native engine

        warm = _warm_list(warm_start, mats, kind) if warm_start is not None else None
        vals, vecs, sweeps = native_eigh(mats, warm_start=warm, tol=tol, max_sweeps=max_sweeps)
    else:
        vals, vecs = _torch_eigh(mats)
        sweeps = [0] * len(mats)
    if kind == "single":
        return EighResult(vals[0], vecs[0], sweeps)
    if kind == "batch":
        return EighResult(torch.stack(vals), torch.stack(vecs), sweeps)
    return EighResult(vals, vecs, sweeps)
