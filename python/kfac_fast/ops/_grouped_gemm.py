"""One grouped GEMM Triton kernel shared by the K-FAC kernel families.

Every family in this package (factor updates, eigenbasis preconditioning, sandwiches,
the rank-m trick) is a short chain of GEMM stages over a *list* of layers whose sizes
differ. Each stage is one launch of :func:`_grouped_gemm_kernel` for all layers: the
host packs per-problem metadata (raw data pointers, logical sizes, stored sizes,
strides) into one small int64 tensor plus a float32 tensor of epilogue scalars, and
every program finds its problem by a linear scan over the tile-start table.

Per problem g the kernel computes, for a tile of C (M x N)::

    acc  = op(A) @ op(B)                     # fp32 accumulation, K = inner size
    out  = alpha * acc
    out  = out / D      with D[i, j] = sigma * (sl[i] + cL) * (sr[j] + cR) + c0   (DIVIDE)
    out += beta * Cin   (skipped when beta == 0, like addmm)                       (HAS_CIN)
    Cout = out

Features (constexpr, so a launch pays only for what it uses):

``HAS_ONES``
    An operand may be logically larger than what is stored by one row or column of
    ones (the homogeneous coordinate of Sec 2 / ā = [a; 1]). Element (i, k) of A is read
    when ``i < a_rows and k < a_cols`` and is 1 elsewhere inside (M, K); the ones are
    never materialised.
``GATHER_K``
    The inner index k is mapped through an int64 index vector before addressing A and
    B (the tau_1 row subset of a mini-batch, read in place).
``SYMMETRIC``
    C is symmetric: only tiles with tile_n >= tile_m are computed; each is written
    once directly (upper triangle, i <= j) and once mirrored (strictly lower). Every
    element is written exactly once and Cin is read only on the upper triangle, so the
    update is race-free in place and the result exactly symmetric.

Transposes are strides: ``op(A)`` is read in place from the stored tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret

# Row layout of the int64 metadata table (one row per problem).
_W = 24
(_A, _B, _CIN, _COUT, _SL, _SR, _M, _N, _K, _AR, _AC, _BR, _BC,
 _SA0, _SA1, _SB0, _SB1, _SCI0, _SCI1, _SCO0, _SCO1, _TN) = range(22)
# Float table layout (one row per problem).
_FW = 8
_ALPHA, _BETA, _CL, _CR, _C0, _SIGMA = range(6)

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SUPPORTED_DTYPES = tuple(_DTYPE_CODE)


@triton.jit
def _as_ptr(addr, CODE: tl.constexpr):
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    return p


@triton.jit
def _grouped_gemm_kernel(
    meta, fmeta, idx_ptr, G,
    A_CODE: tl.constexpr, B_CODE: tl.constexpr, C_CODE: tl.constexpr, CIN_CODE: tl.constexpr,
    HAS_ONES: tl.constexpr, GATHER_K: tl.constexpr, SYMMETRIC: tl.constexpr,
    DIVIDE: tl.constexpr, HAS_CIN: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Which problem: last g with tile_start[g] <= pid (problems are few: one per layer).
    starts = meta + G * 24
    g = pid * 0
    for i in range(1, G):
        s = tl.load(starts + i)
        g = tl.where(pid >= s, i, g)
    t = pid - tl.load(starts + g)
    row = meta + g * 24

    M = tl.load(row + 6)
    N = tl.load(row + 7)
    K = tl.load(row + 8)
    a_rows = tl.load(row + 9)
    a_cols = tl.load(row + 10)
    b_rows = tl.load(row + 11)
    b_cols = tl.load(row + 12)
    sa0 = tl.load(row + 13)
    sa1 = tl.load(row + 14)
    sb0 = tl.load(row + 15)
    sb1 = tl.load(row + 16)
    sco0 = tl.load(row + 19)
    sco1 = tl.load(row + 20)
    tiles_n = tl.load(row + 21)

    if SYMMETRIC:
        # t enumerates the lower triangle (r, c), c <= r, of the tile grid; use tm=c, tn=r.
        tf = t.to(tl.float32)
        r = ((tl.sqrt(8.0 * tf + 1.0) - 1.0) * 0.5).to(tl.int64)
        r = tl.where((r + 1) * (r + 2) // 2 <= t, r + 1, r)
        r = tl.where(r * (r + 1) // 2 > t, r - 1, r)
        tm = t - r * (r + 1) // 2
        tn = r
    else:
        tm = t // tiles_n
        tn = t % tiles_n

    a_ptr = _as_ptr(tl.load(row + 0), A_CODE)
    b_ptr = _as_ptr(tl.load(row + 1), B_CODE)
    c_ptr = _as_ptr(tl.load(row + 3), C_CODE)

    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    a_row_ok = offs_m[:, None] < a_rows
    b_col_ok = offs_n[None, :] < b_cols
    if HAS_ONES:
        m_in = offs_m[:, None] < M
        n_in = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if GATHER_K:
            kk = tl.load(idx_ptr + offs_k, mask=offs_k < K, other=0).to(tl.int64)
        else:
            kk = offs_k.to(tl.int64)
        a_mask = a_row_ok & (offs_k[None, :] < a_cols)
        a = tl.load(a_ptr + offs_m64[:, None] * sa0 + kk[None, :] * sa1, mask=a_mask, other=0.0)
        b_mask = (offs_k[:, None] < b_rows) & b_col_ok
        b = tl.load(b_ptr + kk[:, None] * sb0 + offs_n64[None, :] * sb1, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_ONES:
            k_in = offs_k < K
            a = tl.where(m_in & k_in[None, :] & (~a_mask), 1.0, a).to(a.dtype)
            b = tl.where(k_in[:, None] & n_in & (~b_mask), 1.0, b).to(b.dtype)
        if DOT_FP32:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)

    frow = fmeta + g * 8
    alpha = tl.load(frow + 0)
    out = acc * alpha
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SYMMETRIC:
        up_mask = c_mask & (offs_m[:, None] <= offs_n[None, :])
    else:
        up_mask = c_mask
    if DIVIDE:
        cL = tl.load(frow + 2)
        cR = tl.load(frow + 3)
        c0 = tl.load(frow + 4)
        sigma = tl.load(frow + 5)
        sl_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        sr_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        sl = tl.load(sl_ptr + offs_m, mask=offs_m < M, other=1.0)
        sr = tl.load(sr_ptr + offs_n, mask=offs_n < N, other=1.0)
        d = sigma * (sl + cL)[:, None] * (sr + cR)[None, :] + c0
        out = out / tl.where(c_mask, d, 1.0)
    if HAS_CIN:
        beta = tl.load(frow + 1)
        cin_ptr = _as_ptr(tl.load(row + 2), CIN_CODE)
        sci0 = tl.load(row + 17)
        sci1 = tl.load(row + 18)
        cin = tl.load(cin_ptr + offs_m64[:, None] * sci0 + offs_n64[None, :] * sci1, mask=up_mask, other=0.0)
        # beta == 0 ignores Cin entirely (NaN/Inf in Cin included), as addmm does.
        out = tl.where(beta != 0.0, out + beta * cin.to(tl.float32), out)
    out_c = out.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m64[:, None] * sco0 + offs_n64[None, :] * sco1, out_c, mask=up_mask)
    if SYMMETRIC:
        low_mask = c_mask & (offs_m[:, None] < offs_n[None, :])
        tl.store(c_ptr + offs_n64[:, None] * sco0 + offs_m64[None, :] * sco1, tl.trans(out_c),
                 mask=tl.trans(low_mask))


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------


@dataclass
class Operand:
    """op(t) as read by the kernel: a logical (rows, cols) matrix with stored extent
    (stored_rows, stored_cols) <= (rows, cols); the rest is ones (homogeneous coordinate)."""

    t: torch.Tensor
    rows: int
    cols: int
    stored_rows: int
    stored_cols: int
    s0: int
    s1: int

    @staticmethod
    def of(t: torch.Tensor, *, transpose: bool = False, ones_row: bool = False, ones_col: bool = False) -> "Operand":
        r, c = t.shape
        s0, s1 = t.stride()
        if transpose:
            r, c, s0, s1 = c, r, s1, s0
        return Operand(t, r + int(ones_row), c + int(ones_col), r, c, s0, s1)


@dataclass
class Problem:
    """One GEMM C = epilogue(alpha * op(A) op(B)) of a grouped launch."""

    a: Operand
    b: Operand
    out: torch.Tensor
    cin: Optional[torch.Tensor] = None
    alpha: float = 1.0
    beta: float = 0.0
    sl: Optional[torch.Tensor] = None
    sr: Optional[torch.Tensor] = None
    cL: float = 0.0
    cR: float = 0.0
    c0: float = 0.0
    sigma: float = 1.0
    extra: dict = field(default_factory=dict)


def _config(dot_fp32: bool, symmetric: bool) -> dict:
    if triton_interpret():
        # Larger tiles mean fewer (slow, Python-level) programs in the interpreter.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    # Fixed configs (no autotune: the grouped launch mixes shapes). Not tuned on hardware yet.
    if dot_fp32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def _input_precision() -> str:
    # Same precision policy as the torch reference: TF32 only when torch allows it.
    if not triton_interpret() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def grouped_gemm(problems: Sequence[Problem], *, symmetric: bool = False, divide: bool = False,
                 gather_idx: Optional[torch.Tensor] = None) -> None:
    """Launch the grouped kernel over ``problems`` (one launch per operand-dtype combination).

    Internal: callers have validated shapes, devices and dtypes. Outputs are written in
    place into ``Problem.out``.
    """
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        if p.out.shape[0] == 0 or p.out.shape[1] == 0:
            continue
        key = (p.a.t.dtype, p.b.t.dtype, p.out.dtype, (p.cin if p.cin is not None else p.out).dtype)
        groups.setdefault(key, []).append(p)
    for (adt, bdt, cdt, cidt), probs in groups.items():
        _launch(probs, adt, bdt, cdt, cidt, symmetric, divide, gather_idx)


def _launch(probs, adt, bdt, cdt, cidt, symmetric, divide, gather_idx):
    dot_fp32 = triton_interpret() or adt == torch.float32 or bdt == torch.float32 or adt != bdt
    cfg = _config(dot_fp32, symmetric)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    has_cin = any(p.cin is not None for p in probs)
    has_ones = any(p.a.stored_rows != p.a.rows or p.a.stored_cols != p.a.cols
                   or p.b.stored_rows != p.b.rows or p.b.stored_cols != p.b.cols for p in probs)

    def ntiles(p):
        tm, tn = triton.cdiv(p.out.shape[0], bm), triton.cdiv(p.out.shape[1], bn)
        return (tm * (tm + 1) // 2 if symmetric else tm * tn), tn

    # Biggest problems first: their long tiles start early (longest-processing-time order).
    probs = sorted(probs, key=lambda p: -ntiles(p)[0] * p.a.cols)
    G = len(probs)
    ints: list[int] = []
    floats: list[float] = []
    starts: list[int] = []
    total = 0
    for p in probs:
        nt, tn = ntiles(p)
        starts.append(total)
        total += nt
        cin = p.cin if p.cin is not None else p.out
        M, N = p.out.shape
        row = [p.a.t.data_ptr(), p.b.t.data_ptr(), cin.data_ptr(), p.out.data_ptr(),
               p.sl.data_ptr() if p.sl is not None else 0, p.sr.data_ptr() if p.sr is not None else 0,
               M, N, p.a.cols, p.a.stored_rows, p.a.stored_cols, p.b.stored_rows, p.b.stored_cols,
               p.a.s0, p.a.s1, p.b.s0, p.b.s1, cin.stride(0), cin.stride(1),
               p.out.stride(0), p.out.stride(1), tn]
        ints.extend(row + [0] * (_W - len(row)))
        fl = [p.alpha, p.beta if p.cin is not None else 0.0, p.cL, p.cR, p.c0, p.sigma]
        floats.extend(fl + [0.0] * (_FW - len(fl)))
    if total == 0:
        return
    ints.extend(starts)
    device = probs[0].out.device
    meta = torch.tensor(ints, dtype=torch.int64).to(device, non_blocking=True)
    fmeta = torch.tensor(floats, dtype=torch.float32).to(device, non_blocking=True)
    idx = gather_idx if gather_idx is not None else meta  # dummy pointer when unused
    _grouped_gemm_kernel[(total,)](
        meta, fmeta, idx, G,
        A_CODE=_DTYPE_CODE[adt], B_CODE=_DTYPE_CODE[bdt], C_CODE=_DTYPE_CODE[cdt], CIN_CODE=_DTYPE_CODE[cidt],
        HAS_ONES=has_ones, GATHER_K=gather_idx is not None, SYMMETRIC=symmetric,
        DIVIDE=divide, HAS_CIN=has_cin, DOT_FP32=dot_fp32, INPUT_PRECISION=_input_precision(),
        **cfg,
    )
