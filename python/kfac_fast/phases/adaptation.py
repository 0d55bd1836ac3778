"""The adaptation of λ (Sec 6.5) and γ (Sec 6.6) and the rejection of bad steps, host and device forms together.

:class:`Adaptation` owns the state these rules update and nothing else: λ, Nielsen's ν, the
consecutive/total/unreported rejection counts and the δ₀ flag on the device
(:class:`kfac_fast.step_state.AdaptState`), γ on the host (it changes only on refresh iterations,
or by the LM rule without re-scaling, where the inverse is rebuilt anyway), and an upper bound on
the consecutive rejections the host has not read yet.

Each rule appears in two forms side by side: the device form (:meth:`Adaptation.decide`, one
:func:`kfac_fast.rules.step_decision` per schedule case, ``torch.where`` selections, no host read)
used by the sync-free step, and its host twin (:meth:`reject_on_host`, :meth:`after_reject_on_host`,
:meth:`adapt_gamma`, :meth:`accept_held_out`) used where the host decides anyway
(``rho_batch="next"``, ``rescale=False``). The pure functions behind both live in
:mod:`kfac_fast.rules`. Composition: ``KFAC`` holds one ``Adaptation`` and forwards its
``lambda_``, ``nu``, ``gamma`` and rejection counts to it.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch

from ..config import KFACConfig
from ..rules import (NU_INIT, REJECT_CODES, gamma_candidates, levenberg_marquardt, levenberg_marquardt_t,
                     rejection_increase, rejection_increase_t, step_decision)
from ..step_state import AdaptState, StepStats

__all__ = ["Adaptation", "StepRejected"]


class StepRejected(RuntimeError):
    """Raised after ``max_rejections`` consecutive rejected steps (non-finite loss or update, or
    ρ below ``rho_min``)."""


class Adaptation:
    """λ, ν, γ and the rejection bookkeeping of Algorithm 2 (Sec 6.5, 6.6; Nielsen's increase).

    Args:
        config: the optimizer's :class:`KFACConfig` (``KFAC`` replaces it here when its own is
            replaced); λ, γ and their clamps, ω₁, ω₂, T2, ``rho_min`` and ``max_rejections``
            are read from it.
        device: where λ, ν and the counters live (the model's device).
        compile: run :func:`kfac_fast.rules.step_decision` under ``torch.compile(fullgraph=True)``.

    Attributes:
        state: :class:`AdaptState`, 0-d device tensors.
        gamma: γ (float, host).
        unread_bound: an upper bound on the consecutive rejections the host has not read; the
            device count is read (one transfer) only when it reaches ``max_rejections``, or on
            refresh iterations.
    """

    def __init__(self, config: KFACConfig, *, device: torch.device, compile: bool = False):
        self.config = config
        self.state = AdaptState(lam=config.lambda_init, nu=NU_INIT, device=device)
        self.gamma = (float(config.gamma_init) if config.gamma_init is not None
                      else math.sqrt(config.lambda_init + config.weight_decay))
        self.compile = bool(compile)
        self.unread_bound = 0
        self._decisions: dict = {}

    @property
    def lambda_(self) -> float:
        """λ on the host (one transfer)."""
        return float(self.state.lam)

    # ------------------------------------------------------------------ γ candidates (Sec 6.6)
    def candidates(self, k: int) -> list[float]:
        """The γ values to try at iteration k: every T2 iterations γ, ω₂γ, γ/ω₂ (clamped), else γ.

        The greedy rule compares candidates by the exact-Fisher M; without re-scaling the only
        model is K-FAC's own, whose predicted decrease always favours the smallest γ: off."""
        cfg = self.config
        if cfg.adapt_gamma and cfg.rescale and k % cfg.T2 == 0:
            return gamma_candidates(self.gamma, cfg.omega2, lo=cfg.gamma_min, hi=cfg.gamma_max)
        return [self.gamma]

    # ------------------------------------------------------------------ device form: the whole decision
    def decision(self, measure: bool, lm_due: bool, held_out: bool):
        """:func:`kfac_fast.rules.step_decision` for this schedule case, compiled with
        ``fullgraph=True`` under ``compile=True`` (one compiled variant per case, cached)."""
        key = (measure, lm_due, held_out)
        fn = self._decisions.get(key)
        if fn is None:
            cfg = self.config
            fn = functools.partial(step_decision, measure=measure, lm_due=lm_due, held_out=held_out,
                                   reject_steps=cfg.reject_steps, rescale=cfg.rescale, rho_min=cfg.rho_min,
                                   omega1=cfg.omega1, lambda_min=cfg.lambda_min, lambda_max=cfg.lambda_max)
            if self.compile:
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            self._decisions[key] = fn
        return fn

    def decide(self, h: torch.Tensor, h_new: torch.Tensor, M: torch.Tensor, valid: torch.Tensor,
               ok_pre: torch.Tensor, *, measure: bool, lm_due: bool, held_out: bool):
        """Apply this iteration's decision to the state on the device; returns (code, ρ), 0-d
        tensors (code 0 for a kept step, else :data:`kfac_fast.rules.REJECT_CODES`)."""
        st = self.state
        code, rho, st.lam, st.nu, st.rejections, st.total_rejections, st.unreported = self.decision(
            measure, lm_due, held_out)(h, h_new, M, valid, ok_pre, st.lam, st.nu,
                                       st.rejections, st.total_rejections, st.unreported)
        return code, rho

    def reason(self, code: int, flags: torch.Tensor, names: list, rho, h, h_new) -> Optional[str]:
        """The words for a rejection code (read lazily, from the host values)."""
        if not code:
            return None
        if code == 2:
            fl = flags.tolist()
            bad = names[fl.index(False)] if False in fl else "statistics"
            return f"non-finite {bad} in the sampled-target pass"
        if code == 3:
            return "non-finite update δ"
        if code == 4:
            return (f"ρ = {float(rho):.3g} < {self.config.rho_min:g} (objective {float(h):.6g} -> "
                    f"{float(h_new):.6g})")
        return REJECT_CODES[code]

    # ------------------------------------------------------------------ host forms
    def reject_on_host(self, stats: StepStats) -> None:
        """A rejection the host decided: λ (or γ without re-scaling) raised by Nielsen's rule,
        the counters advanced and δ₀ dropped."""
        cfg, st = self.config, self.state
        if cfg.rescale:
            st.lam, st.nu = rejection_increase_t(st.lam, st.nu, omega1=cfg.omega1, hi=cfg.lambda_max)
        else:
            self.after_reject_on_host(stats)
        st.rejections += 1
        st.total_rejections += 1
        st.has_delta0.fill_(False)

    def after_reject_on_host(self, stats: StepStats) -> None:
        """Without re-scaling Nielsen's rule raises γ (host), not λ."""
        cfg, st = self.config, self.state
        if not cfg.rescale:
            g2, nu = rejection_increase(self.gamma ** 2, float(st.nu), omega1=cfg.omega1, hi=cfg.gamma_max ** 2)
            self.gamma = math.sqrt(g2)
            st.set("nu", nu)
            stats["gamma"] = self.gamma

    def adapt_gamma(self, rho: float) -> None:
        """Without re-scaling there is no exact-Fisher model for λ to damp, so the LM rule of
        Sec 6.5 adapts γ² (ρ then compares with K-FAC's own model)."""
        cfg = self.config
        g2 = levenberg_marquardt(self.gamma ** 2, rho, cfg.omega1, lo=cfg.gamma_min ** 2, hi=cfg.gamma_max ** 2)
        self.gamma = math.sqrt(g2)
        self.state.set("nu", NU_INIT)

    def accept_held_out(self, rho: float, *, lm_due: bool, device: torch.device) -> None:
        """``rho_batch="next"``: the previous step was kept with the host's ρ: counters and ν
        reset, and λ (γ without re-scaling) by the LM rule where it was due."""
        cfg, st = self.config, self.state
        st.rejections.zero_()
        st.set("nu", NU_INIT)
        self.unread_bound = 0
        if lm_due:
            if cfg.rescale:
                st.lam = levenberg_marquardt_t(st.lam, torch.tensor(rho, dtype=torch.float64, device=device),
                                               cfg.omega1, lo=cfg.lambda_min, hi=cfg.lambda_max)
            else:
                self.adapt_gamma(rho)

    def check_rejections(self, k: int, last: Optional[str] = None, *, force: bool = False,
                         last_stats: Optional[StepStats] = None) -> None:
        """Read the consecutive rejections (one transfer) when they could have reached
        ``max_rejections``, or with ``force``; warn about unreported non-finite rejections (up to
        iteration ``k`` − 1) and raise :class:`StepRejected` at the limit."""
        self.unread_bound += 0 if force else 1
        if not force and self.unread_bound < self.config.max_rejections:
            return
        st = self.state
        rej, unrep = torch.stack([st.rejections, st.unreported]).tolist()
        self.unread_bound = rej
        if last is None and last_stats is not None and rej:
            last = last_stats.get("reason")
        if unrep:
            st.unreported.zero_()
            if not force:
                warnings.warn(f"K-FAC rejected {unrep} step(s) for non-finite numbers up to iteration {k - 1} "
                              f"(last cause: {last}); λ is now {self.lambda_:.3g}", RuntimeWarning)
        if rej >= self.config.max_rejections:
            raise StepRejected(f"{rej} consecutive K-FAC steps rejected; last cause: {last}. "
                               "Check the data and the model for overflow, lower the learning problem's scale, or "
                               "raise lambda_init")
