"""Helpers shared by the Triton kernel-family tests (tests/test_ops_*.py)."""
import pytest
import torch

from conftest import TOL
from kfac_fast.backends import triton_interpret

DTYPES_16 = (torch.float16, torch.bfloat16)


def assert_close_scaled(out, ref, dtype, *, factor=1.0):
    """Kernel vs reference with the tolerance of ``dtype``, atol scaled by |ref|max."""
    rtol, atol = TOL[dtype]
    ref = ref.to(torch.float64)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.to(torch.float64), ref, rtol=rtol * factor, atol=atol * factor * scale)


def spd(n, dtype=torch.float64, device="cpu", shift=1.0):
    """A well-conditioned symmetric positive definite (n, n) matrix."""
    x = torch.randn(n, n + 3, dtype=torch.float64, device=device)
    return ((x @ x.T) / (n + 3) + shift * torch.eye(n, dtype=torch.float64, device=device)).to(dtype)


def orth(n, dtype=torch.float32, device="cpu"):
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, device=device))[0].to(dtype)


def noncontig(x):
    """Same values as ``x`` through a non-contiguous view (transposed storage)."""
    return x.T.contiguous().T


def needs_compiled_triton():
    """GPU tests run the compiled kernels: the interpreter cannot read CUDA pointer tables."""
    if triton_interpret():
        pytest.skip("GPU kernel tests need TRITON_INTERPRET=0 (conftest defaults it to 1)")
