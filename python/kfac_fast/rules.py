"""The adaptation rules of Algorithm 2: λ (Sec 6.5), γ (Sec 6.6) and step acceptance.

Pure functions of host scalars (and their 0-d tensor twins at the end, for the sync-free step);
the optimizer owns the state they update.

- :func:`levenberg_marquardt`: the paper's rule (Sec 6.5, after Moré 1978).
- :func:`rejection_increase`: what happens to λ when a step is rejected. The paper has no
  rejection; its rule would raise λ by only 1/ω₁ per T1 iterations, so recovering from a tiny λ
  after a bad step takes hundreds of iterations. We use Nielsen's rule for rejected
  Levenberg-Marquardt steps (H. B. Nielsen 1999; Madsen, Nielsen & Tingleff 2004, "Methods for
  non-linear least squares problems", eq. 3.16): λ ← νλ, ν ← 2ν on each consecutive rejection,
  ν ← 2 again after an accepted step, so λ grows geometrically faster the longer the model
  keeps being wrong.
- :func:`gamma_candidates`: the greedy γ rule's three candidates (Sec 6.6).
"""
from __future__ import annotations

import math

import torch

RHO_HIGH = 0.75  # Sec 6.5: ρ > 3/4 → λ ← ω₁λ
RHO_LOW = 0.25  # Sec 6.5: ρ < 1/4 → λ ← λ/ω₁
NU_INIT = 2.0  # Nielsen: the first rejection doubles λ


def levenberg_marquardt(lambda_: float, rho: float, omega1: float, *, lo: float = 0.0, hi: float = math.inf) -> float:
    """Sec 6.5: ρ > 3/4 → λ ← ω₁λ; ρ < 1/4 → λ ← λ/ω₁; otherwise unchanged (clamped to [lo, hi])."""
    if rho > RHO_HIGH:
        return min(max(lambda_ * omega1, lo), hi)
    if rho < RHO_LOW:
        return max(min(lambda_ / omega1, hi), lo)
    return min(max(lambda_, lo), hi)


def rejection_increase(lambda_: float, nu: float, *, omega1: float, hi: float = math.inf) -> tuple[float, float]:
    """λ and ν after a rejected step (Nielsen's rule): λ ← max(ν, 1/ω₁)·λ, ν ← 2ν (λ ≤ hi)."""
    return min(lambda_ * max(nu, 1.0 / omega1), hi), 2.0 * nu


def gamma_candidates(gamma: float, omega2: float, *, lo: float, hi: float) -> list[float]:
    """Sec 6.6: [γ, ω₂γ, γ/ω₂] clamped to [lo, hi] (the current value first)."""
    return [gamma, max(gamma * omega2, lo), min(gamma / omega2, hi)]


def accept(rho: float, *, rho_min: float) -> bool:
    """The trust-region acceptance test (Nocedal & Wright, Algorithm 4.1, with η = ``rho_min`` ≥ 0):
    accept when ρ ≥ rho_min. As M(δ) − M(0) < 0, ρ ≥ 0 means the objective did not rise.
    A non-finite ρ is never accepted."""
    return math.isfinite(rho) and rho >= rho_min


# ---------------------------------------------------------------- the same rules on 0-d device tensors
# The sync-free step (optimizer.KFAC) keeps λ, ν and ρ on the device and applies these with
# ``torch.where``: the host never reads them on ordinary iterations. Each mirrors its host twin
# above exactly (same comparisons, same clamps, NaN ρ treated the same way).

def levenberg_marquardt_t(lambda_: torch.Tensor, rho: torch.Tensor, omega1: float, *, lo: float = 0.0,
                          hi: float = math.inf) -> torch.Tensor:
    """:func:`levenberg_marquardt` on 0-d tensors (a NaN ρ leaves λ unchanged, clamped)."""
    up = (lambda_ * omega1).clamp(lo, hi)
    down = (lambda_ / omega1).clamp(lo, hi)
    return torch.where(rho > RHO_HIGH, up, torch.where(rho < RHO_LOW, down, lambda_.clamp(lo, hi)))


def rejection_increase_t(lambda_: torch.Tensor, nu: torch.Tensor, *, omega1: float,
                         hi: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rejection_increase` on 0-d tensors."""
    return (lambda_ * nu.clamp_min(1.0 / omega1)).clamp_max(hi), 2.0 * nu


def accept_t(rho: torch.Tensor, *, rho_min: float) -> torch.Tensor:
    """:func:`accept` on a 0-d tensor: a bool tensor, False for a non-finite ρ."""
    return torch.isfinite(rho) & (rho >= rho_min)


# ---------------------------------------------------------------- the whole decision of one step
REJECT_CODES = {0: "kept", 1: "non-finite loss", 2: "non-finite statistics", 3: "non-finite update δ", 4: "ρ",
                5: "non-finite loss after the update"}


def step_decision(h: torch.Tensor, h_new: torch.Tensor, M: torch.Tensor, valid: torch.Tensor, ok_pre: torch.Tensor,
                  lam: torch.Tensor, nu: torch.Tensor, rejections: torch.Tensor, total: torch.Tensor,
                  unreported: torch.Tensor, *, measure: bool, lm_due: bool, held_out: bool, reject_steps: bool,
                  rescale: bool, rho_min: float, omega1: float, lambda_min: float, lambda_max: float) -> tuple:
    """Every scalar decision of one iteration (Sec 6.5 and the rejection of :mod:`kfac_fast.rules`)
    as a pure function of 0-d tensors: no host read, no graph break (``KFAC(compile=True)``
    compiles it with ``fullgraph=True``, one variant per schedule case).

    Args:
        h: the objective before the step (on the ρ rows where ρ uses a subset); h_new: after it
            (ignored unless ``measure``); M: M(δ) − M(0); valid: h and the statistics finite;
            ok_pre: ``valid`` and δ finite; lam, nu, rejections, total, unreported: the state.
        measure: ρ was measured this iteration; lm_due: the LM rule is due (k ≡ 0 mod T1);
            held_out: ρ is judged on the next batch (the counters wait for it).

    Returns:
        (code, ρ, λ, ν, rejections, total, unreported): ``code`` 0 for a kept step, else the
        cause (:data:`REJECT_CODES`); ρ NaN where not measured or M(δ) ≥ 0.
    """
    M_ok = torch.isfinite(M) & (M < 0)
    code = torch.where(torch.isfinite(h), torch.where(valid, 0, 2), 1)
    code = torch.where(ok_pre | (code != 0), code, 3)
    nan = torch.full_like(M, math.nan)
    rho = nan
    if measure:
        rho = torch.where(M_ok, (h_new - h) / M, nan)
        if reject_steps:
            code = torch.where((code == 0) & M_ok & ~accept_t(rho, rho_min=rho_min), 4, code)
        code = torch.where((code == 0) & ~torch.isfinite(h_new), 5, code)
    reject = code != 0
    if rescale:
        kept = lam
        if measure and lm_due:
            kept = torch.where(~reject & M_ok, levenberg_marquardt_t(lam, rho, omega1, lo=lambda_min, hi=lambda_max),
                               lam)
        lam_up, nu_up = rejection_increase_t(lam, nu, omega1=omega1, hi=lambda_max)
        lam = torch.where(reject, lam_up, kept)
        nu = torch.where(reject, nu_up, nu if held_out else torch.full_like(nu, NU_INIT))
    rejections = torch.where(reject, rejections + 1, rejections if held_out else torch.zeros_like(rejections))
    total = total + reject.long()
    unreported = unreported + (reject & (code != 4)).long()
    return code, rho, lam, nu, rejections, total, unreported
