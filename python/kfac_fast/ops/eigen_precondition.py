"""Preconditioning in a Kronecker eigenbasis, for all layers:

    U = Q_L ((Q_Lᵀ V Q_R) ⊘ D) Q_Rᵀ,   D = σ (s_L + c_L)(s_R + c_R)ᵀ + c₀

which is vec(U) = (Q_R ⊗ Q_L) diag(vec D)⁻¹ (Q_R ⊗ Q_L)ᵀ vec(V). One formula covers

* factored Tikhonov damping (Sec 6.3): Q_L, s_L = eig(G), Q_R, s_R = eig(Ā),
  c_L = γ/π, c_R = πγ, c₀ = 0, σ = 1 gives (G + γ/π I)⁻¹ V (Ā + πγ I)⁻¹;
* exact Tikhonov, eqn (6): c_L = c_R = 0, c₀ = λ + η gives (Ā ⊗ G + (λ+η) I)⁻¹ vec V;
* Appendix B: Q_L = K₂, Q_R = K₁ (not orthogonal), s_L = s₂, s_R = s₁, c₀ = 1, σ = ±1
  gives (A ⊗ B ± C ⊗ D)⁻¹ v = vec(K₂ ((K₂ᵀ V K₁) ⊘ (11ᵀ ± s₂s₁ᵀ)) K₁ᵀ).

V is a layer's gradient (d_out, d_in + 1) with the bias column last. The Triton path
runs four grouped GEMM launches (one per stage, all layers each), the division fused
into the epilogue of the second; intermediates are fp32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..backends import resolve_backend
from ._common import check_same_device, check_triton_dtypes, floats
from ._grouped_gemm import Operand, Problem, grouped_gemm


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return dt if dt == torch.float64 else torch.float32


def eigen_precondition_ref(V, QL, sL, QR, sR, *, cL=0.0, cR=0.0, c0=0.0, sigma=1.0, out_dtype=None) -> list:
    """Reference: per layer ``QL @ ((QL.T @ V @ QR) / D) @ QR.T`` in fp32 (fp64 for fp64
    inputs), D built with one ``torch.outer``; result in V's dtype."""
    n = len(V)
    cL, cR, c0, sigma = floats(cL, n, "cL"), floats(cR, n, "cR"), floats(c0, n, "c0"), floats(sigma, n, "sigma")
    out = []
    for v, ql, sl, qr, sr, a, b, c, s in zip(V, QL, sL, QR, sR, cL, cR, c0, sigma):
        odt, ct = v.dtype, _compute_dtype(v.dtype)
        v, ql, qr, sl, sr = v.to(ct), ql.to(ct), qr.to(ct), sl.to(ct), sr.to(ct)
        T = torch.linalg.multi_dot([ql.T, v, qr])
        D = torch.outer(sl + a, sr + b)
        if s != 1.0:
            D.mul_(s)
        if c != 0.0:
            D.add_(c)
        T.div_(D)
        out.append(torch.linalg.multi_dot([ql, T, qr.T]).to(out_dtype or odt))
    return out


@torch.library.custom_op("kfac_fast::eigen_precondition_triton", mutates_args=())
def _eigen_precondition_triton(V: List[torch.Tensor], QL: List[torch.Tensor], sL: List[torch.Tensor],
                               QR: List[torch.Tensor], sR: List[torch.Tensor], cL: List[float], cR: List[float],
                               c0: List[float], sigma: List[float],
                               out_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    n = len(V)
    # Two fp32 scratch matrices per layer, carved from one allocation.
    sizes = [v.numel() for v in V]
    scratch = torch.empty(2 * sum(sizes), dtype=torch.float32, device=V[0].device)
    P, T, off = [], [], 0
    for v, sz in zip(V, sizes):
        P.append(scratch[off:off + sz].view(v.shape))
        T.append(scratch[off + sz:off + 2 * sz].view(v.shape))
        off += 2 * sz
    U = [torch.empty(v.shape, dtype=out_dtype or v.dtype, device=v.device) for v in V]
    sLf = [s.to(torch.float32).contiguous() for s in sL]
    sRf = [s.to(torch.float32).contiguous() for s in sR]
    # 1. P = QLᵀ V
    grouped_gemm([Problem(Operand.of(QL[i], transpose=True), Operand.of(V[i]), out=P[i]) for i in range(n)])
    # 2. T = (P QR) ⊘ D
    grouped_gemm([Problem(Operand.of(P[i]), Operand.of(QR[i]), out=T[i], sl=sLf[i], sr=sRf[i],
                          cL=cL[i], cR=cR[i], c0=c0[i], sigma=sigma[i]) for i in range(n)], divide=True)
    # 3. P = QL T   (P's storage is free again)
    grouped_gemm([Problem(Operand.of(QL[i]), Operand.of(T[i]), out=P[i]) for i in range(n)])
    # 4. U = P QRᵀ
    grouped_gemm([Problem(Operand.of(P[i]), Operand.of(QR[i], transpose=True), out=U[i]) for i in range(n)])
    return U


@_eigen_precondition_triton.register_fake
def _(V, QL, sL, QR, sR, cL, cR, c0, sigma, out_dtype=None):
    return [torch.empty(v.shape, dtype=out_dtype or v.dtype, device=v.device) for v in V]


def eigen_precondition(V: Sequence[torch.Tensor], QL: Sequence[torch.Tensor], sL: Sequence[torch.Tensor],
                       QR: Sequence[torch.Tensor], sR: Sequence[torch.Tensor], *, cL=0.0, cR=0.0, c0=0.0,
                       sigma=1, backend: str = "auto", out_dtype: Optional[torch.dtype] = None) -> list:
    """Return ``[Q_L ((Q_Lᵀ V Q_R) ⊘ D) Q_Rᵀ for each layer]``, D = σ(s_L + c_L)(s_R + c_R)ᵀ + c₀.

    Args:
        V: list of (p_i, n_i) matrices (gradients, bias column last); any strides.
        QL, sL: lists of (p_i, p_i) and (p_i,) (eigenvectors/values of G, or K₂, s₂).
        QR, sR: lists of (n_i, n_i) and (n_i,) (eigenvectors/values of Ā, or K₁, s₁).
        cL, cR, c0: float or one per layer. sigma: +1 or -1 (or one per layer).
        backend: "auto", "torch" or "triton" ("native" maps to torch).
        out_dtype: dtype of the results (default V's): fp32 from 16-bit operands.

    Returns:
        list of (p_i, n_i) tensors in ``out_dtype`` (fp32 accumulation for 16-bit inputs).

    Raises:
        ValueError on shape/device mismatch or |sigma| != 1; TypeError when
        ``backend="triton"`` gets a dtype other than float32/float16/bfloat16.
    """
    V, QL, sL, QR, sR = list(V), list(QL), list(sL), list(QR), list(sR)
    n = len(V)
    if not (len(QL) == len(sL) == len(QR) == len(sR) == n):
        raise ValueError(f"eigen_precondition: list lengths differ (V {n}, QL {len(QL)}, sL {len(sL)}, "
                         f"QR {len(QR)}, sR {len(sR)}); give one entry per layer")
    cL, cR, c0, sigma = floats(cL, n, "cL"), floats(cR, n, "cR"), floats(c0, n, "c0"), floats(sigma, n, "sigma")
    if any(s not in (1.0, -1.0) for s in sigma):
        raise ValueError(f"sigma must be +1 or -1, got {sigma}")
    if n == 0:
        return []
    for i, (v, ql, sl, qr, sr) in enumerate(zip(V, QL, sL, QR, sR)):
        if v.dim() != 2:
            raise ValueError(f"eigen_precondition: layer {i}: V must be a matrix, got shape {tuple(v.shape)}")
        p, m = v.shape
        if tuple(ql.shape) != (p, p) or tuple(sl.shape) != (p,) or tuple(qr.shape) != (m, m) or tuple(sr.shape) != (m,):
            raise ValueError(f"eigen_precondition: layer {i}: V is {tuple(v.shape)}, so QL must be {(p, p)}, "
                             f"sL {(p,)}, "
                             f"QR {(m, m)}, sR {(m,)}; got {tuple(ql.shape)}, {tuple(sl.shape)}, {tuple(qr.shape)}, "
                             f"{tuple(sr.shape)}")
    dev = check_same_device("eigen_precondition", V + QL + sL + QR + sR)
    which = resolve_backend(backend, dev.type, family="eigen_precondition")
    if which == "triton":
        try:
            check_triton_dtypes("eigen_precondition", V + QL + QR)
        except TypeError:
            if backend != "auto":
                raise
            which = "torch"
    if which != "triton":
        return eigen_precondition_ref(V, QL, sL, QR, sR, cL=cL, cR=cR, c0=c0, sigma=sigma, out_dtype=out_dtype)
    return _eigen_precondition_triton(V, QL, sL, QR, sR, cL, cR, c0, sigma, out_dtype)
