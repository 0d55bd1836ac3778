"""Factored Tikhonov damping (paper Sec 6.3, with γ of Sec 6.6).

(Ā ⊗ G + γ²I) is approximated by (Ā + π γ I) ⊗ (G + (γ/π) I), with π from the trace norm:
π = sqrt( (tr(Ā)/dim Ā) / (tr(G)/dim G) ), the ratio of the factors' average eigenvalues.
"""
from __future__ import annotations

import math
from typing import Union

import torch

PiSpec = Union[str, float]


def _pi_from_traces(ta: float, tg: float) -> float:
    """π = sqrt(ta / tg) from the factors' average eigenvalues; 1 when either is not positive."""
    if not (ta > 0 and tg > 0) or not math.isfinite(ta / tg):
        return 1.0
    return math.sqrt(ta / tg)


def pi_trace(A: torch.Tensor, G: torch.Tensor) -> float:
    """Trace-norm π of Sec 6.3. Falls back to 1 when either factor has zero trace."""
    return _pi_from_traces(float(torch.diagonal(A).sum()) / A.shape[0], float(torch.diagonal(G).sum()) / G.shape[0])


def resolve_pi(pi: PiSpec, A: torch.Tensor, G: torch.Tensor) -> float:
    if isinstance(pi, str):
        if pi != "trace":
            raise ValueError(f"pi must be 'trace' or a positive float, got {pi!r}")
        return pi_trace(A, G)
    pi = float(pi)
    if not (pi > 0 and math.isfinite(pi)):
        raise ValueError(f"pi must be a positive finite float, got {pi}")
    return pi


def resolve_pis(pi: PiSpec, factors) -> list[float]:
    """π for every layer's (A, G) pair; the trace rule moves all traces to the host in one sync."""
    factors = list(factors)
    if not isinstance(pi, str) or not factors:
        return [resolve_pi(pi, f.A, f.G) for f in factors]
    if pi != "trace":
        raise ValueError(f"pi must be 'trace' or a positive float, got {pi!r}")
    traces = torch.stack([torch.stack([torch.diagonal(f.A).sum().double() / f.A.shape[0],
                                       torch.diagonal(f.G).sum().double() / f.G.shape[0]])
                          for f in factors]).tolist()
    return [_pi_from_traces(ta, tg) for ta, tg in traces]


def check_damping(damping: float) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping (γ) must be a finite number >= 0, got {damping}")
    return damping


#: K of :func:`warmup_damping`, the default of ``KFACPreconditioner(damping_warmup=...)``
DEFAULT_DAMPING_WARMUP = 30


def warmup_damping(gamma: float, k: int, warmup: int) -> float:
    """γ_k = γ · max(1, K / k): the damping of an inverse built at iteration ``k`` under a damping
    warm-up of K = ``warmup`` iterations (0 or 1: γ throughout).

    The early factors are running averages over few statistics (Sec 5), noisy and, for a layer
    wider than the rows seen, of low rank: with a small γ their inverse amplifies the noise
    directions. Damping them more while they are young, and less as they fill in, plays the part
    that the adaptive γ of Sec 6.6 (which starts large and falls as the quadratic model proves
    accurate) plays in :class:`kfac_fast.KFAC`, for a preconditioner that has no exact-Fisher
    model to adapt it by."""
    if warmup <= 1:
        return float(gamma)
    return float(gamma) * max(1.0, warmup / max(int(k), 1))
