"""The Levenberg-Marquardt rule of Sec 6.5 at its boundaries: "if ρ > 3/4 then λ ← ω₁λ; if
ρ < 1/4 then λ ← λ/ω₁" (strict inequalities: ρ = 3/4 and ρ = 1/4 leave λ unchanged), and the
[lambda_min, lambda_max] clamps, in the rule and through the optimizer."""
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_fast import KFAC
from kfac_fast.optimizer import levenberg_marquardt

D = torch.float64
W1 = (19 / 20) ** 5  # ω₁ for T1 = 5


@pytest.mark.parametrize("rho,factor", [
    (0.76, W1), (math.nextafter(0.75, 1.0), W1), (1.0, W1), (5.0, W1),  # ρ > 3/4: shrink
    (0.75, 1.0), (0.74, 1.0), (0.5, 1.0), (0.26, 1.0), (0.25, 1.0),     # 1/4 ≤ ρ ≤ 3/4: keep
    (math.nextafter(0.25, 0.0), 1 / W1), (0.24, 1 / W1), (0.0, 1 / W1), (-3.0, 1 / W1),
    (-math.inf, 1 / W1),                                                  # ρ < 1/4: grow
])
def test_levenberg_marquardt_thresholds(rho, factor):
    lam = 3.0
    new = levenberg_marquardt(lam, rho, W1)
    assert new == pytest.approx(lam * factor, rel=1e-15), (rho, new)
    # also with clamps far away: the same answer
    assert levenberg_marquardt(lam, rho, W1, lo=1e-8, hi=1e8) == pytest.approx(lam * factor, rel=1e-15)


@pytest.mark.parametrize("omega1", [W1, (19 / 20) ** 1])
def test_levenberg_marquardt_clamps(omega1):
    lo, hi = 1e-3, 10.0
    # shrinking stops at lo …
    assert levenberg_marquardt(lo, 0.9, omega1, lo=lo, hi=hi) == lo
    assert levenberg_marquardt(1.01 * lo, 0.9, omega1, lo=lo, hi=hi) == lo
    # … but is unaffected above it
    assert levenberg_marquardt(2 * lo, 0.9, omega1, lo=lo, hi=hi) == pytest.approx(2 * lo * omega1)
    # growing stops at hi …
    assert levenberg_marquardt(hi, 0.1, omega1, lo=lo, hi=hi) == hi
    assert levenberg_marquardt(0.99 * hi, -1.0, omega1, lo=lo, hi=hi) == hi
    # … but is unaffected below it
    assert levenberg_marquardt(hi / 2, 0.1, omega1, lo=lo, hi=hi) == pytest.approx(hi / 2 / omega1)


def _least_squares(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 5, generator=g, dtype=D)
    Y = X @ torch.randn(5, 3, generator=g, dtype=D) + 0.1 * torch.randn(64, 3, generator=g, dtype=D)
    torch.manual_seed(seed)
    return nn.Linear(5, 3).to(D), X, Y


def test_optimizer_keeps_lambda_at_lambda_min():
    # Linear least squares: M over-predicts curvature (λ term), ρ ≥ 1 > 3/4, so λ would shrink:
    # at λ = lambda_min it must stay there.
    model, X, Y = _least_squares()
    lam_min = 1e-3
    opt = KFAC(model, loss="squared_error", lambda_init=lam_min, lambda_min=lam_min, T1=1, tau2=1.0,
               momentum=False, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        s = opt.step(X, Y)
        assert not s["rejected"] and s["rho"] is not None and s["rho"] > 0.75
        assert opt.lambda_ == lam_min


class _Sin(nn.Module):
    def forward(self, x):
        return torch.sin(25 * x)


def test_optimizer_keeps_lambda_at_lambda_max():
    # A wildly non-quadratic net with F from 2 rows: ρ < 1/4, λ would grow; at lambda_max it stays.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 12), _Sin(), nn.Linear(12, 2)).to(D)
    x, y = torch.randn(64, 3, dtype=D), torch.randn(64, 2, dtype=D)
    lam_max = 1e-6
    opt = KFAC(model, loss="squared_error", lambda_init=lam_max, lambda_min=1e-9, lambda_max=lam_max,
               gamma_init=1e-4, adapt_gamma=False, momentum=False, T1=1, tau2=1 / 32, tau2_min_rows=0,
               generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a rejected step may warn
        s = opt.step(x, y)
    assert s["rejected"] or s["rho"] < 0.25
    assert opt.lambda_ == lam_max
