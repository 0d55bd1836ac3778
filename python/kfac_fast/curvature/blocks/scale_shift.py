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

Subclasses of the registered types whose forward differs from their parent's are recognised **by
structure** (timm's, without importing timm):

* a channel-first LayerNorm (:func:`is_channel_first_layer_norm`: an ``nn.LayerNorm`` subclass
  named ``*LayerNorm*2d*`` with a 1-D ``normalized_shape``, e.g. timm's ``LayerNorm2d`` in
  ConvNeXt): it normalises dim 1 of an (m, C, H, W) input (permuted to the last dim and back);
* a norm followed by an activation inside the module (:func:`post_norm_ops`: children exactly
  ``drop`` and ``act``, timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``; the
  module's output is act(drop(x̂ ⊙ w + b))): the hook's g is ∂/∂(the activation's output), so the
  per-example derivatives first map it back through the activation by the chain rule, g_y =
  (∂act/∂y)ᵀ g at y = x̂ ⊙ w + b (a VJP of the module's own ``act``; ``drop`` must be an
  ``nn.Identity``: a dropout inside the module is refused, its mask is not recorded). Any other
  child module in a norm subclass is refused (``unsupported=``): its output is not the norm's.

RMSNorm modules of other libraries (transformers' ``LlamaRMSNorm``, ``MistralRMSNorm``, …) are
recognised **by structure**, without importing the library (:func:`is_rms_norm_like`): a class
whose name ends in ``RMSNorm`` (or T5's ``T5LayerNorm`` and its copies, RMS norms by another
name), exactly one parameter, a 1-D ``weight`` of the hidden size, and a
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


#: class names of transformers' RMS norms named "LayerNorm" (T5 and its descendants: no mean
#: subtraction, no bias, y = weight ⊙ x / sqrt(mean(x²) + variance_epsilon))
RMS_NORMS_NAMED_LAYER_NORM = ("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm",
                              "Pix2StructLayerNorm", "Pop2PianoLayerNorm", "SwitchTransformersLayerNorm")


def _rms_named(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") or name in RMS_NORMS_NAMED_LAYER_NORM


def is_rms_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm of another library by structure: class name ending in
    ``RMSNorm`` (or one of :data:`RMS_NORMS_NAMED_LAYER_NORM`, T5's), its only own parameter a
    1-D ``weight``, no sub-modules, a numeric ``variance_epsilon`` or ``eps``."""
    if not _rms_named(module) or isinstance(module, NORM_TYPES):
        return False
    own = dict(module.named_parameters(recurse=False))
    w = own.get("weight")
    return (set(own) == {"weight"} and w.dim() == 1 and not list(module.children())
            and getattr(module, "bias", None) is None and rms_eps(module) is not None)


def is_channel_first_layer_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LayerNorm`` subclass that normalises dim 1 of (m, C, H, W)
    (timm's ``LayerNorm2d``, ``LayerNorm2dFp32``, ``LayerNormExp2d``, ``LayerNormAct2d``): class
    name containing ``LayerNorm`` and ``2d``, a 1-D ``normalized_shape``."""
    name = type(module).__name__
    return (isinstance(module, nn.LayerNorm) and "LayerNorm" in name and "2d" in name
            and len(module.normalized_shape) == 1)


_POST_NORM_CHILDREN = {"drop", "act"}


def post_norm_ops(module: nn.Module) -> list[nn.Module]:
    """The modules a norm layer applies after its affine map, in order (timm's ``*NormAct*``:
    ``drop`` then ``act``), or [] for a plain norm layer."""
    children = dict(module.named_children())
    if not children or set(children) != _POST_NORM_CHILDREN:
        return []
    return [children["drop"], children["act"]]


class ScaleShiftBlock(CurvatureBlock):
    """(weight, bias) of a normalisation layer: per channel a 2×2 Fisher block."""

    factor_kind = DENSE

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)  # elementwise_affine=False: nothing to train
        return w is not None and w.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        children = dict(module.named_children())
        if children:
            ops = post_norm_ops(module)
            if not ops:
                return (f"sub-modules {', '.join(children)} inside the norm layer (its output is not the "
                        "normalisation's; only timm's drop + act are understood)")
            if not isinstance(ops[0], nn.Identity):
                return (f"a {type(ops[0]).__name__} ('drop') between the normalisation and its activation (its "
                        "mask is not recorded for the per-example derivatives)")
        return frozen_bias(module)

    @property
    def channel_last(self) -> bool:
        """LayerNorm/RMSNorm scale the trailing ``normalized_shape`` dims; the others (and a
        channel-first LayerNorm) dim 1."""
        m = self.module
        if is_channel_first_layer_norm(m):
            return False
        return isinstance(m, nn.LayerNorm) or _rms_named(m)

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
            if is_channel_first_layer_norm(m):  # (m, C, ...): dim 1 normalised
                return F.layer_norm(x.movedim(1, -1), m.normalized_shape, None, None, m.eps).movedim(-1, 1)
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

    def _affine_shape(self, xh: torch.Tensor) -> tuple[int, ...]:
        """Shape that broadcasts the (C,) weight against x̂ (channel dim 1, or the trailing dims)."""
        if self.channel_last:
            return tuple(self.module.weight.shape)
        return (1, self.channels) + (1,) * (xh.dim() - 2)

    def _through_post_ops(self, xh: torch.Tensor, g: torch.Tensor, ops: list[nn.Module]) -> torch.Tensor:
        """∂/∂y from ∂/∂act(drop(y)) at y = x̂ ⊙ w + b: the chain rule through the module's own
        post-norm modules (one VJP; an in-place activation acts on a copy)."""
        m = self.module
        shape = self._affine_shape(xh)
        with torch.enable_grad():
            w = m.weight.detach().to(g.dtype).reshape(shape)
            y = xh.detach() * w
            if self.has_bias:
                y = y + m.bias.detach().to(g.dtype).reshape(shape)
            y = y.requires_grad_(True)
            out = y.clone()
            for op in ops:
                out = op(out)
            (gy,) = torch.autograd.grad(out, y, g)
        return gy

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(m, C, 2): u_{n,c} = (Σ_r g x̂, Σ_r g) per example and channel."""
        if x.shape != g.shape:
            raise ValueError(f"layer {self.name}: input {tuple(x.shape)} and output {tuple(g.shape)} differ")
        if self.channel_last and x.dim() == self.params()[0].dim():  # unbatched
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        xh = self.normalized(x).to(g.dtype)
        ops = post_norm_ops(self.module)
        if ops:
            g = self._through_post_ops(xh, g, ops)
        xh = self._by_channel(xh)
        gc = self._by_channel(g)
        cols = [(gc * xh).sum(1)] + ([gc.sum(1)] if self.has_bias else [])
        return torch.stack(cols, dim=2)
