"""Eigendecompositions of the factors, shared by the block-diagonal and block-tridiagonal inverses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..linalg import eigh


@dataclass
class FactorEig:
    """Ā = Q_A diag(s_A) Q_Aᵀ and G = Q_G diag(s_G) Q_Gᵀ of one layer."""

    sA: torch.Tensor
    QA: torch.Tensor
    sG: torch.Tensor
    QG: torch.Tensor


def eigendecompose(factors, *, backend: str, warm_start: Optional[Sequence[FactorEig]] = None) -> list[FactorEig]:
    """Eigendecompose every A and G in one batched call (mixed sizes), warm-started if given."""
    mats = []
    for f in factors:
        mats += [0.5 * (f.A + f.A.t()), 0.5 * (f.G + f.G.t())]
    warm = None
    if warm_start is not None and len(warm_start) == len(factors):
        warm = []
        for e in warm_start:
            warm += [e.QA, e.QG]
        if any(w.shape != m.shape or w.dtype != m.dtype for w, m in zip(warm, mats)):
            warm = None
    r = eigh(mats, warm_start=warm, backend=backend)
    out = []
    for i in range(len(factors)):
        out.append(FactorEig(sA=r.eigenvalues[2 * i], QA=r.eigenvectors[2 * i],
                             sG=r.eigenvalues[2 * i + 1], QG=r.eigenvectors[2 * i + 1]))
    return out


def damped_spectrum(s: torch.Tensor, c: float, *, label: str) -> torch.Tensor:
    """s + c for a PSD factor's eigenvalues s; raises when the result is not positive.

    With c > 0, rounding-level negative eigenvalues are clipped to 0 first; with c == 0
    (no damping) a singular factor is an error, since its inverse does not exist.
    """
    if c > 0:
        return s.clamp_min(0) + c
    smax = float(s.abs().max()) if s.numel() else 0.0
    if s.numel() and float(s.min()) <= 1e-12 * max(smax, 1e-300):
        raise ValueError(
            f"{label} is singular or indefinite (smallest eigenvalue {float(s.min()):.3e}, largest {smax:.3e}) "
            "and damping is 0; use damping > 0"
        )
    return s


def inverse_from_eig(Q: torch.Tensor, d: torch.Tensor, power: float = -1.0) -> torch.Tensor:
    """Q diag(d^power) Qᵀ."""
    return (Q * d.pow(power)) @ Q.t()
