"""Symmetrization S = (A + Aᵀ)/2 of a batch of square matrices.

The smallest native op: it checks the pointer-passing convention of the compiled core
and the ``torch.library`` plumbing (eager, fake tensors, ``torch.compile``). K-FAC uses
it to remove rounding asymmetry from factors before eigendecompositions.
"""
from __future__ import annotations

import torch

from .._native import cuda_stream_handle, dtype_code, native
from ..backends import resolve_backend


def symmetrize_ref(A: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference. ``A``: (..., n, n) -> (..., n, n)."""
    return 0.5 * (A + A.transpose(-1, -2))


@torch.library.custom_op("kfac_fast::symmetrize_native", mutates_args=())
def _symmetrize_native(A: torch.Tensor) -> torch.Tensor:
    A = A.contiguous()
    out = torch.empty_like(A)
    n = A.shape[-1]
    batch = A.numel() // (n * n) if n > 0 else 0
    mod = native()
    if A.device.type == "cuda":
        mod.symmetrize_cuda(A.data_ptr(), out.data_ptr(), batch, n, dtype_code(A), cuda_stream_handle(A))
    else:
        mod.symmetrize_cpu(A.data_ptr(), out.data_ptr(), batch, n, dtype_code(A))
    return out


@_symmetrize_native.register_fake
def _(A: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(A, memory_format=torch.contiguous_format)


def symmetrize(A: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Return (A + Aᵀ)/2.

    Args:
        A: (..., n, n) float32/float64 tensor.
        backend: ``"auto"``, ``"torch"`` or ``"native"`` (Triton adds nothing for this op
            and maps to ``torch``).
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"symmetrize expects (..., n, n) square matrices, got shape {tuple(A.shape)}")
    which = resolve_backend(backend, A.device.type, family="symmetrize")
    if which == "native":
        return _symmetrize_native(A)
    return symmetrize_ref(A)
