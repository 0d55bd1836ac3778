"""compute_dtype's convention for the running factors (:mod:`kfac_fast.curvature.compute_dtype`):
the statistics rows are rounded once to the compute dtype, the products X̄ᵀX̄ accumulate in fp32.

So with ``compute_dtype=torch.bfloat16`` the factor equals the float64 accumulation of the
bf16-rounded rows to fp32 accuracy (the homogeneous coordinate, 1, is exact in any dtype), and
differs from the accumulation of the unrounded rows by the bf16 rounding (≈ 2⁻⁹ relative).
G's 1/N: a host N divides the accumulation; a device N (a loss with a mask, the sync-free step)
rides on the G rows as 1/sqrt(N) before they are rounded.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast.curvature import find_blocks, get_loss
from kfac_fast.curvature.running import RunningFactors
from kfac_fast.curvature.statistics import sampled_statistics


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_factors_are_the_fp64_products_of_the_rounded_rows(masked):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    if masked:
        y[::4] = -100
    blocks = find_blocks(model)
    loss = get_loss("softmax_cross_entropy", ignore_index=-100 if masked else None)
    stats, _ = sampled_statistics(model, blocks, x, loss, fisher="empirical", targets=y, check_finite=False)
    n = int(stats.n_terms)
    assert isinstance(stats.n_terms, torch.Tensor) == masked
    assert n == (30 if masked else 40)
    rf = RunningFactors(blocks, dtype=torch.float32, device=x.device, tridiagonal=False,
                        compute_dtype=torch.bfloat16)
    rf.update(stats, eps=0.0, backend="torch", valid=torch.tensor(True))
    for i, f in enumerate(rf.pending):
        a = stats.a[i].double()
        ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
        abr = torch.cat([a.to(torch.bfloat16).double(), ab[:, -1:]], 1)
        gr = stats.g[i].double()
        if masked:
            gr = gr / n ** 0.5
            want_G, exact_G = gr.to(torch.bfloat16).double().T @ gr.to(torch.bfloat16).double(), gr.T @ gr
        else:
            want_G, exact_G = gr.to(torch.bfloat16).double().T @ gr.to(torch.bfloat16).double() / n, gr.T @ gr / n
        want_A, exact_A = abr.T @ abr / 40, ab.T @ ab / 40
        assert _rel(f.A, want_A) < 2e-6 and _rel(f.G, want_G) < 2e-6, i
        # the rounding is visible: a factor of unrounded rows would fail the check above
        assert _rel(f.A, exact_A) > 1e-4 and _rel(f.G, exact_G) > 1e-4, i
