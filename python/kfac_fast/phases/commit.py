"""Steps 7-8 of Algorithm 2: θ ← θ + δ, ρ and the acceptance of the step (Sec 6.5), and the
held-out check of ``rho_batch="next"``.

``CommitPhase`` is a mixin of :class:`kfac_fast.optimizer.KFAC`: committing writes the model's θ,
δ₀, the running factors, the inverse, γ and k, the whole state the other phases read. The rules it
applies (the device decision and its host twins) belong to :class:`kfac_fast.phases.adaptation.Adaptation`
(``adapt``); this phase saves θ, measures h(θ + δ) and selects what stays. It reads ``config``,
``layers``, ``dist``, ``device``, ``profile``, ``_phases`` and the helpers ``_objective``,
``_add``, ``_restore``, ``_update_factors``, ``_phase``, ``_lr`` of ``KFAC``; besides the state above it
writes ``_pending`` (``rho_batch="next"``) and ``_last_stats``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..batch import select
from ..rules import accept
from ..step_state import StepStats
from .proposal import Proposal

__all__ = ["CommitPhase"]


class CommitPhase:
    """Steps 7-8: θ ← θ + δ, kept or undone by the device decision (or the host's, where it reads)."""

    def _commit(self, inputs, targets: torch.Tensor, h: torch.Tensor, best: "Proposal", stats: StepStats,
                rho_rows, valid: torch.Tensor, flags, refresh: bool, batch_stats=None) -> StepStats:
        """Steps 7-8: θ ← θ + δ; ρ every iteration with reject_steps (else every T1, Sec 6.5)
        decides whether the step stays. Every decision is a device selection: a rejected step
        selects the saved θ (``torch.where``), zero δ₀ and Nielsen's λ; the factors were already
        kept clean by ``valid``. The inverse and γ are committed either way (computed at θ_k).

        On ordinary iterations the factor update happens here (``batch_stats``), after δ, so that
        a non-finite δ keeps the statistics out as well; on refresh iterations it happened before
        the inverse refresh and the host decides whether to keep it."""
        cfg, k, st = self.config, self.k, self.adapt.state
        M, gamma, inv, Delta, alpha, mu, norm2, lin = best
        use_mom = cfg.momentum and self._delta0 is not None and cfg.rescale
        delta = [d * alpha.to(d.dtype) for d in Delta]
        if use_mom:
            delta = [d + d0 * mu.to(d.dtype) for d, d0 in zip(delta, self._delta0)]
        lr = self._lr()
        if lr != 1.0:
            # the param group's lr (a scheduler's) multiplies the final step; ρ compares the
            # objective's change with the model's prediction for that step, M(lr·δ)
            delta = [d * lr for d in delta]
            M = lr * lin + lr * lr * (M - lin)
            norm2 = norm2 * (lr * lr)
        # ‖δ‖² is finite iff δ is (an overflowing square is rejected too: conservative)
        ok_pre = valid & torch.isfinite(norm2)
        zero = torch.zeros((), dtype=delta[0].dtype, device=self.device)
        delta = [torch.where(ok_pre, d, zero) for d in delta]  # a non-finite δ never reaches θ

        lm_due = cfg.adapt_lambda and k % cfg.T1 == 0
        wants_rho = cfg.reject_steps or lm_due
        held_out = wants_rho and cfg.rho_batch == "next"
        measure = wants_rho and not held_out
        # θ is saved only where the ρ forward (now or on the next batch) may reject the step
        theta = [[p.detach().clone() for p in l.params()] for l in self.layers] if wants_rho else None
        self._add(delta)
        self.gamma = gamma  # before the rules: without re-scaling the LM rule adapts γ itself
        h_new = None
        if measure:
            with self._phase("8 rho forward"):
                if rho_rows is None:
                    h_new = self._objective(inputs, targets)
                else:  # ρ on a random subset of rho_rows rows (an unbiased estimate of the batch's)
                    idx_r, h_r = rho_rows
                    h_new = self._objective(select(inputs, idx_r), targets.index_select(0, idx_r))
                    h = h_r
                if self.dist.world_size > 1:  # ½η‖θ‖² is the same on every rank
                    h_new = self.dist.reduce_scalars(h_new, op="mean")
        code, rho = self.adapt.decide(h, h if h_new is None else h_new, M, valid, ok_pre, measure=measure,
                                      lm_due=lm_due, held_out=held_out)
        if measure:
            stats["rho"] = rho
        else:
            rho = None
        reject = code != 0
        if theta is not None:
            self._select_params(reject, theta)
        accepted = ~reject
        st.has_delta0 = accepted
        # δ₀ ← δ, or 0 after a rejection: momentum restarts from the kept θ (Sec 7's δ₀ led to the
        # bad step); with δ₀ = 0 the 2×2 solve selects α alone (solve_alpha_mu_t)
        self._delta0 = [torch.where(accepted, d.detach(), zero) for d in delta]

        if batch_stats is not None:
            self._update_factors(batch_stats, ok_pre)
            self.factors.commit()
        elif bool(ok_pre):  # refresh iterations read the host anyway
            self.factors.commit()
        self.inverse = inv
        self.k += 1
        stats.update(rejected=reject, lambda_=st.lam, gamma=self.gamma, alpha=alpha, mu=mu, M=M,
                     inverse_fallbacks=self.inverse_fallbacks)
        fl, names = flags
        stats["reject_code"] = code  # 0 kept; 1 non-finite loss, 2 statistics, 3 update, 4 ρ, 5 loss after
        stats.set_lazy("reason", lambda d, fl=fl, names=names, rho=rho, h=h, h_new=h_new:
                       self.adapt.reason(d["reject_code"], fl, names, rho, h, h_new))
        if self.profile:
            stats["phases"] = dict(self._phases)
        self._last_stats = stats

        if not cfg.rescale or held_out:  # γ on the host / ρ on the next batch: decided here
            if bool(reject):
                self.adapt.after_reject_on_host(stats)
            else:
                if not cfg.rescale and measure and lm_due and bool(torch.isfinite(M) & (M < 0)):
                    self.adapt.adapt_gamma(float(rho))
                    stats["gamma"] = self.gamma
                if held_out:
                    self._pending = {"theta": theta, "M": float(M), "lm_due": lm_due}  # "next" reads the host anyway
            self._check_rejections(force=True)
        elif refresh:
            self._check_rejections(force=True)
            if bool(reject) and int(code) != 4:
                warnings.warn(f"K-FAC step {k} rejected ({stats['reason']}); λ raised to {self.lambda_:.3g}",
                              RuntimeWarning)
        else:
            self._check_rejections()
        return stats

    def _select_params(self, reject: torch.Tensor, saved: list[list[torch.Tensor]]) -> None:
        """θ ← where(reject, saved θ, θ): the rejection as a selection, bit for bit."""
        with torch.no_grad():
            for layer, ps in zip(self.layers, saved):
                for p, s in zip(layer.params(), ps):
                    p.copy_(torch.where(reject, s, p))
        torch.clear_autocast_cache()

    def _check_pending(self, inputs, targets: torch.Tensor, h_new: torch.Tensor, stats: StepStats):
        """rho_batch="next": ρ of the previous step δ_k on this batch, a sample the step was not
        fitted to: (h_B(θ_k + δ_k) − h_B(θ_k)) / M(δ_k). h_B(θ_k + δ_k) is this step's objective;
        h_B(θ_k) costs one forward pass with the saved θ_k (``torch.func.functional_call``).
        Returns the stats of a rejection (θ ← θ_k, nothing else done this call) or None. This mode
        reads ρ on the host every iteration."""
        cfg, pend = self.config, self._pending
        self._pending = None
        h_new_v = float(h_new)
        if not math.isfinite(h_new_v):  # the previous, unchecked step led here: undo it
            return self._host_rejection("non-finite loss after the previous step (undone)", stats,
                                        saved=pend["theta"])
        with self._phase("8 rho forward"):
            h_old = self._objective(inputs, targets, params=pend["theta"])
            if self.dist.world_size > 1:
                h_old = self.dist.reduce_scalars(h_old, op="mean")
            h_old = float(h_old)
        rho = (h_new_v - h_old) / float(pend["M"]) if math.isfinite(h_old) else float("nan")
        stats["rho"] = rho
        if cfg.reject_steps and not accept(rho, rho_min=cfg.rho_min):
            return self._host_rejection(f"the previous step: held-out ρ = {rho:.3g} < {cfg.rho_min:g} "
                                        f"(objective on this batch {h_old:.6g} -> {h_new_v:.6g}); θ restored", stats,
                                        saved=pend["theta"], warn=False)
        self.adapt.accept_held_out(rho, lm_due=pend["lm_due"], device=self.device)
        return None

    def _host_rejection(self, what: str, stats: StepStats, saved: Optional[list[list[torch.Tensor]]] = None,
                        warn: bool = True) -> StepStats:
        """A rejection the host decided (``rho_batch="next"``, ``rescale=False``): θ restored from
        ``saved`` where given, δ₀ dropped, λ (or γ without re-scaling) raised by Nielsen's rule."""
        if saved is not None:
            self._restore(saved)
        self.adapt.reject_on_host(stats)
        stats.update(rejected=True, reason=what, lambda_=self.adapt.state.lam.clone(), gamma=self.gamma)
        if warn:
            warnings.warn(f"K-FAC step {stats['k']} rejected ({what}); λ raised to {self.lambda_:.3g}", RuntimeWarning)
        self._check_rejections(what, force=True)
        return stats

    def _check_rejections(self, last: Optional[str] = None, *, force: bool = False) -> None:
        """:meth:`Adaptation.check_rejections` at this iteration (may raise ``StepRejected``)."""
        self.adapt.check_rejections(self.k, last, force=force, last_stats=self._last_stats)
