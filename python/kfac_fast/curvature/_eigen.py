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


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def eigendecompose(factors, *, backend: str, warm_start: Optional[Sequence[FactorEig]] = None
                   ) -> tuple[list[FactorEig], list[str]]:
    """Eigendecompose every A and G in one batched call (mixed sizes), warm-started if given.

    A matrix whose eigendecomposition fails or comes back non-finite is retried in float64
    (plain LAPACK); if that fails too, that factor keeps its previous eigendecomposition from
    ``warm_start`` (the last good inverse). Returns (per-layer eigendecompositions, the list of
    factors that fell back, e.g. ``["model.3: G"]``). Raises ValueError when a factor fails and
    there is nothing to fall back to.
    """
    mats = []
    for f in factors:
        mats += [0.5 * (f.A + f.A.t()), 0.5 * (f.G + f.G.t())]
    prev = None
    if warm_start is not None and len(warm_start) == len(factors):
        prev = []
        for e in warm_start:
            prev += [(e.sA, e.QA), (e.sG, e.QG)]
        if any(q.shape != m.shape for (_, q), m in zip(prev, mats)):
            prev = None
    warm = None if prev is None else [q.to(m.dtype) for (_, q), m in zip(prev, mats)]
    try:
        r = eigh(mats, warm_start=warm, backend=backend)
        vals, vecs = list(r.eigenvalues), list(r.eigenvectors)
    except (RuntimeError, ValueError):
        vals, vecs = [None] * len(mats), [None] * len(mats)
    failures: list[str] = []
    for j, M in enumerate(mats):
        if vals[j] is not None and _finite(vals[j], vecs[j]):
            continue
        label = f"{factors[j // 2].name or f'layer {j // 2}'}: {'A' if j % 2 == 0 else 'G'}"
        cause = "non-finite result" if vals[j] is not None else "solver error"
        try:
            w, q = torch.linalg.eigh(M.double())
            if not _finite(w, q):
                raise RuntimeError("non-finite result in float64")
            vals[j], vecs[j] = w.to(M.dtype), q.to(M.dtype)
            continue
        except (RuntimeError, ValueError) as exc:
            cause = f"{cause}; float64 retry: {exc}"
        if prev is None:
            raise ValueError(f"eigendecomposition of factor {label} failed ({cause}) and there is no previous "
                             "inverse to fall back to; check the factor for NaN/inf or extreme values")
        vals[j], vecs[j] = prev[j][0].to(M.dtype), prev[j][1].to(M.dtype)
        failures.append(label)
    out = []
    for i in range(len(factors)):
        out.append(FactorEig(sA=vals[2 * i], QA=vecs[2 * i], sG=vals[2 * i + 1], QG=vecs[2 * i + 1]))
    return out, failures


def factor_eigs(factors, *, backend: str, warm_start=None, eig=None) -> tuple[list[FactorEig], list[str]]:
    """Eigendecompositions for an inverse: given ones (``eig``) or computed, warm-started from
    ``warm_start`` (a previous inverse object or its ``eig`` list). Returns (eig, fallbacks)."""
    if eig is not None:
        return eig, []
    if warm_start is not None and hasattr(warm_start, "eig"):
        warm_start = warm_start.eig
    return eigendecompose(factors, backend=backend, warm_start=warm_start)


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
