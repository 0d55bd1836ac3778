"""Steps 5-6 of Algorithm 2: the proposal Δ per γ candidate (Sec 6.6) and its re-scaling δ = αΔ + µδ₀
by the exact-Fisher quadratic model M on S₂ (Sec 6.4, 7, Appendix C).

``ProposalPhase`` is a mixin of :class:`kfac_fast.optimizer.KFAC`: S₂ draws from the optimizer's
generator, the Fisher-vector products run through its ``model`` and ``layers``, and momentum reads
its δ₀. It reads ``config``, ``model``, ``layers``, ``loss``, ``dist``, ``device``, ``adapt``
(λ and the γ candidates), ``_delta0``, ``k`` and the helpers ``_subset``, ``_examples_for``,
``_phase``. It writes ``_exact_model`` (``Tq > 1``: the last exact check's curvature quotients,
from which Γ is predicted between checks); the chosen :class:`Proposal` goes to the commit phase.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..batch import batch_size, select
from ..quadratic import fisher_gram, inner, solve_alpha_mu_t

__all__ = ["Proposal", "ProposalPhase"]


class Proposal(NamedTuple):
    """One γ candidate's outcome (Sec 6.6): M(δ) − M(0), γ, its inverse, Δ, α, µ, ‖δ‖² and
    ∇hᵀδ, the linear part of M (so that M(tδ) = t∇hᵀδ + t²(M(δ) − ∇hᵀδ) for a step scaled by t)."""

    M: float
    gamma: float
    inv: Any
    Delta: list
    alpha: float
    mu: float
    norm2: float
    lin: float


class ProposalPhase:
    """Steps 5-6: Δ = −F̆⁻¹∇h per γ candidate, α and µ from M, the candidate with the lowest M."""

    def _proposals(self, inputs, targets: torch.Tensor, base, V: list[torch.Tensor]) -> "Proposal":
        """Steps 5-6 per γ candidate (Sec 6.6: every T2 iterations γ, ω₂γ, γ/ω₂): the proposal
        Δ = −F̆⁻¹∇h (or F̂⁻¹∇h) and its re-scaling; returns the candidate with the lowest M.
        Only the γ choice reads the host (on T2 iterations, which are refresh iterations)."""
        cfg = self.config
        candidates = self.adapt.candidates(self.k)
        use_mom = cfg.momentum and self._delta0 is not None
        exact = self._exact_check_due(len(candidates), 1 + int(use_mom))
        if exact:
            idx2 = self._subset(batch_size(inputs), cfg.tau2, self._examples_for(cfg.tau2_min_rows))
            x2 = (select(inputs, idx2), targets.index_select(0, idx2))
        else:
            x2 = None
        props, curvatures = [], []
        for gamma in candidates:
            with self._phase("5 inverse refresh"):
                try:
                    inv = base if gamma == base.damping else base.with_damping(gamma)
                except ValueError:  # e.g. the tridiagonal Σ not positive definite at this γ: skip it
                    continue
            with self._phase("6 precondition"):
                Delta = [-u for u in inv.apply(V)]
            alpha, mu, M, norm2, lin, quotients = self._rescale(V, Delta, x2, use_mom)
            props.append(Proposal(M, gamma, inv, Delta, alpha, mu, norm2, lin))
            curvatures.append(quotients)
        best = 0
        if len(props) > 1:
            Ms = torch.stack([p.M for p in props]).tolist()  # the γ choice: one read, on T2 iterations only
            for i, M in enumerate(Ms):
                if math.isfinite(M) and (not math.isfinite(Ms[best]) or M < Ms[best]):
                    best = i
        if exact and cfg.rescale and cfg.Tq > 1:
            self._exact_model = curvatures[best]
        return props[best]

    def _exact_check_due(self, n_candidates: int, n_dirs: int) -> bool:
        """Whether this iteration measures the exact-Fisher quadratic forms (``Tq``): k ≡ 0
        (mod Tq), γ-candidate iterations (the γ choice compares exact M values, Sec 6.6), and
        whenever no stored quotients fit the directions (the first step; the first with δ₀).
        Without re-scaling there is no exact model to skip."""
        cfg = self.config
        stored = self._exact_model
        return (not cfg.rescale or cfg.Tq == 1 or stored is None or stored.shape[0] != n_dirs
                or n_candidates > 1 or self.k % cfg.Tq == 0)

    def _rescale(self, V: list[torch.Tensor], Delta: list[torch.Tensor], x2: tuple, use_mom: bool):
        """Step 6: α (and µ with momentum, Sec 7) minimising the exact-Fisher model M on S₂
        (Sec 6.4, Appendix C). Returns (α, µ, M(δ) − M(0), ‖δ‖²) with δ = αΔ + µδ₀, all 0-d
        float64 device tensors (the 2×2 solve is closed-form selections: no host sync), and
        ∇hᵀδ, M's linear part, and, on exact checks with ``Tq > 1``, the quotients Γ_ab/(‖d_a‖‖d_b‖)
        to store (else None). ``x2`` None (``Tq > 1``, between exact checks): Γ is predicted from
        the stored quotients, Γ_ab = q_ab‖d_a‖‖d_b‖, and the same solve runs on it."""
        cfg = self.config
        dirs = [Delta] + ([self._delta0] if use_mom else [])
        n = len(dirs)
        quotients = None
        if cfg.rescale:
            with self._phase("7 fisher quadratic"):
                dots = [[None] * n for _ in range(n)]
                for a in range(n):
                    for c in range(a, n):
                        dots[a][c] = dots[c][a] = inner(dirs[a], dirs[c])
                dots = torch.stack([torch.stack(row) for row in dots])
                scale = torch.sqrt(torch.diagonal(dots))
                outer = scale[:, None] * scale[None, :]
                if x2 is None:  # between exact checks (Tq > 1): Γ from the stored quotients
                    gram = self._exact_model * outer
                else:
                    gram = fisher_gram(self.model, self.layers, x2[0], self.loss, dirs, targets=x2[1])
                    if self.dist.world_size > 1:  # Γ on the union of the ranks' S₂ (equal sizes)
                        gram = self.dist.reduce_scalars(gram, op="mean")
                    if cfg.Tq > 1:
                        quotients = _curvature_quotients(gram, outer)
                b = torch.stack([inner(V, d) for d in dirs])
                alpha, mu, M = solve_alpha_mu_t(gram, dots, b, self.adapt.state.lam + cfg.weight_decay,
                                                mu_max=cfg.mu_max)
                coef = torch.stack([alpha, mu][:n])
                norm2 = coef @ dots @ coef  # ‖αΔ + µδ₀‖², from the same numbers
                lin = coef @ b
        else:
            # no exact-Fisher model: δ = Δ and M is K-FAC's own prediction, ½∇hᵀΔ (exact for
            # the damped approximate model, as Δ minimises it)
            one = torch.ones((), dtype=torch.float64, device=self.device)
            alpha, mu = one, torch.zeros_like(one)
            lin = inner(V, Delta)
            norm2, M = inner(Delta, Delta), 0.5 * lin
        return alpha, mu, M, norm2, lin, quotients


def _curvature_quotients(gram: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """(n, n) Γ_ab / (‖d_a‖‖d_b‖): the exact Fisher's curvature along the unit directions of Δ
    and δ₀ (Rayleigh quotients on the diagonal). Where a direction is zero (δ₀ after a rejected
    step) or a value is not finite: 0 off the diagonal, Δ's quotient on it (δ₀ then gets Δ's
    curvature, not none). A device tensor: no host read."""
    ok = (outer > 0) & torch.isfinite(gram)
    q = torch.where(ok, gram / torch.where(ok, outer, torch.ones_like(outer)), torch.zeros_like(gram))
    if q.shape[0] == 2:
        q[1, 1] = torch.where(ok[1, 1], q[1, 1], q[0, 0])
    return q
