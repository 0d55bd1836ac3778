"""Prototype: eigenvalue-corrected K-FAC directions ("Adam in the Kronecker eigenbasis") raced
against the preconditioner's default direction.

The rule (George et al. 2018, EKFAC, Sec 3; the second-moment scaling of SOAP, Vyas et al. 2024,
Algorithm 1, with K-FAC's own running factors as the bases), per dense Kronecker block (2-D Ā
(a, a) and G (g, g), not tied, not grouped):

  * at each inverse refresh: Q_A, Q_G = eigenvectors of the running Ā and G;
  * every step, with V the block's (g, a) gradient matrix:
        Ṽ = Q_Gᵀ V Q_A                                   (g, a)
        s ← β₂ s + (1 − β₂) Ṽ ⊙ Ṽ,  ŝ = s / (1 − β₂ᵗ)    (g, a), Adam's bias correction
        u = Q_G (Ṽ / (sqrt(ŝ) + ε)) Q_Aᵀ                 (g, a)
  * every other block (diagonal factors, norm blocks, tied pairs, grouped convolutions) keeps
    the damped Kronecker inverse.

The step-size rule (Graft by default) and the user's optimizer act on u as on F̆⁻¹∇. s is kept
across refreshes of the bases (SOAP does), or rotated into the new basis with ``rotate=1``:
s ← (R_G ⊙ R_G)ᵀ s (R_A ⊙ R_A), R = Q_oldᵀ Q_new (exact for a diagonal second moment).

Runs ``race.py`` with ``kfac_fast.KFACPreconditioner`` replaced by :class:`EigenbasisPreconditioner`,
so that method strings carry the keywords through race.py's per-method overrides:

    PYTHONPATH=python python benchmarks/bench_eigenbasis.py --tasks lm --budget 30 --seeds 0,1 --evals 40 \
        --methods adamw,kfac-pre-adamw,kfac-pre-adamw:graft+eigenbasis=1,kfac-pre-sgd:graft+eigenbasis=1 \
        --out /tmp/eig_race --tag _eigenbasis

Keywords: ``eigenbasis`` (1 on, 0 off), ``beta2`` (0.95), ``eig_eps`` (1e-8), ``rotate`` (0),
``scale`` (1: a factor on every block's direction after the step-size rule, for the raw direction
``:none`` under SGD, whose entries are about 1 in size: ``scale=0.01`` at SGD's lr 0.03 and
momentum 0.9 gives steps of about AdamW's lr 0.003 per coordinate, the SOAP-like configuration
of Adam's second moment in the eigenbasis with plain momentum outside); ``power`` (0.5: the
denominator sqrt(ŝ), as Adam and SOAP; 1: ŝ itself, EKFAC's rescaling of the eigenbasis by the
second moment, with the minibatch gradient's second moment in place of EKFAC's per-example one)
and ``rel_damping`` (0: a damping of ``rel_damping`` times the block's mean denominator added to
it, EKFAC's damping on the scale of the block).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kfac_fast  # noqa: E402
from kfac_fast.curvature._eigen import eigendecompose  # noqa: E402
from kfac_fast.curvature.compute_dtype import autocast_off  # noqa: E402
from kfac_fast.curvature.factors import KroneckerFactors  # noqa: E402
from kfac_fast.step_size import apply_step_size  # noqa: E402

_Base = kfac_fast.KFACPreconditioner


def dense_kron(f) -> bool:
    """A dense Kronecker block: 2-D Ā and G, not one of a tied pair."""
    return isinstance(f, KroneckerFactors) and f.dense and not f.tied


class EigenbasisPreconditioner(_Base):
    """KFACPreconditioner whose dense Kronecker blocks take the eigenvalue-corrected direction."""

    def __init__(self, model, *, eigenbasis: int = 0, beta2: float = 0.95, eig_eps: float = 1e-8,
                 rotate: int = 0, scale: float = 1.0, power: float = 0.5, rel_damping: float = 0.0, **kwargs):
        super().__init__(model, **kwargs)
        self.eigenbasis = bool(eigenbasis)
        self.beta2, self.eig_eps, self.rotate = float(beta2), float(eig_eps), bool(rotate)
        self.scale, self.power, self.rel_damping = float(scale), float(power), float(rel_damping)
        self._basis_of = None  # the inverse object the bases were computed from
        self.bases: dict = {}  # block index -> FactorEig
        self._record_of: dict = {}  # block index -> the factor record its basis came from
        self.second: dict = {}  # block index -> s (g, a)
        self.t = 0

    def _update(self, stats) -> None:
        super()._update(stats)
        if self.eigenbasis and self.inverse is not self._basis_of:
            self._refresh_bases()

    def _refresh_bases(self) -> None:
        # only the blocks whose inverse was rebuilt (the warm-up refreshes at k = 2, 3 rebuild the
        # small blocks only and keep the other records, the same objects)
        recs = self.inverse.records
        idx = [i for i, f in enumerate(recs) if dense_kron(f) and self._record_of.get(i) is not f]
        if not idx:
            self._basis_of = self.inverse
            return
        prev = [self.bases[i] for i in idx] if all(i in self.bases for i in idx) else None
        with autocast_off():
            eigs, _ = eigendecompose([recs[i] for i in idx], backend=self.backend, warm_start=prev)
        for i in idx:
            self._record_of[i] = recs[i]
        for i, e in zip(idx, eigs):
            old = self.bases.get(i)
            if self.rotate and old is not None and i in self.second:
                RA = old.QA.t() @ e.QA
                RG = old.QG.t() @ e.QG
                self.second[i] = (RG * RG).t() @ self.second[i] @ (RA * RA)
            self.bases[i] = e
        self._basis_of = self.inverse

    def _precondition(self, grads: list) -> None:
        if not self.eigenbasis:
            return super()._precondition(grads)
        inv = self.inverse
        dt = self.factor_dtype
        gs = [g.to(dt) for g in grads]
        kron, inv.kron = inv.kron, None  # the damped inverse for the other blocks only
        try:
            U = inv.apply(gs)
        finally:
            inv.kron = kron
        self.t += 1
        b2 = self.beta2
        bc = 1.0 - b2 ** self.t
        with autocast_off():
            for i, e in self.bases.items():
                Vt = e.QG.t() @ gs[i] @ e.QA
                s = self.second.get(i)
                if s is None:
                    s = self.second[i] = torch.zeros_like(Vt)
                s.mul_(b2).addcmul_(Vt, Vt, value=1.0 - b2)
                d = (s / bc).sqrt() if self.power == 0.5 else (s / bc).pow(self.power)
                if self.rel_damping:
                    d = d + self.rel_damping * d.mean()
                U[i] = e.QG @ (Vt / (d + self.eig_eps)) @ e.QA.t()
        U = apply_step_size(self.step_size, grads, U)
        if self.scale != 1.0:
            U = [u * self.scale for u in U]
        self._write_grads(U)


def main(argv: Optional[list] = None):
    import race

    kfac_fast.KFACPreconditioner = EigenbasisPreconditioner
    return race.main(argv)


if __name__ == "__main__":
    main()
