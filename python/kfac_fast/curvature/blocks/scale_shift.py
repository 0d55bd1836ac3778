"""The affine scale-and-shift of normalisation layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm,
RMSNorm, and RMSNorm modules of other libraries): y = x̂ ⊙ w + b with x̂ the normalised input.

Per channel c (per element of ``normalized_shape`` for LayerNorm/RMSNorm, flattened), the
per-example derivatives are exact and cheap: with g = ∂(Σ loss terms)/∂y,

    u_{n,c} = ( Σ_r g_{n,c,r} x̂_{n,c,r},  Σ_r g_{n,c,r} )        (r: the other positions)

and the block is the **2×2 Fisher of (w_c, b_c) per channel**, F_c = (1/N) Σ_n u_{n,c} u_{n,c}ᵀ
(kind ``dense``, k = C blocks of size 2; 1×1 without bias). Why per channel pair and not a full
2C×2C matrix or a diagonal: the pair keeps the strong coupling between a channel's scale and
shift (their derivatives share g), is exact for the per-example Fisher restricted to each
channel, costs O(C) memory and a closed-form 2×2 inverse, while the cross-channel entries of a
2C×2C matrix cost O(C²) (2.4 M entries for C = 768) for couplings a Kronecker factorisation
would not give the other layers either. A diagonal would drop the w-b coupling for nothing.

x̂ is recomputed from the captured input with the layer's own statistics: the batch's in
training mode (BatchNorm; the factors then assume the τ₁ subset's statistics, so an example's
x̂ depends on its subset: the per-example derivatives ignore that coupling, as every K-FAC
library does), the running ones in eval mode.

RMSNorm modules of other libraries (transformers' ``LlamaRMSNorm``, ``MistralRMSNorm``, …) are
recognised **by structure**, without importing the library (:func:`is_rms_norm_like`): a class
whose name ends in ``RMSNorm``, exactly one parameter, a 1-D ``weight`` of the hidden size, and a
float ``variance_epsilon`` or ``eps``; y = weight ⊙ x / sqrt(mean(x²) + eps) over the last dim
(no bias). A ``(1 + weight)`` scale (Gemma) has the same derivative w.r.t. the weight, so the same
block. Another layout needs a block of its own (``kfac_fast.register_block``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DENSE, CurvatureBlock, FactorSpec, frozen_bias

NORM_TYPES: tuple[type, ...] = tuple(t for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
                                                 nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def rms_eps(module: nn.Module):
    """The ε of an RMSNorm-like module: ``variance_epsilon`` or ``eps`` (None if neither is a number)."""
    for attr in ("variance_epsilon", "eps"):
        e = getattr(module, attr, None)
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            return float(e)
    return None


def is_rms_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm of another library by structure: class name ending in
    ``RMSNorm``, its only own parameter a 1-D ``weight``, no sub-modules, a numeric
    ``variance_epsilon`` or ``eps``."""
    if not type(module).__name__.endswith("RMSNorm") or isinstance(module, NORM_TYPES):
        return False
    own = dict(module.named_parameters(recurse=False))
    w = own.get("weight")
    return (set(own) == {"weight"} and w.dim() == 1 and not list(module.children())
            and getattr(module, "bias", None) is None and rms_eps(module) is not None)


class ScaleShiftBlock(CurvatureBlock):
    """(weight, bias) of a normalisation layer: per channel a 2×2 Fisher block."""

    factor_kind = DENSE

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)  # elementwise_affine=False: nothing to train
        return w is not None and w.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        return frozen_bias(module)

    @property
    def channel_last(self) -> bool:
        """LayerNorm/RMSNorm scale the trailing ``normalized_shape`` dims; the others dim 1."""
        return isinstance(self.module, nn.LayerNorm) or type(self.module).__name__.endswith("RMSNorm")

    @property
    def channels(self) -> int:
        return self.module.weight.numel()

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=1 + int(self.has_bias), g_dim=self.channels,
                          homogeneous=False)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(C, 2) = [weight | bias] with the channels flattened as rows ((C, 1) without bias)."""
        cols = [weight.reshape(-1)] + ([bias.reshape(-1)] if bias is not None else [])
        return torch.stack(cols, dim=1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        shape = self.module.weight.shape
        return [M[:, j].reshape(shape) for j in range(M.shape[1])]

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂: the input normalised as the layer does, without its affine parameters."""
        m = self.module
        with torch.no_grad():
            if isinstance(m, nn.LayerNorm):
                return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            if isinstance(m, nn.GroupNorm):
                return F.group_norm(x, m.num_groups, None, None, m.eps)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                batch_stats = m.training or m.running_mean is None
                if batch_stats:  # the batch's statistics; running buffers untouched (None)
                    return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
                return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            if type(m).__name__ == "RMSNorm":
                return F.rms_norm(x, m.normalized_shape, None, m.eps)
            if is_rms_norm_like(m):
                return F.rms_norm(x, (m.weight.shape[0],), None, rms_eps(m))
        raise TypeError(f"layer {self.name}: no normalisation rule for {type(m).__name__}")

    def _by_channel(self, t: torch.Tensor) -> torch.Tensor:
        """(m, …) -> (m, R, C): the channel axis last, the other positions in the middle."""
        mdim = t.shape[0]
        if self.channel_last:
            return t.reshape(mdim, -1, self.channels)
        return t.reshape(mdim, self.channels, -1).transpose(1, 2)

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(m, C, 2): u_{n,c} = (Σ_r g x̂, Σ_r g) per example and channel."""
        if x.shape != g.shape:
            raise ValueError(f"layer {self.name}: input {tuple(x.shape)} and output {tuple(g.shape)} differ")
        if self.channel_last and x.dim() == self.module.weight.dim():  # unbatched
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        xh = self._by_channel(self.normalized(x).to(g.dtype))
        gc = self._by_channel(g)
        cols = [(gc * xh).sum(1)] + ([gc.sum(1)] if self.has_bias else [])
        return torch.stack(cols, dim=2)
