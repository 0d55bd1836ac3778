"""A Linear layer that stores its weight transposed, (d_in, d_out), and computes s = a·weight + b:
Hugging Face transformers' ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP
projections, most of its parameters) and any module of the same structure.

The paper's W_i is the same as for ``nn.Linear`` (Sec 2.1): W_i = [weightᵀ | bias] of shape
(d_out, d_in + 1), homogeneous coordinate last; only the parameter layout differs, so
``to_matrix`` / ``from_matrix`` transpose and everything else (rows, expand/reduce) is
:class:`~.linear.LinearBlock`'s.

Recognised **by structure**, without importing transformers: a module whose class is named
``Conv1D`` with an integer attribute ``nf`` and a 2-D ``weight`` parameter of shape (nx, nf)
(``bias`` of shape (nf,) or None), see :func:`is_transposed_linear`. Another module type with
this layout can be registered explicitly: ``kfac_fast.register_block(MyType, TransposedLinearBlock)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import LinearBlock


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` looks like transformers' ``Conv1D``: class name ``Conv1D``, an int
    ``nf``, a 2-D ``weight`` parameter (nx, nf) and ``bias`` (nf,) or None."""
    if type(module).__name__ != "Conv1D" or not isinstance(getattr(module, "nf", None), int):
        return False
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or w.shape[1] != module.nf:
        return False
    b = getattr(module, "bias", None)
    return b is None or (isinstance(b, nn.Parameter) and tuple(b.shape) == (module.nf,))


class TransposedLinearBlock(LinearBlock):
    """s = a·weight + bias with weight (d_in, d_out), as W_i = [weightᵀ | bias] (d_out, d_in + h)."""

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1]

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[weightᵀ | bias] as (d_out, d_in + h)."""
        return super().to_matrix(weight.t(), bias)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        """(d_out, d_in + h) -> [weight-shaped (d_in, d_out), bias-shaped (d_out,)]."""
        parts = super().from_matrix(M)
        return [parts[0].t()] + parts[1:]
