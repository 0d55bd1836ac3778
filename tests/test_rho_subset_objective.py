"""ρ = (h(θ+δ) − h(θ)) / M(δ) (Sec 6.5) with h = mean loss + ½η‖θ‖² (Sec 9) when ρ is measured
on a random subset of ``rho_rows`` rows: both objectives carry the ½η‖θ‖² term.

Every row of the batch is the same example, so the mean loss on any subset is the batch's and
ρ is checked against an independent float64 computation of h at θ_k and θ_k + δ (θ read from the
model before and after an accepted step), with η large enough that dropping ½η‖θ‖² from either
side would move ρ far off.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC

ETA = 0.05


def _h(model) -> float:
    with torch.no_grad():
        z = model(_X)
        theta2 = sum(float((p.double() ** 2).sum()) for p in model.parameters())
        return float(F.cross_entropy(z, _Y)) + 0.5 * ETA * theta2


torch.manual_seed(0)
_X = torch.randn(1, 4, dtype=torch.float64).repeat(12, 1)
_Y = torch.tensor([2]).repeat(12)


@pytest.mark.parametrize("rho_rows", [3, 1000])  # a subset of 3 of the 12 rows; the whole batch
def test_rho_on_a_row_subset_includes_the_weight_decay_term(rho_rows):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = KFAC(model, loss="softmax_cross_entropy", weight_decay=ETA, rho_rows=rho_rows, tau1=0.5,
               generator=torch.Generator().manual_seed(2))
    checked = 0
    for _ in range(4):
        h0 = _h(model)
        s = opt.step(_X, _Y)
        h1 = _h(model)
        assert not s["rejected"]
        M = float(s["M"])
        assert M < 0
        assert float(s["objective"]) == pytest.approx(h0, rel=1e-12)
        assert float(s["rho"]) == pytest.approx((h1 - h0) / M, rel=1e-8, abs=1e-10)
        checked += 1
    assert checked == 4
