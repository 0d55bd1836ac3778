"""Coverage summaries at construction (no silent gaps) and the preconditioner's memory report."""
import warnings

import pytest
import torch
from torch import nn

import kfac_fast


class Scaled(nn.Module):
    """A Linear plus a loose (d_in, d_out) parameter: most parameters have no Kronecker block."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.mix = nn.Parameter(torch.randn(4, 40) * 0.1)
        self.out = nn.Linear(40, 3)

    def forward(self, x):
        return self.fc(x) + self.out(x @ self.mix)


def _build(cls, model, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        obj = cls(model, loss="softmax_cross_entropy", **kw)
    return obj, [w for w in seen if issubclass(w.category, kfac_fast.CoverageWarning)]


@pytest.mark.parametrize("cls", [kfac_fast.KFAC, kfac_fast.KFACPreconditioner])
def test_low_coverage_warns_once_naming_the_parameter(cls):
    obj, seen = _build(cls, Scaled(), **({"unsupported": "diagonal"} if cls is kfac_fast.KFACPreconditioner else {}))
    assert len(seen) == 1
    msg = str(seen[0].message)
    total = 4 * 3 + 3 + 4 * 40 + 40 * 3 + 3
    assert f"of {total} trainable parameters" in msg and "model.mix" in msg
    cov = obj.coverage()
    assert cov.trainable == total
    assert cov.count("kronecker") == 4 * 3 + 3 + 40 * 3 + 3
    assert cov.kronecker_fraction == pytest.approx((4 * 3 + 3 + 40 * 3 + 3) / total)


@pytest.mark.parametrize("cls", [kfac_fast.KFAC, kfac_fast.KFACPreconditioner])
def test_full_coverage_is_silent(cls):
    # norm layers' scale-shift blocks count against the Kronecker fraction: 91% here
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 3))
    obj, seen = _build(cls, model)
    assert seen == []
    kron = 16 * 64 + 64 + 64 * 3 + 3
    assert obj.coverage().kronecker_fraction == pytest.approx(kron / (kron + 2 * 64))


def test_preconditioner_memory_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy")
    before = pre.memory_report()
    assert before["factors"] == 0 and before["inverse"] == 0
    assert before["params"] == 4 * (5 * 7 + 7 + 7 * 3 + 3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step(x, y)
    after = pre.memory_report()
    # current and pending Ā (6×6, 8×8) and G (7×7, 3×3) in float32 at least
    assert after["factors"] >= 2 * 4 * (36 + 64 + 49 + 9)
    assert after["inverse"] >= 4 * (36 + 64 + 49 + 9)
