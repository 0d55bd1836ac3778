"""Grouped matrix sandwiches U_i = beta V_i + alpha op(L_i) W_i op(R_i), for all layers.

Two uses in K-FAC:

* the block-tridiagonal passes of Sec 4.3: u = Ξᵀv is U_i = V_i − Ψ^G_{i-1,i}ᵀ V_{i-1} Ψ^Ā_{i-2,i-1}
  and u = Ξv is U_i = V_i − Ψ^G_{i,i+1} V_{i+1} Ψ^Āᵀ_{i-1,i} (alpha = -1, beta = 1, with the
  transposes read in place);
* the block-diagonal apply with explicit inverses, U = G⁻¹ V Ā⁻¹ (Sec 4.2, damped as in 6.3).

Per layer the cheaper association, (op(L) W) op(R) or op(L) (W op(R)), is chosen by flop
count; the Triton path is two grouped launches (one per GEMM stage, all layers each),
with alpha/beta and the subtraction fused into the second GEMM's epilogue.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..backends import resolve_backend
from ._common import check_same_device, check_triton_dtypes, floats
from ._grouped_gemm import Operand, Problem, grouped_gemm


def _op(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    return t.T if transpose else t


def _left_first(p: int, q: int, r: int, s: int) -> bool:
    """(p x q)(q x r)(r x s): True when (LW)R costs no more flops than L(WR)."""
    return p * q * r + p * r * s <= q * r * s + p * q * s


def sandwich_ref(L, W, R, *, alpha=1.0, V=None, beta=0.0, transpose_L=False, transpose_R=False,
                 out_dtype=None) -> list:
    """Reference: per layer the cheaper association, ending in one ``torch.addmm`` with
    ``beta``/``alpha`` (``torch.mm`` + ``mul_`` when V is None); 16-bit inputs computed in fp32;
    the result in ``out_dtype`` (default W's dtype)."""
    n = len(W)
    alpha, beta = floats(alpha, n, "alpha"), floats(beta, n, "beta")
    out = []
    for i in range(n):
        odt = W[i].dtype
        ct = odt if odt == torch.float64 else torch.float32
        l, w, r = _op(L[i], transpose_L).to(ct), W[i].to(ct), _op(R[i], transpose_R).to(ct)
        if _left_first(l.shape[0], l.shape[1], w.shape[1], r.shape[1]):
            x, y = l @ w, r
        else:
            x, y = l, w @ r
        if V is not None and beta[i] != 0.0:
            u = torch.addmm(V[i].to(ct), x, y, beta=beta[i], alpha=alpha[i])
        else:
            u = torch.mm(x, y)
            if alpha[i] != 1.0:
                u.mul_(alpha[i])
        out.append(u.to(out_dtype or odt))
    return out


@torch.library.custom_op("kfac_fast::sandwich_triton", mutates_args=())
def _sandwich_triton(L: List[torch.Tensor], W: List[torch.Tensor], R: List[torch.Tensor], alpha: List[float],
                     V: List[Optional[torch.Tensor]], beta: List[float], transpose_L: bool,
                     transpose_R: bool, out_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    n = len(W)
    stage1, stage2, U = [], [], []
    for i in range(n):
        lo, ro = Operand.of(L[i], transpose=transpose_L), Operand.of(R[i], transpose=transpose_R)
        p, q, r, s = lo.rows, lo.cols, W[i].shape[1], ro.cols
        u = torch.empty((p, s), dtype=out_dtype or W[i].dtype, device=W[i].device)
        U.append(u)
        cin = V[i] if beta[i] != 0.0 else None
        if _left_first(p, q, r, s):
            T = torch.empty((p, r), dtype=torch.float32, device=u.device)
            stage1.append(Problem(lo, Operand.of(W[i]), out=T))
            stage2.append(Problem(Operand.of(T), ro, out=u, cin=cin, alpha=alpha[i], beta=beta[i]))
        else:
            T = torch.empty((q, s), dtype=torch.float32, device=u.device)
            stage1.append(Problem(Operand.of(W[i]), ro, out=T))
            stage2.append(Problem(lo, Operand.of(T), out=u, cin=cin, alpha=alpha[i], beta=beta[i]))
    grouped_gemm(stage1)
    grouped_gemm(stage2)
    return U


@_sandwich_triton.register_fake
def _(L, W, R, alpha, V, beta, transpose_L, transpose_R, out_dtype=None):
    out = []
    for l, w, r in zip(L, W, R):
        p = l.shape[1] if transpose_L else l.shape[0]
        s = r.shape[0] if transpose_R else r.shape[1]
        out.append(w.new_empty((p, s), dtype=out_dtype or w.dtype))
    return out


def sandwich(L: Sequence[torch.Tensor], W: Sequence[torch.Tensor], R: Sequence[torch.Tensor], *, alpha=1.0,
             V: Optional[Sequence[torch.Tensor]] = None, beta=0.0, transpose_L: bool = False,
             transpose_R: bool = False, backend: str = "auto", out_dtype: Optional[torch.dtype] = None) -> list:
    """Return ``[beta_i V_i + alpha_i op(L_i) W_i op(R_i) for each i]``, op = transpose when asked.

    Args:
        L, W, R: lists of matrices with op(L_i) (p_i, q_i), W_i (q_i, r_i), op(R_i) (r_i, s_i);
            any strides (transposes are read in place).
        alpha, beta: float or one per layer. ``beta = 0`` ignores V (NaNs included).
        V: None or a list of (p_i, s_i) matrices.
        backend: "auto", "torch" or "triton" ("native" maps to torch).
        out_dtype: dtype of the results (default W's): fp32 results from 16-bit operands
            (``compute_dtype``) without a rounding of the output.

    Returns:
        list of (p_i, s_i) tensors in ``out_dtype`` (fp32 accumulation and intermediates).
    """
    L, W, R = list(L), list(W), list(R)
    n = len(W)
    if len(L) != n or len(R) != n or (V is not None and len(V) != n):
        raise ValueError(f"sandwich: list lengths differ (L {len(L)}, W {n}, R {len(R)}"
                         f"{'' if V is None else f', V {len(V)}'}); give one entry per layer")
    V = list(V) if V is not None else None
    alpha, beta = floats(alpha, n, "alpha"), floats(beta, n, "beta")
    if n == 0:
        return []
    for i in range(n):
        for name, t in (("L", L[i]), ("W", W[i]), ("R", R[i])) + ((("V", V[i]),) if V is not None else ()):
            if t.dim() != 2:
                raise ValueError(f"sandwich: layer {i}: {name} must be a matrix, got shape {tuple(t.shape)}")
        l, r = _op(L[i], transpose_L), _op(R[i], transpose_R)
        if l.shape[1] != W[i].shape[0] or W[i].shape[1] != r.shape[0]:
            raise ValueError(f"sandwich: layer {i}: op(L) {tuple(l.shape)} @ W {tuple(W[i].shape)} @ op(R) "
                             f"{tuple(r.shape)} do not chain")
        if V is not None and tuple(V[i].shape) != (l.shape[0], r.shape[1]):
            raise ValueError(f"sandwich: layer {i}: V has shape {tuple(V[i].shape)}, "
                             f"expected {(l.shape[0], r.shape[1])}")
    dev = check_same_device("sandwich", L + W + R + (V or []))
    which = resolve_backend(backend, dev.type, family="sandwich")
    if which == "triton":
        try:
            check_triton_dtypes("sandwich", L + W + R + (V or []))
        except TypeError:
            if backend != "auto":
                raise
            which = "torch"
    if which != "triton":
        return sandwich_ref(L, W, R, alpha=alpha, V=V, beta=beta, transpose_L=transpose_L, transpose_R=transpose_R,
                            out_dtype=out_dtype)
    Vs: list = V if V is not None else [None] * n
    beta = beta if V is not None else [0.0] * n
    return _sandwich_triton(L, W, R, alpha, Vs, beta, transpose_L, transpose_R, out_dtype)
