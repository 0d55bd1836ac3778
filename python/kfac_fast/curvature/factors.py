"""The factor records: Kronecker factors Ā_{i,j} = E[ā_i ā_jᵀ] and G_{i,j} = E[g_i g_jᵀ] of a
block (paper Sec 3, 5) and the per-block Fisher of the small dense blocks, with their checks.

ā_{i-1} is layer i's input with the homogeneous coordinate LAST (when the layer has a bias);
g_i = ∂L(y, z)/∂s_i is the per-example derivative (not scaled by 1/m) with y drawn from the
MODEL's predictive distribution. Ā averages over its rows; G divides by N, the number of loss
terms (N = m for (m, k) outputs), see :mod:`kfac_fast.curvature.blocks.base`.

Diagonal factors. Either factor of a :class:`KroneckerFactors` may be a 1-D tensor: its
diagonal (diag Ā = the mean over the rows of ā∘ā, with the homogeneous coordinate's 1 last;
diag G = (1/N) Σ g∘g). The block is then still a Kronecker product, diag ⊗ dense (or diag ⊗
diag), with the same damping and inverse form (:mod:`.block_inverse`). A factor is diagonal
when its size exceeds the ``max_block_dim`` bound (:func:`diagonal_factor`), and the
Embedding's Ā is always (its ā are one-hot). Code reading records tests ``t.dim() == 1``.

Grouped factors. A grouped convolution's record (kind ``kronecker_grouped``) holds one
Kronecker product per group, batched: A (groups, a, a) and G (groups, g, g) (``t.dim() == 3``;
:attr:`KroneckerFactors.grouped`); its block matrix is (groups·g, a), group j's rows j·g …
(:mod:`.blocks.grouped_conv_kronecker`). It is a block-diagonal entry of either inverse kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class KroneckerFactors:
    """Factors of one layer i (shapes: A (a_i, a_i) or its diagonal (a_i,), G (g_i, g_i) or
    its diagonal (g_i,); see the module docstring).

    A = Ā_{i-1,i-1}, G = G_{i,i}. A grouped convolution's record has batched factors A
    (groups, a, a), G (groups, g, g), one Kronecker product per group (:attr:`grouped`). For the block-tridiagonal inverse also
    A_next = Ā_{i-1,i} (a_i, a_{i+1}) and G_next = G_{i,i+1} (g_i, g_{i+1}); None on the last
    layer and on any block with a diagonal factor (such a block is a block-diagonal entry).

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

    @property
    def dense(self) -> bool:
        """Whether both factors are dense matrices (a block of the chosen inverse kind)."""
        return self.A.dim() == 2 and self.G.dim() == 2

    @property
    def grouped(self) -> bool:
        """Whether the factors are batched per group (A (groups, a, a), G (groups, g, g))."""
        return self.A.dim() == 3 and self.G.dim() == 3


@dataclass
class BlockFisher:
    """The Fisher of a block that is not a Kronecker product: k small dense blocks of size b,
    ``F`` of shape (k, b, b) (b = 1: a diagonal). Kinds ``dense`` (norm scale-and-shift, per
    channel (weight, bias)) and ``diagonal`` (any other parameter, one entry per element)."""

    F: torch.Tensor
    name: str = ""
    kind: str = "dense"


def block_shape(f) -> tuple[int, int]:
    """The (g_dim, a_dim) block matrix shape of a record: (k, b) for a :class:`BlockFisher`,
    (groups·g, a) for grouped factors, (g, a) otherwise."""
    if isinstance(f, BlockFisher):
        return (f.F.shape[0], f.F.shape[1])
    if f.grouped:
        return (f.G.shape[0] * f.G.shape[1], f.A.shape[-1])
    return (f.G.shape[0], f.A.shape[0])


def check_max_block_dim(max_block_dim) -> "int | None":
    """Validate the factor-size bound: a positive int, or None (no bound)."""
    if max_block_dim is None:
        return None
    if isinstance(max_block_dim, bool) or not isinstance(max_block_dim, int) or max_block_dim < 1:
        raise ValueError(f"max_block_dim must be a positive integer (the largest factor kept dense) or None "
                         f"(no bound), got {max_block_dim!r}")
    return max_block_dim


def diagonal_factor(size: int, max_block_dim: "int | None") -> bool:
    """Whether a Kronecker factor of ``size`` × ``size`` is kept as its diagonal: its size exceeds
    the bound (None: never)."""
    return max_block_dim is not None and size > max_block_dim


def factor_like(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A saved factor for a record whose factor is ``like``: ``src``, or its diagonal where
    ``like`` is the diagonal (n,) of a dense (n, n) ``src`` (a checkpoint written without the
    ``max_block_dim`` bound)."""
    if like.dim() == 1 and src.dim() == 2 and tuple(src.shape) == (like.shape[0],) * 2:
        return torch.diagonal(src).clone()
    return src


def cross_factor_like(saved: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A saved cross factor (Ā_{i-1,i} or G_{i,i+1}) for a record whose cross factor is
    ``like``: zeros where a checkpoint written without the ``max_block_dim`` bound coupled a
    block the bound now makes diagonal (such a block is a block-diagonal entry, its neighbours
    unlinked), None where ``like`` is None."""
    if like is None:
        return None
    if saved is None or tuple(saved.shape) != tuple(like.shape):
        return torch.zeros_like(like)
    return saved.to(like.device)


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


#: The default bound on a dense Kronecker factor's size (``max_block_dim``): larger factors are
#: kept as their diagonals. 4096 keeps every factor of the paper's networks and of a width-≤4095
#: transformer dense and makes an LM head's vocabulary-sized G (32000-50257) and a
#: 3×3×512-input convolution's Ā (4609) diagonal (docs/measurements.md has the progress cost).
DEFAULT_MAX_BLOCK_DIM = 4096
