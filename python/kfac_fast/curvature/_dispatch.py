"""Calls from the curvature blocks into the kernel families (kfac_fast.ops).

Kept in one place so the curvature code reads like the paper: every heavy product goes
through one of these four entry points, each taking lists over layers and ``backend``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def sandwich(L, W, R, *, alpha=1.0, V=None, beta=0.0, transpose_L=False, transpose_R=False, backend="auto"):
    """U_i = beta·V_i + alpha·op(L_i) W_i op(R_i)."""
    try:
        from ..ops import sandwich as op
    except ImportError:
        op = None
    if op is not None:
        return op(L, W, R, alpha=alpha, V=V, beta=beta, transpose_L=transpose_L, transpose_R=transpose_R,
                  backend=backend)
    out = []
    for i, (l, w, r) in enumerate(zip(L, W, R)):
        l = l.t() if transpose_L else l
        r = r.t() if transpose_R else r
        u = alpha * (l @ w @ r)
        if V is not None and beta != 0:
            u = u + beta * V[i]
        out.append(u)
    return out


def eigen_precondition(V, QL, sL, QR, sR, *, cL=0.0, cR=0.0, c0=0.0, sigma=1, backend="auto"):
    """U = Q_L((Q_Lᵀ V Q_R) ⊘ D)Q_Rᵀ, D = σ(s_L + c_L)(s_R + c_R)ᵀ + c₀."""
    try:
        from ..ops import eigen_precondition as op
    except ImportError:
        op = None
    if op is not None:
        return op(V, QL, sL, QR, sR, cL=cL, cR=cR, c0=c0, sigma=sigma, backend=backend)

    def per(x, i):
        return x[i] if isinstance(x, (list, tuple)) else x

    out = []
    for i, v in enumerate(V):
        D = per(sigma, i) * torch.outer(sL[i] + per(cL, i), sR[i] + per(cR, i)) + per(c0, i)
        out.append(QL[i] @ ((QL[i].t() @ v @ QR[i]) / D) @ QR[i].t())
    return out


def rank_m_precondition(X, Gm, Ainv, Ginv, *, homogeneous: Sequence[bool], scale, backend="auto"):
    """U = scale · Ginv Gmᵀ X̄ Ainv via m-sized intermediates (end of Sec 8)."""
    try:
        from ..ops import rank_m_precondition as op
    except ImportError:
        op = None
    if op is not None:
        return op(X, Gm, Ainv, Ginv, homogeneous=homogeneous, scale=scale, backend=backend)
    out = []
    for i, (x, g) in enumerate(zip(X, Gm)):
        xb = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if homogeneous[i] else x
        s = scale[i] if isinstance(scale, (list, tuple)) else scale
        out.append(s * ((g @ Ginv[i]).t() @ (xb @ Ainv[i])))
    return out


def rank_m_is_cheaper(m: int, d_out: int, a_dim: int) -> bool:
    """Flop count of the rank-m path against forming Gmᵀ X̄ then Ginv·V·Ainv."""
    try:
        from ..ops import rank_m_is_cheaper as f
    except ImportError:
        f = None
    if f is not None:
        return f(m, d_out, a_dim)
    rank_m = m * d_out * d_out + m * a_dim * a_dim + m * d_out * a_dim
    direct = m * d_out * a_dim + d_out * d_out * a_dim + d_out * a_dim * a_dim
    return rank_m < direct


def factor_update(factors, inputs, *, eps, scale, homogeneous, rows: Optional[object] = None, backend="auto"):
    """In place F ← eps·F + scale·X̄ᵀX̄ for every layer."""
    try:
        from ..ops import factor_update as op
    except ImportError:
        op = None
    if op is not None:
        return op(factors, inputs, eps=eps, scale=scale, homogeneous=homogeneous, rows=rows, backend=backend)
    for i, (F, X) in enumerate(zip(factors, inputs)):
        if rows is not None:
            X = X[:rows] if isinstance(rows, int) else X.index_select(0, rows)
        X = X.to(F.dtype)
        if homogeneous[i]:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], 1)
        F.mul_(eps).addmm_(X.t(), X, alpha=scale)


def cross_factor_update(factors, X, Y, *, eps, scale, homogeneous_x, homogeneous_y, rows=None, backend="auto"):
    """In place F ← eps·F + scale·X̄ᵀȲ (the tridiagonal cross factors)."""
    try:
        from ..ops import cross_factor_update as op
    except ImportError:
        op = None
    if op is not None:
        return op(factors, X, Y, eps=eps, scale=scale, homogeneous_x=homogeneous_x, homogeneous_y=homogeneous_y,
                  rows=rows, backend=backend)
    for i, F in enumerate(factors):
        x, y = X[i], Y[i]
        if rows is not None:
            x = x[:rows] if isinstance(rows, int) else x.index_select(0, rows)
            y = y[:rows] if isinstance(rows, int) else y.index_select(0, rows)
        x, y = x.to(F.dtype), y.to(F.dtype)
        if homogeneous_x[i]:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        if homogeneous_y[i]:
            y = torch.cat([y, y.new_ones(y.shape[0], 1)], 1)
        F.mul_(eps).addmm_(x.t(), y, alpha=scale)
