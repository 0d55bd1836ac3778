"""``nn.Linear`` as the paper's layer (Sec 2.1): s_i = W_i ā_{i-1} with ā_{i-1} = [a_{i-1}; 1].

The homogeneous coordinate is LAST, so W_i = [weight | bias] has shape (d_out, d_in + 1). A
layer without bias has no homogeneous coordinate (W_i = weight). On (m, ..., d_in) inputs (a
token model) the R = Π(extra dims) positions are weight-shared uses of the layer: KFAC-expand
(default) takes every position as a row, KFAC-reduce one row per example (mean ā, summed g).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import KRONECKER, CurvatureBlock, FactorSpec, frozen_bias


class LinearBlock(CurvatureBlock):
    """An ``nn.Linear`` seen as the paper's W_i = [weight | bias] of shape (d_out, d_in + h)."""

    factor_kind = KRONECKER
    module: nn.Linear

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module.weight.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        return frozen_bias(module)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features

    @property
    def a_dim(self) -> int:
        """Size of Ā_{i-1,i-1}: d_in + 1 with bias, d_in without."""
        return self.d_in + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.d_out

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=self.a_dim, g_dim=self.g_dim, homogeneous=self.has_bias)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[weight | bias] as (d_out, d_in + h)."""
        if bias is None:
            return weight
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        """Split a (d_out, d_in + h) matrix into [weight-shaped, bias-shaped] tensors."""
        if self.has_bias:
            return [M[:, : self.d_in], M[:, self.d_in]]
        return [M]

    def grad_matrix(self) -> torch.Tensor:
        w = self.module.weight.grad
        b = self.module.bias.grad if self.has_bias else None
        if w is None or (self.has_bias and b is None):
            raise RuntimeError(f"layer {self.name} has no .grad; call loss.backward() before preconditioning")
        return self.to_matrix(w, b)

    def param_matrix(self) -> torch.Tensor:
        return self.to_matrix(self.module.weight, self.module.bias)

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(m, …, d_in) -> expand: (m·R, d_in), every position a row; reduce: (m, d_in), the
        per-example mean over the R positions (ā_n = mean ā_{n,r}: the homogeneous 1 stays 1)."""
        if self.kfac_approx == "reduce" and x.dim() > 2:
            return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        return x.reshape(-1, x.shape[-1])

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        """(m, …, d_out) -> expand: (m·R, d_out); reduce: (m, d_out), g_n = Σ_r g_{n,r}."""
        if self.kfac_approx == "reduce" and g.dim() > 2:
            return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return g.reshape(-1, g.shape[-1])
