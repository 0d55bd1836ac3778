"""Conv2d Kronecker factor A (KFC, Grosse & Martens 2016) without the im2col patch matrix.

For a Conv2d layer (groups = 1) with input x of shape (m, C, H, W), kernel (kh, kw),
stride, padding and dilation, the patches are exactly the columns of
``torch.nn.functional.unfold(x, (kh, kw), dilation=, padding=, stride=)``: entries ordered
(channel, kernel row, kernel column), padding zeros included, R = H_out·W_out patches per
example. With ā = [patch; 1] (the homogeneous coordinate last, only when ``homogeneous``)
the update is, in place,

    F <- eps · F + scale · Σ_{n, r} ā_{n,r} ā_{n,r}ᵀ          F: (C·kh·kw + h)²

and the caller passes ``scale = (1 - eps) / (m·R)`` for the running average of Ā.

Three implementations:

:func:`conv_factor_update_ref`
    Full ``F.unfold`` of the mini-batch, then one ``addmm`` per layer: the ground truth
    and the benchmark baseline. Holds the (m·R, C·kh·kw) patch matrix (and copies of it).
``backend="torch"``
    The same numbers from chunks of the mini-batch: whole examples while a chunk's patch
    matrix stays under ``chunk_bytes`` (4 MiB by default), else bands of output rows of
    one example. The homogeneous row/column are the patch sums and the count, added
    without a ones column; peak extra memory is a few chunks, not the patch matrix.
``backend="triton"``
    Implicit im2col: one grouped launch for all layers; every program owns one
    upper-triangle tile of F, loads its patch tiles straight from x with computed
    indices (masked loads give the padding zeros), accumulates in fp32, and fuses the
    homogeneous row/column (never stored), ``scale`` and the EMA; the tile is written
    once above the diagonal and once mirrored, so F ends exactly symmetric. On CUDA a
    layer with few tiles and a long reduction (the 7x7 stem) is split along the
    reduction: its splits add into ``eps·F`` with fp32 atomics and F is mirrored
    afterwards (summation order then varies from run to run; the interpreter does not
    split unless told to). x may have any strides (non-contiguous, channels_last): the
    kernel addresses it through its strides, no copy.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as tnf

from ..backends import BackendUnavailableError, resolve_backend, triton_interpret
from ._common import as_list, check_same_device, check_triton_dtypes, floats
from ._grouped_gemm import _DTYPE_CODE, _as_ptr, _input_precision, _jit, tl, triton

Pair = Tuple[int, int]

CHUNK_BYTES = 4 << 20  # default patch-matrix budget of one chunk on the torch backend


# ---------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(v, name: str) -> Pair:
    if _is_int(v):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(u) for u in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _geometry(value, n: int, name: str) -> List[Pair]:
    """int or (a, b): the same for every layer; a list (or a tuple of pairs) of n entries,
    each an int or a pair: one per layer. A tuple of two ints is always one pair."""
    if _is_int(value) or (isinstance(value, tuple) and len(value) == 2 and all(_is_int(u) for u in value)):
        return [_pair(value, name)] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} layers; "
                             "give one per layer, or an int / pair for all")
        return [_pair(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{name} must be an int, a pair of ints, or a list of them (one per layer), got {value!r}")


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometries(n, kernel_size, stride, padding, dilation):
    ks, st = _geometry(kernel_size, n, "kernel_size"), _geometry(stride, n, "stride")
    pd, dl = _geometry(padding, n, "padding"), _geometry(dilation, n, "dilation")
    for i in range(n):
        if min(ks[i]) < 1 or min(st[i]) < 1 or min(dl[i]) < 1 or min(pd[i]) < 0:
            raise ValueError(f"layer {i}: kernel_size {ks[i]}, stride {st[i]}, dilation {dl[i]} must be >= 1 "
                             f"and padding {pd[i]} >= 0")
    return list(zip(ks, st, pd, dl))


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference (also the benchmark baseline)
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def conv_factor_update_ref(factors: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, kernel_size,
                           stride=1, padding=0, dilation=1, eps, scale, homogeneous) -> None:
    """Reference: per layer the full patch matrix ``X = unfold(x)`` as (m·R, C·kh·kw) in F's
    dtype, ``X̄ = cat([X, 1])`` when homogeneous, then ``F.addmm_(X̄ᵀ, X̄, beta=eps, alpha=scale)``.
    Arguments as in :func:`conv_factor_update`."""
    factors, inputs = list(factors), list(inputs)
    n = len(factors)
    eps, scale = as_list(eps, n, "eps"), as_list(scale, n, "scale")
    homogeneous = as_list(homogeneous, n, "homogeneous")
    geo = _geometries(n, kernel_size, stride, padding, dilation)
    for F, x, e, s, h, (k, st, p, d) in zip(factors, inputs, eps, scale, homogeneous, geo):
        P = tnf.unfold(x.to(F.dtype), k, dilation=d, padding=p, stride=st)  # (m, D, R)
        X = P.transpose(1, 2).reshape(-1, P.shape[1])
        if h:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        F.addmm_(X.T, X, beta=e, alpha=s)


# ---------------------------------------------------------------------------------------
# Chunked PyTorch (backend="torch")
# ---------------------------------------------------------------------------------------


def _chunks(x: torch.Tensor, k: Pair, st: Pair, p: Pair, d: Pair, D: int, elem: int, budget: int):
    """Yield (x piece, unfold padding) whose unfolds, taken together, are the patches of x:
    runs of whole examples while their patch matrix fits ``budget`` bytes, else bands of
    output rows of one example (the band's input rows, zero-padded at the image edges).
    The piece itself counts too (unfold may copy its input: a strided 1x1 conv's input is
    larger than its patches)."""
    m, C, H, W = x.shape
    Ho, Wo = _out_size(H, k[0], st[0], p[0], d[0]), _out_size(W, k[1], st[1], p[1], d[1])
    per_example = max(Ho * Wo * D, C * H * W) * elem
    if per_example <= budget:
        b = max(1, budget // per_example)
        for n0 in range(0, m, b):
            yield x[n0:n0 + b], p
        return
    rows = max(1, budget // (max(Wo * D, st[0] * C * W) * elem))
    for n0 in range(m):
        for o0 in range(0, Ho, rows):
            o1 = min(Ho, o0 + rows)
            i0 = o0 * st[0] - p[0]
            i1 = (o1 - 1) * st[0] - p[0] + d[0] * (k[0] - 1) + 1
            lo = min(max(i0, 0), H)
            hi = max(min(i1, H), lo)
            band = x[n0:n0 + 1, :, lo:hi]
            # rows of [i0, i1) above / below the image (a band may lie wholly in the padding)
            top, bottom = max(0, min(i1, 0) - i0), max(0, i1 - max(i0, H))
            if top or bottom:
                band = tnf.pad(band, (0, 0, top, bottom))
            yield band, (0, p[1])


@torch.no_grad()
def _conv_factor_update_chunked(factors, inputs, geo, eps, scale, homogeneous, chunk_bytes: int) -> None:
    for F, x, e, s, h, (k, st, p, d) in zip(factors, inputs, eps, scale, homogeneous, geo):
        D = x.shape[1] * k[0] * k[1]
        if e == 0:
            F.zero_()  # like addmm with beta = 0: the old F (NaN/Inf included) is ignored
        elif e != 1:
            F.mul_(e)
        S = F[:D, :D]
        colsum = torch.zeros(D, dtype=F.dtype, device=F.device) if h else None
        count = 0
        for piece, pad in _chunks(x, k, st, p, d, D, F.element_size(), chunk_bytes):
            P = tnf.unfold(piece.to(F.dtype), k, dilation=d, padding=pad, stride=st)  # (b, D, r)
            # (D, b·r): a view for one example (bands), a copy for a run of examples
            Pm = P[0] if P.shape[0] == 1 else P.transpose(0, 1).reshape(D, -1)
            del P
            S.addmm_(Pm, Pm.T, alpha=s)
            if h:
                colsum += Pm.sum(dim=1)
                count += Pm.shape[1]
            del Pm  # free this chunk before the next one is unfolded
        if h:
            F[:D, D].add_(colsum, alpha=s)
            F[D, :D].add_(colsum, alpha=s)
            F[D, D] += s * count


# ---------------------------------------------------------------------------------------
# Triton kernel (implicit im2col)
# ---------------------------------------------------------------------------------------

# Row layout of the int64 metadata table (one row per layer); the tile-start table follows.
_W = 32
(_X, _F, _SN, _SC, _SH, _SW, _H, _WD, _KH, _KW, _STH, _STW, _PH, _PW, _DH, _DW,
 _WO, _R, _D, _N, _K, _S, _KPS) = range(23)


@_jit
def _feature_index(offs, D, N, KH, KW, DH, DW, SC, SH, SW):
    """Feature (row of F) i = (c, p, q) -> address part, input-row / -column offsets of the
    kernel tap, whether it is a patch entry (i < D) and whether it is the ones row (D <= i < N)."""
    c = offs // (KH * KW)
    pq = offs % (KH * KW)
    p = pq // KW
    q = pq % KW
    ih = p * DH
    iw = q * DW
    addr = c.to(tl.int64) * SC + ih.to(tl.int64) * SH + iw.to(tl.int64) * SW
    return addr, ih, iw, offs < D, (offs >= D) & (offs < N)


@_jit
def _conv_factor_kernel(
    meta, fmeta, G, X_CODE: tl.constexpr, HAS_ONES: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Which layer: last g with tile_start[g] <= pid (layers are few).
    starts = meta + G * 32
    g = pid * 0
    for i in range(1, G):
        s0 = tl.load(starts + i)
        g = tl.where(pid >= s0, i, g)
    t = (pid - tl.load(starts + g)).to(tl.int32)
    row = meta + g * 32

    sN = tl.load(row + 2)
    sC = tl.load(row + 3)
    sH = tl.load(row + 4)
    sW = tl.load(row + 5)
    H = tl.load(row + 6).to(tl.int32)
    W = tl.load(row + 7).to(tl.int32)
    KH = tl.load(row + 8).to(tl.int32)
    KW = tl.load(row + 9).to(tl.int32)
    STH = tl.load(row + 10).to(tl.int32)
    STW = tl.load(row + 11).to(tl.int32)
    PH = tl.load(row + 12).to(tl.int32)
    PW = tl.load(row + 13).to(tl.int32)
    DH = tl.load(row + 14).to(tl.int32)
    DW = tl.load(row + 15).to(tl.int32)
    WO = tl.load(row + 16).to(tl.int32)
    R = tl.load(row + 17).to(tl.int32)
    D = tl.load(row + 18).to(tl.int32)
    N = tl.load(row + 19).to(tl.int32)
    K = tl.load(row + 20).to(tl.int32)
    S = tl.load(row + 21).to(tl.int32)
    KPS = tl.load(row + 22).to(tl.int32)

    # t = tile * S + split; tiles enumerate the lower triangle (r, c), c <= r: tm = c, tn = r.
    split = t % S
    tt = t // S
    tf = tt.to(tl.float32)
    r = ((tl.sqrt(8.0 * tf + 1.0) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= tt, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > tt, r - 1, r)
    tm = tt - r * (r + 1) // 2
    tn = r

    x_ptr = _as_ptr(tl.load(row + 0), X_CODE)
    f_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))

    offs_m = tm * BLOCK + tl.arange(0, BLOCK)
    offs_n = tn * BLOCK + tl.arange(0, BLOCK)
    am, aih, aiw, a_ok, a_one = _feature_index(offs_m, D, N, KH, KW, DH, DW, sC, sH, sW)
    bm, bih, biw, b_ok, b_one = _feature_index(offs_n, D, N, KH, KW, DH, DW, sC, sH, sW)

    k_lo = split * KPS
    k_hi = tl.minimum(k_lo + KPS, K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # Reduction index k = (example, output row, output column) -> top-left input pixel.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        ex = offs_k // R
        rr = offs_k % R
        kih = (rr // WO) * STH - PH
        kiw = (rr % WO) * STW - PW
        kaddr = ex.to(tl.int64) * sN + kih.to(tl.int64) * sH + kiw.to(tl.int64) * sW

        ih = aih[:, None] + kih[None, :]
        iw = aiw[:, None] + kiw[None, :]
        a_mask = a_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (am[:, None] + kaddr[None, :]), mask=a_mask, other=0.0)
        ih = kih[:, None] + bih[None, :]
        iw = kiw[:, None] + biw[None, :]
        b_mask = k_ok[:, None] & b_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (kaddr[:, None] + bm[None, :]), mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if HAS_ONES:
            a = tl.where(a_one[:, None] & k_ok[None, :], 1.0, a).to(a.dtype)
            b = tl.where(k_ok[:, None] & b_one[None, :], 1.0, b).to(b.dtype)
        if DOT_FP32:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)

    frow = fmeta + g * 2
    eps = tl.load(frow + 0)
    scale = tl.load(frow + 1)
    out = acc * scale
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    n64 = N.to(tl.int64)
    c_mask = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    up_mask = c_mask & (offs_m[:, None] <= offs_n[None, :])
    up_ptr = f_ptr + offs_m64[:, None] * n64 + offs_n64[None, :]
    if ATOMIC:
        # Split reduction: the host has set F = eps * F and mirrors F afterwards.
        tl.atomic_add(up_ptr, out, mask=up_mask)
    else:
        fin = tl.load(up_ptr, mask=up_mask, other=0.0)
        # eps == 0 ignores the old F entirely (NaN/Inf included), as addmm does.
        out = tl.where(eps != 0.0, out + eps * fin, out)
        tl.store(up_ptr, out, mask=up_mask)
        low_mask = c_mask & (offs_m[:, None] < offs_n[None, :])
        tl.store(f_ptr + offs_n64[:, None] * n64 + offs_m64[None, :], tl.trans(out), mask=tl.trans(low_mask))


_SPLIT_OVERRIDE: Optional[int] = None


@contextlib.contextmanager
def split_override(k_per_split: Optional[int]) -> Iterator[None]:
    """Split every layer's reduction into pieces of ``k_per_split`` patches (rounded up to a
    multiple of BLOCK_K) inside the block: for tests of the atomic path in the interpreter."""
    global _SPLIT_OVERRIDE
    old, _SPLIT_OVERRIDE = _SPLIT_OVERRIDE, k_per_split
    try:
        yield
    finally:
        _SPLIT_OVERRIDE = old


_CONFIG_OVERRIDE: Optional[dict] = None


@contextlib.contextmanager
def config_override(cfg: Optional[dict]) -> Iterator[None]:
    """Use ``cfg`` (BLOCK, BLOCK_K, num_warps, num_stages) for every launch in the block, in
    the interpreter too: for tuning sweeps and for benchmarks that run the interpreter on
    large layers (fewer, larger programs)."""
    global _CONFIG_OVERRIDE
    old, _CONFIG_OVERRIDE = _CONFIG_OVERRIDE, cfg
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


def _config(dot_fp32: bool) -> dict:
    if _CONFIG_OVERRIDE is not None:
        return dict(_CONFIG_OVERRIDE)
    if triton_interpret():
        # Few, large programs: each interpreted op costs the same whatever its size.
        return dict(BLOCK=32, BLOCK_K=64, num_warps=4, num_stages=1)
    # NOT tuned on hardware (no GPU run of this kernel yet).
    if dot_fp32 and _input_precision() == "ieee":
        return dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3)


def _k_per_split(layers, block: int, block_k: int, device: torch.device) -> List[int]:
    """Reduction length per program for each layer (K itself: no split)."""
    if _SPLIT_OVERRIDE is not None:
        kps = max(block_k, -(-_SPLIT_OVERRIDE // block_k) * block_k)
        return [kps] * len(layers)
    if device.type != "cuda":
        return [max(K, 1) for _, K in layers]
    # Aim at ~4 programs per SM with equal reduction lengths; never below 16 K-blocks.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    work = sum((T * (T + 1) // 2) * K for T, K in layers)
    target = max(16 * block_k, -(-work // (4 * sms)))
    target = -(-target // block_k) * block_k
    return [max(K, 1) if K <= 2 * target else target for _, K in layers]


@torch.library.custom_op("kfac_fast::conv_factor_update_triton", mutates_args=("factors",))
def _conv_factor_update_triton(factors: List[torch.Tensor], inputs: List[torch.Tensor], geometry: List[int],
                               eps: List[float], scale: List[float], homogeneous: List[bool]) -> None:
    """geometry: 8 ints per layer (kh, kw, sh, sw, ph, pw, dh, dw)."""
    groups: dict = {}
    for i, x in enumerate(inputs):
        groups.setdefault(x.dtype, []).append(i)
    for dt, idx in groups.items():
        _launch([factors[i] for i in idx], [inputs[i] for i in idx], [geometry[8 * i:8 * i + 8] for i in idx],
                [eps[i] for i in idx], [scale[i] for i in idx], [homogeneous[i] for i in idx], dt)


@_conv_factor_update_triton.register_fake
def _(factors, inputs, geometry, eps, scale, homogeneous) -> None:
    return None


def _launch(factors, inputs, geos, eps, scale, homogeneous, xdt):
    device = factors[0].device
    if device.type != "cpu" and triton_interpret():
        raise BackendUnavailableError(
            "the conv factor Triton kernel runs CUDA tensors only compiled; unset TRITON_INTERPRET "
            "(or set it to 0) before importing triton, or pass CPU tensors to use the interpreter")
    dot_fp32 = triton_interpret() or xdt == torch.float32
    cfg = _config(dot_fp32)
    bs, bk = cfg["BLOCK"], cfg["BLOCK_K"]
    rows = []
    for F, x, (kh, kw, sh, sw, ph, pw, dh, dw), e, s, h in zip(factors, inputs, geos, eps, scale, homogeneous):
        m, C, H, W = x.shape
        Ho, Wo = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
        D, N, K = C * kh * kw, F.shape[0], m * Ho * Wo
        rows.append(dict(F=F, x=x, e=e, s=s, T=triton.cdiv(N, bs), K=K,
                         ints=[x.data_ptr(), F.data_ptr(), *x.stride(), H, W, kh, kw, sh, sw, ph, pw, dh, dw,
                               Wo, Ho * Wo, D, N, K]))
    kps = _k_per_split([(r["T"], r["K"]) for r in rows], bs, bk, device)
    for r, k in zip(rows, kps):
        r["S"], r["KPS"] = max(1, triton.cdiv(r["K"], k)), k
    for atomic in (False, True):
        sel = [r for r in rows if (r["S"] > 1) == atomic]
        if not sel:
            continue
        if atomic:
            for r in sel:
                if r["e"] == 0:
                    r["F"].zero_()  # like eps == 0 in the fused path: the old F is ignored
                elif r["e"] != 1:
                    r["F"].mul_(r["e"])
        # Biggest layers first: their long tiles start early (longest-processing-time order).
        sel.sort(key=lambda r: -(r["T"] * (r["T"] + 1) // 2) * min(r["K"], r["KPS"]))
        ints, fl, starts, total = [], [], [], 0
        for r in sel:
            starts.append(total)
            total += r["T"] * (r["T"] + 1) // 2 * r["S"]
            row = r["ints"] + [r["S"], r["KPS"]]
            ints.extend(row + [0] * (_W - len(row)))
            fl.extend([r["e"], r["s"]])
        ints.extend(starts)
        host = torch.empty(len(ints) + (len(fl) + 1) // 2, dtype=torch.int64)
        host[:len(ints)] = torch.tensor(ints, dtype=torch.int64)
        host[len(ints):].view(torch.float32)[:len(fl)].copy_(torch.tensor(fl, dtype=torch.float32))
        meta = host.to(device, non_blocking=True) if device.type != "cpu" else host
        fmeta = meta[len(ints):].view(torch.float32)
        has_ones = any(r["ints"][_N] > r["ints"][_D] for r in sel)
        _conv_factor_kernel[(total,)](
            meta, fmeta, len(sel), X_CODE=_DTYPE_CODE[xdt], HAS_ONES=has_ones, ATOMIC=atomic, DOT_FP32=dot_fp32,
            INPUT_PRECISION=_input_precision(), BLOCK=bs, BLOCK_K=bk,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if atomic:
            for r in sel:
                F = r["F"]
                F.copy_(F.triu() + F.triu(1).T)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def _check(name, factors, inputs, geo, homogeneous, backend):
    n = len(factors)
    if len(inputs) != n:
        raise ValueError(f"{name}: got {n} factors but {len(inputs)} inputs; one entry per layer")
    for i, (F, x, h, (k, st, p, d)) in enumerate(zip(factors, inputs, homogeneous, geo)):
        if x.dim() != 4:
            raise ValueError(f"{name}: layer {i}: input must be (m, C_in, H, W), got shape {tuple(x.shape)}")
        Ho = _out_size(x.shape[2], k[0], st[0], p[0], d[0])
        Wo = _out_size(x.shape[3], k[1], st[1], p[1], d[1])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"{name}: layer {i}: kernel {k} (dilation {d}) does not fit the padded input "
                             f"{tuple(x.shape[2:])} + 2*{p}")
        D = x.shape[1] * k[0] * k[1]
        want = (D + int(h), D + int(h))
        if F.dim() != 2 or tuple(F.shape) != want:
            raise ValueError(f"{name}: layer {i}: factor has shape {tuple(F.shape)}, expected {want} "
                             f"(C_in*kh*kw + 1 when homogeneous)")
        if not F.is_contiguous():
            raise ValueError(f"{name}: layer {i}: factors are updated in place and must be contiguous")
        if not F.is_floating_point() or not x.is_floating_point():
            raise TypeError(f"{name}: layer {i}: factors and inputs must be floating point")
    dev = check_same_device(name, list(factors) + list(inputs))
    which = resolve_backend(backend, dev.type, family="conv_factor_update")
    if which == "triton":
        try:
            check_triton_dtypes(name, factors, allowed=(torch.float32,), what="factors")
            check_triton_dtypes(name, inputs, what="inputs")
            for i, (x, (k, st, p, d)) in enumerate(zip(inputs, geo)):
                Ho = _out_size(x.shape[2], k[0], st[0], p[0], d[0])
                Wo = _out_size(x.shape[3], k[1], st[1], p[1], d[1])
                if x.shape[0] * Ho * Wo >= 2 ** 31 - 2 ** 16 or x.shape[1] * k[0] * k[1] >= 2 ** 31 - 2 ** 16:
                    raise TypeError(f"{name}: layer {i}: backend='triton' indexes patches in int32; "
                                    f"m*H_out*W_out = {x.shape[0] * Ho * Wo} is too large, use backend='torch'")
        except TypeError:
            if backend != "auto":
                raise
            which = "torch"  # auto never fails on a dtype the kernel lacks
    elif which == "native":
        which = "torch"  # no native kernel for this family; chunked PyTorch is the CPU path
    return which


def conv_factor_update(factors: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, kernel_size, stride=1,
                       padding=0, dilation=1, eps, scale, homogeneous, backend: str = "auto",
                       chunk_bytes: Optional[int] = None) -> None:
    """In place, for every Conv2d layer i: ``F_i <- eps_i · F_i + scale_i · Σ_{n,r} ā ā ᵀ``,
    ā = [patch; 1] over the R = H_out·W_out patches of every example (see the module doc).

    Args:
        factors: list of (C_i·kh_i·kw_i + h_i)² contiguous tensors, float32 (float64 too on
            the torch backend); updated in place. The Triton path leaves them exactly symmetric.
        inputs: list of (m_i, C_i, H_i, W_i) layer inputs, float32/float16/bfloat16 (float64
            too on torch), any strides; 16-bit inputs are accumulated in fp32 (in F's dtype
            on torch).
        kernel_size, stride, padding, dilation: as for ``nn.Conv2d`` (groups = 1): an int or a
            pair for every layer, or a list of them, one per layer (a tuple of two ints is
            always one pair). Padding is zero padding given as ints ("same" is not accepted).
        eps, scale: float or one per layer (``eps = 0`` ignores the old F, NaNs included); the
            running average of Ā takes ``scale = (1 - eps) / (m_i · R_i)``.
        homogeneous: bool or one per layer: the bias coordinate (h_i = 1, last).
        backend: "auto" (chunked torch unless a :func:`~kfac_fast.use_backend` block says
            otherwise), "torch" (chunked unfold) or "triton" (implicit im2col; CUDA, or CPU
            tensors with ``TRITON_INTERPRET=1``). "native" maps to torch.
        chunk_bytes: torch backend only: the patch-matrix bytes of one chunk (default
            :data:`CHUNK_BYTES`, 4 MiB); the extra memory is about two chunks.

    Raises:
        ValueError on shape/device/geometry mismatch; TypeError on a dtype the Triton kernel
        does not support when ``backend="triton"`` is explicit.
    """
    factors, inputs = list(factors), list(inputs)
    n = len(factors)
    eps, scale = floats(eps, n, "eps"), floats(scale, n, "scale")
    homogeneous = [bool(h) for h in as_list(homogeneous, n, "homogeneous")]
    geo = _geometries(n, kernel_size, stride, padding, dilation)
    if n == 0:
        return
    which = _check("conv_factor_update", factors, inputs, geo, homogeneous, backend)
    if which == "torch":
        budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        if budget < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        _conv_factor_update_chunked(factors, inputs, geo, eps, scale, homogeneous, budget)
        return
    flat = [v for (k, st, p, d) in geo for v in (*k, *st, *p, *d)]
    _conv_factor_update_triton(factors, inputs, flat, eps, scale, homogeneous)


__all__ = ["CHUNK_BYTES", "config_override", "conv_factor_update", "conv_factor_update_ref", "split_override"]
