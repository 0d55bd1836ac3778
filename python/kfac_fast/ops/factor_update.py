"""Kronecker-factor updates (Sec 5): F <- eps * F + scale * X̄ᵀ X̄, in place, for all layers.

``X̄ = [X, 1]`` when the layer is homogeneous (the bias coordinate of ā, last), so with
``X`` the (m, d) mini-batch of activations ``a_{i-1}`` the update gives
``Ā_{i-1,i-1} = E[ā ā^T]`` and with back-propagated ``g_i`` it gives ``G_{i,i}``
(Sec 3). With ``eps = ε`` and ``scale = (1 - ε)/m`` it is the exponentially decaying
running average of Sec 5. :func:`cross_factor_update` is the non-symmetric variant
F <- eps * F + scale * X̄ᵀ Ȳ used by the block-tridiagonal approximation (Sec 4.3) for
Ā_{i-1,i} and G_{i,i+1}.

``rows`` selects the mini-batch rows that enter the statistics: ``None`` (all), an int
``k`` (leading k rows) or an int64 index tensor (the τ₁ subset); the kernel reads the
selected rows in place, never a gathered copy.

The Triton path is one grouped launch for all layers (:mod:`._grouped_gemm`): it
computes only upper-triangle tiles and mirrors them, fuses the ones column and the EMA,
and accumulates in fp32 for fp32/fp16/bf16 inputs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ..backends import resolve_backend
from ._common import as_list, check_same_device, check_triton_dtypes
from ._grouped_gemm import Operand, Problem, grouped_gemm

Rows = Union[None, int, torch.Tensor]


# ---------------------------------------------------------------------------------------
# Plain-PyTorch reference (also the benchmark baseline)
# ---------------------------------------------------------------------------------------


def _bar(X: torch.Tensor, h: bool, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
    if rows is not None:
        X = X[:rows] if isinstance(rows, int) else X.index_select(0, rows)
    X = X.to(dtype)
    if h:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
    return X


def factor_update_ref(factors: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, eps, scale,
                      homogeneous, rows: Rows = None) -> None:
    """Reference: per layer ``F.addmm_(X̄ᵀ, X̄, beta=eps, alpha=scale)`` with X̄ = cat([X, 1])
    cast to F's dtype (fp32 accumulation for 16-bit inputs)."""
    n = len(factors)
    eps, scale, homogeneous = as_list(eps, n, "eps"), as_list(scale, n, "scale"), as_list(homogeneous, n, "homogeneous")
    for F, X, e, s, h in zip(factors, inputs, eps, scale, homogeneous):
        Xb = _bar(X, h, rows, F.dtype)
        F.addmm_(Xb.T, Xb, beta=e, alpha=s)


_ALIGNED_MIN_D = 384


def _factor_update_torch(factors, inputs, *, eps, scale, homogeneous, rows: Rows = None) -> None:
    """The torch backend: :func:`factor_update_ref`'s result, but on CPU a homogeneous factor is
    updated from d-wide pieces: T = XᵀX on the aligned width, the bias row and column from the
    column sums of X, the corner from m, for d ≥ 384: there the (d+1)-wide GEMM of the
    reference ran 1.06-1.26x slower than these pieces (d = 500-1000), while for d ≤ 250 the
    extra passes cost more than they save (bench_factor_width.py, factor_width_cpu.csv)."""
    for F, X, e, s, h in zip(factors, inputs, eps, scale, homogeneous):
        if not h or F.device.type != "cpu" or F.shape[0] - 1 < _ALIGNED_MIN_D:
            factor_update_ref([F], [X], eps=e, scale=s, homogeneous=h, rows=rows)
            continue
        Xr = _bar(X, False, rows, F.dtype)
        d, m = Xr.shape[1], Xr.shape[0]
        T = torch.mm(Xr.T, Xr)
        c = Xr.sum(0)
        for view, val in ((F[:d, :d], T), (F[:d, d], c), (F[d, :d], c), (F[d, d], None)):
            if val is None:
                val = torch.tensor(float(m), dtype=F.dtype)
            if e == 0:  # eps = 0 ignores the old F, NaNs included
                view.copy_(val * s)
            else:
                view.mul_(e).add_(val, alpha=s)


def cross_factor_update_ref(factors: Sequence[torch.Tensor], X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor],
                            *, eps, scale, homogeneous_x, homogeneous_y, rows: Rows = None) -> None:
    """Reference: per pair ``F.addmm_(X̄ᵀ, Ȳ, beta=eps, alpha=scale)``."""
    n = len(factors)
    eps, scale = as_list(eps, n, "eps"), as_list(scale, n, "scale")
    hx, hy = as_list(homogeneous_x, n, "homogeneous_x"), as_list(homogeneous_y, n, "homogeneous_y")
    for F, x, y, e, s, a, b in zip(factors, X, Y, eps, scale, hx, hy):
        F.addmm_(_bar(x, a, rows, F.dtype).T, _bar(y, b, rows, F.dtype), beta=e, alpha=s)


# ---------------------------------------------------------------------------------------
# Triton custom ops
# ---------------------------------------------------------------------------------------


def _problems(factors, X, Y, eps, scale, hx, hy, k):
    probs = []
    for F, x, y, e, s, a, b in zip(factors, X, Y, eps, scale, hx, hy):
        xa = Operand.of(x, transpose=True, ones_row=a)
        yb = Operand.of(y, ones_col=b)
        xa.cols = xa.stored_cols = k if k >= 0 else xa.cols
        yb.rows = yb.stored_rows = k if k >= 0 else yb.rows
        probs.append(Problem(xa, yb, out=F, cin=F, alpha=float(s), beta=float(e)))
    return probs


@torch.library.custom_op("kfac_fast::factor_update_triton", mutates_args=("factors",))
def _factor_update_triton(factors: List[torch.Tensor], inputs: List[torch.Tensor], eps: List[float],
                          scale: List[float], homogeneous: List[bool], row_idx: Optional[torch.Tensor],
                          row_count: int) -> None:
    k = row_idx.shape[0] if row_idx is not None else row_count
    grouped_gemm(_problems(factors, inputs, inputs, eps, scale, homogeneous, homogeneous, k),
                 symmetric=True, gather_idx=row_idx)


@_factor_update_triton.register_fake
def _(factors, inputs, eps, scale, homogeneous, row_idx, row_count) -> None:
    return None


@torch.library.custom_op("kfac_fast::cross_factor_update_triton", mutates_args=("factors",))
def _cross_factor_update_triton(factors: List[torch.Tensor], X: List[torch.Tensor], Y: List[torch.Tensor],
                                eps: List[float], scale: List[float], homogeneous_x: List[bool],
                                homogeneous_y: List[bool], row_idx: Optional[torch.Tensor], row_count: int) -> None:
    k = row_idx.shape[0] if row_idx is not None else row_count
    grouped_gemm(_problems(factors, X, Y, eps, scale, homogeneous_x, homogeneous_y, k),
                 symmetric=False, gather_idx=row_idx)


@_cross_factor_update_triton.register_fake
def _(factors, X, Y, eps, scale, homogeneous_x, homogeneous_y, row_idx, row_count) -> None:
    return None


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def _check_rows(rows: Rows, ms: Sequence[int], device) -> tuple[Optional[torch.Tensor], int]:
    """Validate ``rows``; return (index tensor or None, count or -1 for all rows)."""
    m_min = min(ms) if ms else 0
    if rows is None:
        return None, -1
    if isinstance(rows, bool) or not isinstance(rows, (int, torch.Tensor)):
        raise TypeError(f"rows must be None, an int or an int64 index tensor, got {type(rows).__name__}")
    if isinstance(rows, int):
        if not 0 <= rows <= m_min:
            raise ValueError(f"rows={rows} must lie in [0, {m_min}] (the smallest mini-batch in the list)")
        return None, rows
    if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rows index tensor must be 1-D int64 (or int32), got {rows.dtype} "
                        f"of shape {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"rows is on {rows.device} but the factors are on {device}; move it with rows.to(device)")
    if rows.numel() > 0:
        # Device-side assert: no host sync on CUDA, immediate error on CPU.
        torch._assert_async((rows.min() >= 0) & (rows.max() < m_min),
                            f"rows indices must lie in [0, {m_min})")
    return rows.to(torch.int64).contiguous(), rows.numel()


def _check_common(name, factors, xs, ys, hx, hy, backend):
    n = len(factors)
    if len(xs) != n or len(ys) != n:
        raise ValueError(f"{name}: got {n} factors but {len(xs)} / {len(ys)} input lists; one entry per layer")
    for i, (F, x, y, a, b) in enumerate(zip(factors, xs, ys, hx, hy)):
        if x.dim() != 2 or y.dim() != 2:
            raise ValueError(f"{name}: layer {i}: inputs must be (m, d) matrices, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: layer {i}: X and Y have {x.shape[0]} and {y.shape[0]} rows; they must match")
        want = (x.shape[1] + int(a), y.shape[1] + int(b))
        if F.dim() != 2 or tuple(F.shape) != want:
            raise ValueError(f"{name}: layer {i}: factor has shape {tuple(F.shape)}, expected {want} "
                             f"(d + 1 when homogeneous)")
        if not F.is_contiguous():
            raise ValueError(f"{name}: layer {i}: factors are updated in place and must be contiguous")
        if not F.is_floating_point() or not x.is_floating_point() or not y.is_floating_point():
            raise TypeError(f"{name}: layer {i}: factors and inputs must be floating point")
    devs = check_same_device(name, list(factors) + list(xs) + list(ys))
    which = resolve_backend(backend, devs.type, family="factor_update")
    if which == "triton":
        check_triton_dtypes(name, factors, allowed=(torch.float32,), what="factors")
        check_triton_dtypes(name, list(xs) + list(ys), what="inputs")
    elif which == "native":
        which = "torch"  # no native kernel for this family; plain PyTorch is the CPU path
    return which, devs


def factor_update(factors: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, eps, scale, homogeneous,
                  rows: Rows = None, backend: str = "auto") -> None:
    """In place, for every layer i: ``F_i <- eps_i * F_i + scale_i * X̄_iᵀ X̄_i``.

    Args:
        factors: list of (d_i + h_i, d_i + h_i) contiguous float32 tensors (float64 on the
            torch backend); updated in place and left exactly symmetric by the Triton path
            (its lower triangle is rebuilt from the upper one).
        inputs: list of (m_i, d_i) tensors, float32/float16/bfloat16 (float64 on torch);
            any strides. With ``rows`` given, all lists share the selected rows.
        eps, scale: float or one float per layer (``eps = 0`` ignores the old F, NaNs included).
        homogeneous: bool or one bool per layer: append the ones column (h_i = 1).
        rows: None (all rows), int k (leading k rows) or 1-D int64 index tensor (τ₁ subset).
        backend: "auto", "torch" or "triton" ("native" maps to torch: no native kernel).

    Raises:
        ValueError on shape/device mismatch; TypeError on a dtype the Triton kernel does not
        support when ``backend="triton"`` is explicit.
    """
    factors, inputs = list(factors), list(inputs)
    n = len(factors)
    eps, scale = as_list(eps, n, "eps"), as_list(scale, n, "scale")
    homogeneous = [bool(h) for h in as_list(homogeneous, n, "homogeneous")]
    if n == 0:
        return
    which, dev = _check_common_auto("factor_update", factors, inputs, inputs, homogeneous, homogeneous, backend)
    idx, k = _check_rows(rows, [x.shape[0] for x in inputs], dev)
    if which == "torch":
        _factor_update_torch(factors, inputs, eps=eps, scale=scale, homogeneous=homogeneous, rows=rows)
        return
    _factor_update_triton(factors, inputs, [float(e) for e in eps], [float(s) for s in scale], homogeneous, idx, k)


def cross_factor_update(factors: Sequence[torch.Tensor], X: Sequence[torch.Tensor], Y: Sequence[torch.Tensor], *,
                        eps, scale, homogeneous_x, homogeneous_y, rows: Rows = None, backend: str = "auto") -> None:
    """In place, for every pair i: ``F_i <- eps_i * F_i + scale_i * X̄_iᵀ Ȳ_i`` (non-symmetric).

    For the cross factors of Sec 4.3: ``Ā_{i-1,i}`` from consecutive activations and
    ``G_{i,i+1}`` from consecutive back-propagated derivatives.

    Args:
        factors: list of (dx_i + hx_i, dy_i + hy_i) contiguous float32 tensors.
        X, Y: lists of (m_i, dx_i) and (m_i, dy_i) tensors (same rules as :func:`factor_update`).
        homogeneous_x, homogeneous_y: bool or list: append the ones column to X / Y.
        Other arguments as in :func:`factor_update`.
    """
    factors, X, Y = list(factors), list(X), list(Y)
    n = len(factors)
    eps, scale = as_list(eps, n, "eps"), as_list(scale, n, "scale")
    hx = [bool(h) for h in as_list(homogeneous_x, n, "homogeneous_x")]
    hy = [bool(h) for h in as_list(homogeneous_y, n, "homogeneous_y")]
    if n == 0:
        return
    which, dev = _check_common_auto("cross_factor_update", factors, X, Y, hx, hy, backend)
    idx, k = _check_rows(rows, [x.shape[0] for x in X], dev)
    if which == "torch":
        cross_factor_update_ref(factors, X, Y, eps=eps, scale=scale, homogeneous_x=hx, homogeneous_y=hy, rows=rows)
        return
    _cross_factor_update_triton(factors, X, Y, [float(e) for e in eps], [float(s) for s in scale], hx, hy, idx, k)


def _check_common_auto(name, factors, xs, ys, hx, hy, backend):
    """Like _check_common, but ``backend="auto"`` falls back to torch on dtypes Triton lacks."""
    if backend == "auto":
        try:
            return _check_common(name, factors, xs, ys, hx, hy, backend)
        except TypeError:
            # Re-raise genuine input errors; only the dtype gate of the Triton path falls back.
            _check_common(name, factors, xs, ys, hx, hy, "torch")
            return "torch", factors[0].device
    return _check_common(name, factors, xs, ys, hx, hy, backend)
