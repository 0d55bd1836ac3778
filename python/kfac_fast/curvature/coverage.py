"""Which trainable parameters K-FAC models how: per block (and per parameter no block takes) its
kind, its parameter count and, for what is diagonal or skipped, why; and the fraction of the
trainable parameters in Kronecker blocks (Sec 3's approximation covers only those: the rest get a
diagonal (``unsupported="diagonal"``) or no curvature at all (``"skip"``)). A Kronecker block
whose Ā or G exceeds ``max_block_dim`` keeps that factor as its diagonal (still a Kronecker
product, diag ⊗ dense): its entry says which factor and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from .blocks import DENSE, DIAGONAL, KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED, CurvatureBlock, ScaleShiftBlock
from .blocks.registry import why_unmodelled
from .blocks.tied import TiedEmbeddingBlock, TiedHeadBlock
from .factors import diagonal_factor

KINDS = ("kronecker", "kronecker_sum", "scale-shift", "dense", "diagonal", "skipped")
#: the kinds that are Kronecker approximations (``kronecker_sum``: a tied weight, the sum of its
#: two uses' Kronecker products, :mod:`.blocks.tied`)
KRONECKER_KINDS = ("kronecker", "kronecker_sum")


@dataclass(frozen=True)
class CoverageEntry:
    """One block, or one trainable parameter no block holds (``kind="skipped"``).

    ``name``: the block's name (a module path; ``….in_proj`` / ``….out_proj`` for attention;
    ``head + embedding`` for a tied pair, one entry holding the shared weight once) or the
    parameter's; ``kind``: one of ``KINDS``; ``params``: its number of scalar parameters;
    ``reason``: for ``diagonal`` / ``skipped``, why no Kronecker or norm block models it; for
    ``kronecker``, which factor is kept diagonal and why (the ``max_block_dim`` bound), else None."""

    name: str
    kind: str
    params: int
    reason: Optional[str] = None


@dataclass(frozen=True)
class Coverage:
    """Entries in block order (skipped parameters last) and the totals."""

    entries: list = field(default_factory=list)

    @property
    def trainable(self) -> int:
        """Trainable parameters (each shared parameter counted once)."""
        return sum(e.params for e in self.entries)

    def count(self, kind: str) -> int:
        return sum(e.params for e in self.entries if e.kind == kind)

    @property
    def kronecker_fraction(self) -> float:
        """Fraction of the trainable parameters in Kronecker blocks, tied pairs' Kronecker sums
        included (1.0 for a model without any)."""
        return sum(map(self.count, KRONECKER_KINDS)) / self.trainable if self.trainable else 1.0

    def __str__(self) -> str:
        lines = [f"K-FAC coverage: {self.kronecker_fraction:.1%} of {self.trainable} trainable parameters in "
                 "Kronecker blocks"]
        for e in self.entries:
            lines.append(f"  {e.kind:<11} {e.params:>10}  {e.name}" + (f"  ({e.reason})" if e.reason else ""))
        return "\n".join(lines)


def _kind(block: CurvatureBlock) -> str:
    k = block.factor_kind
    if k in (KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED):  # grouped: one Kronecker product per group
        return "kronecker"
    if k == DENSE:
        return "scale-shift" if isinstance(block, ScaleShiftBlock) else "dense"
    if k == DIAGONAL:
        return "diagonal"
    raise ValueError(f"block {block.name}: unknown factor kind {k!r}")


def diagonal_factors_note(block: CurvatureBlock, max_block_dim: Optional[int]) -> Optional[str]:
    """Which factor of a Kronecker block the bound makes diagonal, e.g. ``"G diagonal: 50257 >
    max_block_dim=4096"``; None when both factors stay as they are (the Embedding's Ā is
    diagonal by construction, not by the bound)."""
    if block.factor_kind not in (KRONECKER, KRONECKER_DIAG_A):
        return None
    parts = []
    if block.factor_kind == KRONECKER and diagonal_factor(block.a_dim, max_block_dim):
        parts.append(f"Ā diagonal: {block.a_dim} > max_block_dim={max_block_dim}")
    if diagonal_factor(block.g_dim, max_block_dim):
        parts.append(f"G diagonal: {block.g_dim} > max_block_dim={max_block_dim}")
    return "; ".join(parts) or None


def coverage(model: nn.Module, blocks: Sequence[CurvatureBlock], *, model_name: str = "model",
             kfac_approx: str = "expand", max_block_dim: Optional[int] = None,
             tied_weights: str = "unsupported") -> Coverage:
    """How ``blocks`` (from :func:`~kfac_fast.curvature.blocks.find_blocks` on ``model`` with the
    same ``model_name``) model the trainable parameters of ``model``.

    Returns a :class:`Coverage`: one entry per block (kind ``kronecker`` for Linear, Conv, Embedding,
    attention projections; ``kronecker_sum`` for an embedding tied to its output layer, one entry
    for the pair; ``scale-shift`` for norm layers; ``kronecker`` also for a grouped convolution
    with one Kronecker product per group; ``dense`` for a grouped convolution with small groups
    (the exact per-group Fisher, :mod:`.blocks.grouped_conv_kronecker` has the rule);
    ``diagonal`` with the reason its parameter has no Kronecker/norm block) and one ``skipped``
    entry per trainable parameter no block holds (``unsupported="skip"``), with the reason;
    ``kronecker_fraction`` the share of trainable parameters in Kronecker blocks. With
    ``max_block_dim`` a Kronecker block with a factor above it is still ``kronecker``, its
    ``reason`` naming the diagonal factor (:func:`diagonal_factors_note`).
    """
    reasons = why_unmodelled(model, model_name=model_name, kfac_approx=kfac_approx, tied_weights=tied_weights)
    name_of = {id(p): n for n, p in model.named_parameters()}
    entries, seen = [], set()
    for b in blocks:
        if isinstance(b, TiedEmbeddingBlock):
            continue  # reported with its owner, the head
        ps = [p for p in b.params() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        if isinstance(b, TiedHeadBlock):
            entries.append(CoverageEntry(f"{b.name} + {b.partner.name}", "kronecker_sum", sum(p.numel() for p in ps),
                                         diagonal_factors_note(b, max_block_dim)))
            continue
        kind = _kind(b)
        reason = None
        if kind == "diagonal":
            reason = reasons.get(name_of.get(id(b.params()[0]), ""), "a parameter of no layer with a block")
        elif kind == "kronecker":
            reason = diagonal_factors_note(b, max_block_dim)
        entries.append(CoverageEntry(b.name, kind, sum(p.numel() for p in ps), reason))
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            entries.append(CoverageEntry(f"{model_name}.{n}", "skipped", p.numel(),
                                         reasons.get(n, "a trainable parameter no block holds")))
            seen.add(id(p))
    return Coverage(entries)
