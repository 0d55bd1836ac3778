"""``rules.step_decision``: the rejection codes, ρ and the λ/ν/counter updates of one step,
on hand-derived cases (Sec 6.5 and Nielsen's rule for rejected steps, :mod:`kfac_fast.rules`).

ρ = (h(θ+δ) − h(θ)) / M(δ) is defined only where M(δ) = M(δ) − M(0) < 0: a step the model
predicts no decrease for is not judged by ρ (ρ NaN, kept unless something is non-finite).
"""
from __future__ import annotations

import math

import pytest
import torch

from kfac_fast import rules

OMEGA1 = 0.9


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def decide(h, h_new, M, *, valid=True, ok_pre=True, lam=1.0, nu=2.0, rejections=0, total=0, unreported=0,
           measure=True, lm_due=True, held_out=False, reject_steps=True, rescale=True, rho_min=0.0):
    out = rules.step_decision(_t(h), _t(h_new), _t(M), _t(valid, torch.bool), _t(ok_pre, torch.bool), _t(lam),
                              _t(nu), _t(rejections, torch.long), _t(total, torch.long),
                              _t(unreported, torch.long), measure=measure, lm_due=lm_due, held_out=held_out,
                              reject_steps=reject_steps, rescale=rescale, rho_min=rho_min, omega1=OMEGA1,
                              lambda_min=1e-8, lambda_max=1e8)
    code, rho, lam, nu, rej, tot, unrep = out
    return dict(code=int(code), rho=float(rho), lam=float(lam), nu=float(nu), rejections=int(rej), total=int(tot),
                unreported=int(unrep))


@pytest.mark.parametrize("M", [0.0, 0.25])
def test_no_predicted_decrease_is_not_judged_by_rho(M):
    """M(δ) ≥ 0: ρ undefined (NaN), the step kept; λ unchanged (the LM rule needs ρ), ν back to 2."""
    d = decide(1.0, 1.3, M, lam=0.5, nu=8.0, rejections=3, total=3)
    assert d["code"] == 0 and math.isnan(d["rho"])
    assert d["lam"] == 0.5 and d["nu"] == rules.NU_INIT
    assert d["rejections"] == 0 and d["total"] == 3 and d["unreported"] == 0


def test_rho_below_rho_min_rejects_with_nielsen_increase():
    """M = −0.2, h: 1 → 1.1: ρ = 0.1/−0.2 = −0.5 < 0: rejected (code 4, a reported cause);
    λ ← max(ν, 1/ω₁)·λ = 2·0.5, ν ← 4."""
    d = decide(1.0, 1.1, -0.2, lam=0.5, nu=2.0, rejections=1, total=5)
    assert d["code"] == 4 and d["rho"] == pytest.approx(-0.5, rel=1e-15)
    assert d["lam"] == pytest.approx(1.0, rel=1e-15) and d["nu"] == 4.0
    assert d["rejections"] == 2 and d["total"] == 6 and d["unreported"] == 0


def test_good_rho_keeps_the_step_and_applies_the_lm_rule():
    """ρ = −0.16/−0.2 = 0.8 > 3/4: kept, λ ← ω₁λ; ρ = 0.1 < 1/4: kept (ρ ≥ rho_min = 0), λ ← λ/ω₁."""
    d = decide(1.0, 0.84, -0.2, lam=0.5, nu=4.0, rejections=2)
    assert d["code"] == 0 and d["rho"] == pytest.approx(0.8, rel=1e-12)
    assert d["lam"] == pytest.approx(0.5 * OMEGA1, rel=1e-15) and d["nu"] == 2.0 and d["rejections"] == 0
    d = decide(1.0, 0.98, -0.2, lam=0.5)
    assert d["code"] == 0 and d["lam"] == pytest.approx(0.5 / OMEGA1, rel=1e-15)


@pytest.mark.parametrize("h_new", [math.inf, math.nan])
def test_non_finite_objective_after_the_step_is_its_own_code(h_new):
    """h(θ+δ) non-finite where ρ does not decide (M ≥ 0, or no reject_steps): code 5, counted as an
    unreported non-finite rejection, λ raised by Nielsen's rule."""
    for kw in (dict(M=0.1), dict(M=-0.2, reject_steps=False)):
        M = kw.pop("M")
        d = decide(1.0, h_new, M, lam=0.5, nu=2.0, **kw)
        assert d["code"] == 5, kw
        assert d["unreported"] == 1 and d["rejections"] == 1 and d["total"] == 1
        assert d["lam"] == pytest.approx(1.0, rel=1e-15) and d["nu"] == 4.0


def test_non_finite_inputs_take_precedence_in_order():
    assert decide(math.nan, 0.5, -0.2, valid=False, ok_pre=False)["code"] == 1
    assert decide(1.0, 0.5, -0.2, valid=False, ok_pre=False)["code"] == 2
    d = decide(1.0, 0.5, -0.2, ok_pre=False)
    assert d["code"] == 3 and d["unreported"] == 1


def test_without_measurement_nothing_is_judged():
    d = decide(1.0, math.nan, 0.3, measure=False, lm_due=False, lam=0.5, nu=8.0)
    assert d["code"] == 0 and math.isnan(d["rho"]) and d["lam"] == 0.5 and d["nu"] == 2.0
