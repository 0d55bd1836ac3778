"""Layer scale: y = x ⊙ γ with one learned scale per channel (Touvron et al. 2021, CaiT; timm's
``LayerScale`` in ViTs built with ``init_values`` (DeiT III, DINOv2, EVA), ``LayerScale2d`` in
the NCHW models, transformers' ``Dinov2LayerScale``).

It is the scale half of a normalisation layer's affine map with x̂ = x (no normalisation, no
shift), so the block is :class:`~.scale_shift.ScaleShiftBlock`'s per-channel Fisher with b = 1:
u_{n,c} = Σ_r g_{n,c,r} x_{n,c,r} and F_c = (1/N) Σ_n u_{n,c}² (kind ``dense``, C blocks 1×1),
exact per example; O(C) memory.

Recognised **by structure**, without importing timm or transformers
(:func:`is_layer_scale`): a class whose name ends in ``LayerScale`` (channels last: γ broadcast
over the last dim) or ``LayerScale2d`` (channel dim 1 of (m, C, H, W)), exactly one own
parameter, 1-D, no sub-modules. timm's ``inplace=True`` variant (``x.mul_(γ)``, which overwrites
the input the statistics read) is refused (``unsupported=``). A layer-scale applied as a raw
parameter inside a bigger module's forward (timm's ``ConvNeXtBlock.gamma``) is not a module of
its own: it follows ``unsupported=``.
"""
from __future__ import annotations

import torch
from torch import nn

from .scale_shift import ScaleShiftBlock


def _scale_param(module: nn.Module):
    own = list(module.named_parameters(recurse=False))
    return own[0][1] if len(own) == 1 else None


def is_layer_scale(module: nn.Module) -> bool:
    """Whether ``module`` is a layer scale by structure: class name ending in ``LayerScale`` or
    ``LayerScale2d``, exactly one own parameter, 1-D, no sub-modules."""
    name = type(module).__name__
    if not (name.endswith("LayerScale") or name.endswith("LayerScale2d")):
        return False
    p = _scale_param(module)
    return p is not None and p.dim() == 1 and next(module.children(), None) is None


class LayerScaleBlock(ScaleShiftBlock):
    """γ of y = x ⊙ γ: per channel a 1×1 Fisher block (x̂ = x, no shift)."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        p = _scale_param(module)
        return p is not None and p.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        if getattr(module, "inplace", False):
            return "inplace=True (x.mul_(gamma) overwrites the input the statistics read): build it with inplace=False"
        return None

    @property
    def scale(self) -> nn.Parameter:
        return _scale_param(self.module)

    @property
    def channel_last(self) -> bool:
        return not type(self.module).__name__.endswith("2d")

    @property
    def channels(self) -> int:
        return self.scale.numel()

    @property
    def has_bias(self) -> bool:
        return False

    def params(self) -> list[nn.Parameter]:
        return [self.scale]

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        return [M[:, 0].reshape(self.scale.shape)]

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = x: a layer scale multiplies its input as it is."""
        return x.detach()
