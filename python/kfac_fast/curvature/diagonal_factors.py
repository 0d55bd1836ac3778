"""Diagonal Kronecker factors (paper Sec 5's estimates, only their diagonals): for a factor
whose size exceeds ``max_block_dim`` (:mod:`.factors`).

diag Ā = mean over the rows of ā∘ā (the homogeneous coordinate's entry is 1), diag G = (1/N)
Σ g∘g; for a convolution whose Ā comes straight from its input (``implicit_a``) the diagonal of
the patch second moment is summed per kernel offset from the squared input, without forming
the patch matrix.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def row_square_sum(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over the rows of r∘r: (n, d) -> (d,), accumulated in ``dtype``."""
    r = rows.reshape(-1, rows.shape[-1]).to(dtype)
    return (r * r).sum(0)


def patch_square_sum(x: torch.Tensor, *, kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Σ over examples and output positions of P∘P for the unfolded patches P of ``x``.

    x: (m, C, H, W). Returns (C·kh·kw,) in ``F.unfold``'s order (channel, then kernel row, then
    kernel column), the diagonal of Σ_rows p pᵀ: one strided slice of the zero-padded x² per
    kernel offset, so memory stays O(input).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    x2 = x.to(dtype)
    x2 = F.pad(x2 * x2, (pw, pw, ph, ph))
    ho = (x2.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x2.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = x2.new_zeros(x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            win = x2[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            out[:, i, j] = win.sum((0, 2, 3))
    return out.reshape(-1)


def accumulate_diagonal_(d: torch.Tensor, square_sum: torch.Tensor, *, eps: float, scale: float,
                         homogeneous_weight: "float | None" = None) -> None:
    """d ← eps·d + scale·square_sum, the EMA of a diagonal factor (Sec 5). ``d``: (n,). With
    ``homogeneous_weight`` w the last entry is the homogeneous coordinate's (mean of 1·1 = 1):
    ``square_sum`` covers the other n − 1 entries and the last gets + w."""
    if eps != 1.0:
        d.mul_(eps)
    if homogeneous_weight is None:
        d.add_(square_sum.to(d.dtype), alpha=scale)
    else:
        d[:-1].add_(square_sum.to(d.dtype), alpha=scale)
        d[-1:].add_(homogeneous_weight)
