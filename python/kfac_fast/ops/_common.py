"""Argument helpers shared by the kernel families (validation at the public boundary)."""
from __future__ import annotations

from typing import Sequence

import torch

from ._grouped_gemm import SUPPORTED_DTYPES


def as_list(value, n: int, name: str) -> list:
    """A scalar broadcast to ``n`` layers, or a per-layer sequence of length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} layers; "
                             "give one per layer or a scalar")
        return list(value)
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        raise TypeError(f"{name} must be a Python scalar or a list of them, not a tensor")
    return [value] * n


def check_same_device(name: str, tensors: Sequence[torch.Tensor]) -> torch.device:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device; found {dev} and {t.device}")
    return dev


def check_triton_dtypes(name: str, tensors: Sequence[torch.Tensor], *, allowed=SUPPORTED_DTYPES,
                        what: str = "tensors") -> None:
    for t in tensors:
        if t.dtype not in allowed:
            raise TypeError(f"{name}: backend='triton' supports {what} of dtype "
                            f"{', '.join(str(d).replace('torch.', '') for d in allowed)}, got {t.dtype}; "
                            f"use backend='torch' (or 'auto') for {t.dtype}")


def floats(values, n: int, name: str) -> list[float]:
    return [float(v) for v in as_list(values, n, name)]
