"""Tied weights: an ``nn.Embedding`` whose weight is also a bias-free ``nn.Linear`` output layer's
(GPT-2's ``wte``/``lm_head``, T5, SmolLM, small Qwen2.5 models).

W of shape (V, d) has two uses, each a layer of the paper (Sec 2.1): the embedding
(s = Wᵀ e_v, block matrix Wᵀ (d, V), Ā = C = diag(token frequencies), G_emb (d, d)) and the head
(s = W h, block matrix W (V, d), Ā_out (d, d) from its input h, G_out (V, V) from the logits'
derivative). The Fisher block of W sums the two uses' blocks plus their cross-covariance; K-FAC
approximates each use by its Kronecker product (Sec 3) and **drops the cross-covariance** (the
two uses sit at opposite ends of the network, where Sec 4.1's Fisher is weakest off the block
diagonal), so in the head's layout (V, d):

    F_W ≈ Ā_out ⊗ G_out + G_emb ⊗ C       (F vec(X) = vec(G_out X Ā_out + C X G_emb))

which :mod:`kfac_fast.curvature.tied_inverse` inverts exactly by Appendix B.

Opt-in: ``tied_weights="kronecker_sum"`` (``find_blocks``, ``KFAC``, ``KFACPreconditioner``);
by default the shared weight follows ``unsupported=``, which trained better on a tied LM with
held-out data (``benchmarks/bench_tied_lm.py``, docs/architectures.md).

Both modules keep their captures, statistics and running factors exactly as untied (two
records); the pair has ONE owner of W: the head block (:class:`TiedHeadBlock`) owns it, the
embedding block (:class:`TiedEmbeddingBlock`) is a statistics-only partner whose ``params()``
is empty, so W is stepped once and every site that zips ``params()`` with ``from_matrix``
works unchanged (the partner's matrix is zero, its update nothing).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import CurvatureBlock
from .embedding import EmbeddingBlock
from .linear import LinearBlock


class TiedHeadBlock(LinearBlock):
    """A bias-free ``nn.Linear`` head whose weight (V, d) an embedding also uses: it owns W;
    ``partner`` is the embedding's :class:`TiedEmbeddingBlock` (its inverse entry is the
    Kronecker sum over both records)."""

    partner: "TiedEmbeddingBlock"


class TiedEmbeddingBlock(EmbeddingBlock):
    """The embedding use of a tied weight: statistics only (its Ā = token frequencies and
    G_emb feed the head's Kronecker-sum inverse); it owns no parameter, its block matrix (d, V)
    is zero and its update empty. ``owner`` is the :class:`TiedHeadBlock`."""

    owner: TiedHeadBlock

    def params(self) -> list[nn.Parameter]:
        return []

    def _zero(self) -> torch.Tensor:
        w = self.module.weight
        return torch.zeros(self.g_dim, self.a_dim, dtype=w.dtype, device=w.device)

    def to_matrix(self, *tensors: torch.Tensor) -> torch.Tensor:
        """No parameter: the zero (d, V) matrix (the gradient travels with the owner's W)."""
        return self._zero()

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        return []

    def grad_matrix(self) -> torch.Tensor:
        return self._zero()

    def param_matrix(self) -> torch.Tensor:
        return self._zero()


def tieable(a: CurvatureBlock, b: CurvatureBlock) -> Optional[tuple[LinearBlock, EmbeddingBlock]]:
    """(head, embedding) when blocks ``a`` and ``b`` share their weight as an ``nn.Embedding``
    (V, d) and an ``nn.Linear(d, V, bias=False)`` head do (the one configuration with a
    Kronecker-sum block), else None."""
    for head, emb in ((a, b), (b, a)):
        if (type(head) is LinearBlock and type(emb) is EmbeddingBlock and head.module.bias is None
                and head.module.weight is emb.module.weight):
            return head, emb
    return None


def tie(head: LinearBlock, emb: EmbeddingBlock) -> tuple[TiedHeadBlock, TiedEmbeddingBlock]:
    """The tied pair of blocks for ``head`` and ``emb`` (same names, modules and kfac_approx;
    the embedding always expands, as untied)."""
    h = TiedHeadBlock(head.name, head.module, kfac_approx=head.kfac_approx)
    e = TiedEmbeddingBlock(emb.name, emb.module, kfac_approx=emb.kfac_approx)
    h.partner, e.owner = e, h
    return h, e
