"""``nn.Embedding`` as a Kronecker block with a diagonal Ā.

An embedding is a Linear layer on one-hot inputs: s = W ā with ā = e_v (no bias, no
homogeneous coordinate) and W = weight.T of shape (D, V). Ā = E[ā āᵀ] is then exactly
diagonal, the token frequencies: Ā[v] = (count of token v among the m·R positions)/(m·R),
stored as a vector (never a dense V×V matrix). G = (1/N) Σ_{n,r} g_{n,r} g_{n,r}ᵀ over the
positions, as KFAC-expand (reduce would make Ā dense: embeddings always expand).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import KRONECKER_DIAG_A, CurvatureBlock, FactorSpec


class EmbeddingBlock(CurvatureBlock):
    """An ``nn.Embedding`` as W = weight.T (D, V) with Ā = diag(token frequencies)."""

    factor_kind = KRONECKER_DIAG_A
    module: nn.Embedding

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module.weight.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        if module.sparse:
            return "sparse=True (K-FAC needs dense gradients)"
        if module.max_norm is not None:
            return "max_norm (the forward renormalises rows of the weight in place)"
        return None

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=self.module.num_embeddings,
                          g_dim=self.module.embedding_dim, homogeneous=False)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight]

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        return [M.t()]

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (m, …) -> (m·R,) int64: Ā[v] is the frequency of v among them."""
        return x.reshape(-1).long()

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1])
