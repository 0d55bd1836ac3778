"""The rank-m trick for small mini-batches (end of Sec 8).

The mini-batch gradient of layer i is ∇W_i h = (1/m) G_m^T X̄ with X̄ = [X, 1] the (m, d_in+1)
activations a_{i-1} (bias coordinate last) and G_m the (m, d_out) back-propagated
derivatives g_i. The block-diagonal update U = G⁻¹ (∇W h) Ā⁻¹ then factors as

    U = scale · Ginv G_mᵀ X̄ Ainv = scale · (G_m Ginv)ᵀ (X̄ Ainv)        (Ginv, Ainv symmetric)

through the m-sized intermediates G_m Ginv (m, d_out) and X̄ Ainv (m, d_in+1): cost
m d_out² + m d_in² + m d_out d_in instead of d_out² d_in + d_out d_in² + m d_out d_in
(:func:`rank_m_is_cheaper`). The Triton path is two grouped launches: both
intermediates of all layers in the first (ones column of X̄ fused), the final product
with ``scale`` in the second.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..backends import resolve_backend
from ._common import as_list, check_same_device, check_triton_dtypes, floats
from ._grouped_gemm import Operand, Problem, grouped_gemm


def rank_m_is_cheaper(m: int, d_out: int, d_in_bar: int) -> bool:
    """True when (G_m Ginv)ᵀ(X̄ Ainv) needs fewer flops than Ginv (G_mᵀ X̄) Ainv.

    Rank-m: m·d_out² + m·d_in_bar² + m·d_out·d_in_bar; direct: m·d_out·d_in_bar +
    d_out²·d_in_bar + d_out·d_in_bar². The shared term cancels.
    """
    return m * (d_out * d_out + d_in_bar * d_in_bar) < d_out * d_in_bar * (d_out + d_in_bar)


def rank_m_precondition_ref(X, Gm, Ainv, Ginv, *, homogeneous, scale) -> list:
    """Reference: per layer ``P = (Gm @ Ginv) * scale``; ``Q = addmm(Ainv[-1:], X, Ainv[:-1])``
    (the ones column folded into a broadcast row, no concat) or ``X @ Ainv``; ``U = P.T @ Q``.
    16-bit inputs computed in fp32; result in X's dtype."""
    n = len(X)
    homogeneous, scale = as_list(homogeneous, n, "homogeneous"), floats(scale, n, "scale")
    out = []
    for x, g, a, gi, h, s in zip(X, Gm, Ainv, Ginv, homogeneous, scale):
        odt = x.dtype
        ct = odt if odt == torch.float64 else torch.float32
        x, g, a, gi = x.to(ct), g.to(ct), a.to(ct), gi.to(ct)
        P = torch.mm(g, gi)
        if s != 1.0:
            P.mul_(s)
        Q = torch.addmm(a[-1:], x, a[:-1]) if h else torch.mm(x, a)
        out.append(torch.mm(P.T, Q).to(odt))
    return out


@torch.library.custom_op("kfac_fast::rank_m_precondition_triton", mutates_args=())
def _rank_m_triton(X: List[torch.Tensor], Gm: List[torch.Tensor], Ainv: List[torch.Tensor],
                   Ginv: List[torch.Tensor], homogeneous: List[bool], scale: List[float]) -> List[torch.Tensor]:
    stage1, stage2, U = [], [], []
    for x, g, a, gi, h, s in zip(X, Gm, Ainv, Ginv, homogeneous, scale):
        m, d_out, d_bar = x.shape[0], g.shape[1], a.shape[0]
        P = torch.empty((m, d_out), dtype=torch.float32, device=x.device)
        Q = torch.empty((m, d_bar), dtype=torch.float32, device=x.device)
        u = torch.empty((d_out, d_bar), dtype=x.dtype, device=x.device)
        stage1.append(Problem(Operand.of(g), Operand.of(gi), out=P))
        stage1.append(Problem(Operand.of(x, ones_col=h), Operand.of(a), out=Q))
        stage2.append(Problem(Operand.of(P, transpose=True), Operand.of(Q), out=u, alpha=s))
        U.append(u)
    grouped_gemm(stage1)
    grouped_gemm(stage2)
    return U


@_rank_m_triton.register_fake
def _(X, Gm, Ainv, Ginv, homogeneous, scale):
    return [x.new_empty((g.shape[1], a.shape[0])) for x, g, a in zip(X, Gm, Ainv)]


def rank_m_precondition(X: Sequence[torch.Tensor], Gm: Sequence[torch.Tensor], Ainv: Sequence[torch.Tensor],
                        Ginv: Sequence[torch.Tensor], *, homogeneous, scale, backend: str = "auto") -> list:
    """Return ``[scale · Ginv Gmᵀ X̄ Ainv for each layer]`` via the m-sized intermediates.

    Args:
        X: list of (m_i, d_in_i) activations; Gm: list of (m_i, d_out_i) derivatives.
        Ainv: list of symmetric (d_in_i + h_i, d_in_i + h_i); Ginv: list of symmetric
            (d_out_i, d_out_i) (damped inverses of Ā and G).
        homogeneous: bool or list (X̄ = [X, 1]); scale: float or list (e.g. 1/m).
        backend: "auto", "torch" or "triton" ("native" maps to torch).

    Returns:
        list of (d_out_i, d_in_i + h_i) tensors in X's dtype.
    """
    X, Gm, Ainv, Ginv = list(X), list(Gm), list(Ainv), list(Ginv)
    n = len(X)
    if not (len(Gm) == len(Ainv) == len(Ginv) == n):
        raise ValueError(f"rank_m_precondition: list lengths differ (X {n}, Gm {len(Gm)}, Ainv {len(Ainv)}, "
                         f"Ginv {len(Ginv)}); give one entry per layer")
    homogeneous = [bool(h) for h in as_list(homogeneous, n, "homogeneous")]
    scale = floats(scale, n, "scale")
    if n == 0:
        return []
    for i, (x, g, a, gi, h) in enumerate(zip(X, Gm, Ainv, Ginv, homogeneous)):
        if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
            raise ValueError(f"rank_m_precondition: layer {i}: X {tuple(x.shape)} and Gm {tuple(g.shape)} must be "
                             f"(m, d_in) and (m, d_out) with the same m")
        db, do = x.shape[1] + int(h), g.shape[1]
        if tuple(a.shape) != (db, db) or tuple(gi.shape) != (do, do):
            raise ValueError(f"rank_m_precondition: layer {i}: Ainv must be {(db, db)} and Ginv {(do, do)}, "
                             f"got {tuple(a.shape)} and {tuple(gi.shape)}")
    dev = check_same_device("rank_m_precondition", X + Gm + Ainv + Ginv)
    which = resolve_backend(backend, dev.type, family="rank_m")
    if which == "triton":
        try:
            check_triton_dtypes("rank_m_precondition", X + Gm + Ainv + Ginv)
        except TypeError:
            if backend != "auto":
                raise
            which = "torch"
    if which != "triton":
        return rank_m_precondition_ref(X, Gm, Ainv, Ginv, homogeneous=homogeneous, scale=scale)
    return _rank_m_triton(X, Gm, Ainv, Ginv, homogeneous, scale)
