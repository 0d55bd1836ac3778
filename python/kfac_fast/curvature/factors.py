"""The factor records: Kronecker factors Ā_{i,j} = E[ā_i ā_jᵀ] and G_{i,j} = E[g_i g_jᵀ] of a
block (paper Sec 3, 5) and the per-block Fisher of the small dense blocks, with their checks.

ā_{i-1} is layer i's input with the homogeneous coordinate LAST (when the layer has a bias);
g_i = ∂L(y, z)/∂s_i is the per-example derivative (not scaled by 1/m) with y drawn from the
MODEL's predictive distribution. Ā averages over its rows; G divides by N, the number of loss
terms (N = m for (m, k) outputs), see :mod:`kfac_fast.curvature.blocks.base`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class KroneckerFactors:
    """Factors of one layer i (shapes: A (a_i, a_i), G (g_i, g_i)).

    A = Ā_{i-1,i-1}, G = G_{i,i}. For the block-tridiagonal inverse also
    A_next = Ā_{i-1,i} (a_i, a_{i+1}) and G_next = G_{i,i+1} (g_i, g_{i+1}); None on the last layer.

    Tied weights (:mod:`kfac_fast.curvature.blocks.tied`): the head's record has
    ``tied_partner`` = the index of the embedding's record in the same list (the inverse of its
    block is the Kronecker sum over both records), the embedding's has ``tied_owner`` = the
    head's index (its block matrix is zero); None otherwise.
    """

    A: torch.Tensor
    G: torch.Tensor
    A_next: Optional[torch.Tensor] = None
    G_next: Optional[torch.Tensor] = None
    name: str = ""
    homogeneous: bool = True
    tied_partner: Optional[int] = None
    tied_owner: Optional[int] = None

    @property
    def tied(self) -> bool:
        """Whether this record is one of a tied pair (a Kronecker-sum block, not a chain block)."""
        return self.tied_partner is not None or self.tied_owner is not None


@dataclass
class BlockFisher:
    """The Fisher of a block that is not a Kronecker product: k small dense blocks of size b,
    ``F`` of shape (k, b, b) (b = 1: a diagonal). Kinds ``dense`` (norm scale-and-shift, per
    channel (weight, bias)) and ``diagonal`` (any other parameter, one entry per element)."""

    F: torch.Tensor
    name: str = ""
    kind: str = "dense"


def record_to_dict(f) -> dict:
    """Detached copies of a factor record's tensors (checkpoints)."""
    if isinstance(f, BlockFisher):
        return {"F": f.F.detach().clone(), "kind": f.kind}
    return factors_to_dict(f)


def homogeneous_input(x: torch.Tensor, homogeneous: bool) -> torch.Tensor:
    """ā = [x, 1] (homogeneous coordinate last) as rows; x: (m, d) -> (m, d + 1)."""
    if not homogeneous:
        return x
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def check_factors(factors: Sequence[KroneckerFactors], *, tridiagonal: bool = False) -> None:
    """Validate shapes and finiteness; raise with the layer index/name and the fix."""
    if len(factors) == 0:
        raise ValueError("no factors given: the model has no supported layer")
    for i, f in enumerate(factors):
        label = f"layer {i}" + (f" ({f.name})" if f.name else "")
        for key in ("A", "G"):
            M = getattr(f, key)
            if M.dim() != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(f"{label}: factor {key} must be square, got shape {tuple(M.shape)}")
            if not bool(torch.isfinite(M).all()):
                raise ValueError(f"{label}: factor {key} contains NaN or inf; the activations or "
                                 "back-propagated derivatives that built it were non-finite")
        if tridiagonal and i + 1 < len(factors):
            nxt = factors[i + 1]
            for key, n_rows, n_cols in (("A_next", f.A.shape[0], nxt.A.shape[0]), ("G_next", f.G.shape[0], nxt.G.shape[0])):
                M = getattr(f, key)
                if M is None:
                    raise ValueError(f"{label}: {key} is missing; compute factors with tridiagonal=True")
                if tuple(M.shape) != (n_rows, n_cols):
                    raise ValueError(f"{label}: {key} must have shape ({n_rows}, {n_cols}), got {tuple(M.shape)}")
                if not bool(torch.isfinite(M).all()):
                    raise ValueError(f"{label}: cross factor {key} contains NaN or inf")


def factors_to_dict(f: KroneckerFactors) -> dict:
    """Detached copies of A, G, A_next, G_next (None where absent), for checkpoints."""
    return {k: (None if getattr(f, k) is None else getattr(f, k).detach().clone())
            for k in ("A", "G", "A_next", "G_next")}
