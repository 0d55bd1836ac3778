"""The precision policy of the curvature products (``compute_dtype=``).

The factors stay in their dtype (fp32, or fp64 for fp64 models) and the inverses are built there;
``compute_dtype`` is the dtype in which the curvature *products* read their operands: the factor
accumulation X̄ᵀX̄ (Sec 5), the preconditioning products G⁻¹VĀ⁻¹ (Sec 4.2) and the tridiagonal Ξ
and Appendix B products (Sec 4.3). Every kernel family accumulates in fp32 and returns fp32
(``out_dtype``): only the operands are rounded. The inverse's operands are cast once per
refresh (cached on the inverse), the gradient blocks and statistics rows once per step.

Accepted: None / the factor dtype (no rounding), ``torch.float32``, ``torch.bfloat16``,
``torch.float16``, and ``"tf32"`` on CUDA (fp32 operands on TF32 tensor cores: cuBLAS and the
Triton kernels' ``input_precision``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch

ComputeDtype = Union[None, torch.dtype, str]
ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)


def resolve_compute_dtype(value: ComputeDtype, *, factor_dtype: torch.dtype, device: torch.device) -> ComputeDtype:
    """Validate ``compute_dtype=`` and normalise it: None when it is the factor dtype (nothing to do)."""
    if value is None or value == factor_dtype:
        return None
    if isinstance(value, str):
        if value != "tf32":
            raise ValueError(f"unknown compute_dtype {value!r}; use torch.float32, torch.bfloat16, torch.float16 "
                             "or 'tf32' (CUDA)")
        if device.type != "cuda":
            raise ValueError(f"compute_dtype='tf32' needs a CUDA device (the model is on {device}); use "
                             "torch.bfloat16 or the default")
        if factor_dtype != torch.float32:
            raise ValueError("compute_dtype='tf32' needs float32 factors")
        return "tf32"
    if value == torch.float64:
        raise ValueError("compute_dtype=torch.float64 needs float64 factors (factor_dtype=torch.float64)")
    if value not in ACCEPTED:
        raise ValueError(f"compute_dtype must be one of torch.float32, torch.bfloat16, torch.float16 or 'tf32', "
                         f"got {value}")
    return value  # with fp64 factors too: 16-bit operands, fp32 accumulation


def operand_dtype(cd: ComputeDtype) -> Optional[torch.dtype]:
    """The dtype operands are cast to (None: leave them; "tf32" keeps fp32 operands)."""
    if cd is None or cd == "tf32":
        return None
    return cd


@contextlib.contextmanager
def autocast_off():
    """The caller's ``torch.autocast`` switched off inside (every device type it is on for):
    the curvature products follow ``compute_dtype``, not the autocast of the model's passes."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


@contextlib.contextmanager
def precision(cd: ComputeDtype):
    """The curvature products' precision inside: TF32 matmuls (cuBLAS and the Triton kernels,
    which read the same flag) for "tf32", and never the caller's autocast (:func:`autocast_off`)."""
    with autocast_off():
        if cd != "tf32":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


class ComputeDtypeOperands:
    """Mixin for the inverse kinds: ``compute_dtype`` and a per-inverse cache of cast operands
    (so an inverse's matrices are rounded once per refresh, not once per product)."""

    _compute_dtype: ComputeDtype = None

    @property
    def compute_dtype(self) -> ComputeDtype:
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, value: ComputeDtype) -> None:
        self._compute_dtype = value
        self._operand_cache = {}

    def _operands(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dt = operand_dtype(self._compute_dtype)
        if dt is None:
            return list(tensors)
        cache = self.__dict__.setdefault("_operand_cache", {})
        out = []
        for t in tensors:
            c = cache.get(id(t))
            if c is None or c[0] is not t:
                c = cache[id(t)] = (t, t.to(dt))
            out.append(c[1])
        return out
