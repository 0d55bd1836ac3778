"""``nn.MultiheadAttention`` (self-attention) as two Kronecker blocks, the two weight matrices the
paper's layer model sees (Sec 2.1) in attention:

* the fused **in-projection** s = x W_inᵀ + b_in, W_in = [in_proj_weight | in_proj_bias] of shape
  (3E, E + 1): its rows are the query input x (the same tensor as key and value) at each of the
  R = L positions of each example, its output derivative g = ∂(Σ loss terms)/∂s_{n,r} (3E);
* the **out-projection** y = o W_outᵀ + b_out (``out_proj``, a Linear the module never calls: the
  functional forward reads its weight), rows o = the attention output before ``out_proj``, g =
  ∂/∂y, the derivative w.r.t. the module's output.

Expand / reduce as for :class:`~.linear.LinearBlock` (positions as rows / one row per example).

How the quantities are obtained (the module's forward is a single functional call with no
sub-module calls to hook): a forward hook on the module (``with_kwargs``) records the query and
the masks (``key_padding_mask``, ``attn_mask``, ``is_causal``) of each call, and the module's
output y is the output both blocks differentiate. From these the statistics **recompute** the
attention once (no effect on the model's pass; only when statistics are taken): the projections
s = x W_inᵀ + b_in as a leaf, the attention with the module's masking rules (scaled dot-product
attention on s, :func:`attention_core`), then o, and

    g_in = ∂(Σ loss)/∂s = VJP of s ↦ y at the recorded ∂(Σ loss)/∂y,     ā_out = o.

Exact when the forward is deterministic. With attention dropout (``dropout > 0`` in training
mode) the recomputation runs without dropout: the out-projection's rows and the in-projection's
derivatives are then those of the dropout-free attention at the same inputs (an approximation).
``batch_first`` True or False and ``need_weights`` change nothing.

Refused (the ``unsupported=`` policy decides): separate q/k/v projection weights (``kdim`` /
``vdim`` ≠ ``embed_dim``), ``add_bias_kv``, ``add_zero_attn``. A call with different query, key
or value tensors (cross-attention) raises when its statistics are formed: the in-projection's
rows would differ between its q, k and v thirds, which one Kronecker block cannot hold.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import KRONECKER, CurvatureBlock
from .linear import LinearBlock


@dataclass
class AttentionCall:
    """One call of an ``nn.MultiheadAttention`` as recorded (nothing computed in the user's pass):
    the query detached in the layout the module got it, whether query, key and value were one
    tensor, the masks as passed, ``is_causal``."""

    raw_query: torch.Tensor
    batch_first: bool
    self_attention: bool
    raw_key_padding_mask: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    is_causal: bool

    @property
    def query(self) -> torch.Tensor:
        """(N, L, E) (an unbatched (L, E) query: N = 1)."""
        q = self.raw_query
        if q.dim() == 2:
            return q.unsqueeze(0)
        return q if self.batch_first else q.transpose(0, 1)

    @property
    def key_padding_mask(self) -> Optional[torch.Tensor]:
        """(N, S) or None."""
        kpm = self.raw_key_padding_mask
        return kpm.unsqueeze(0) if kpm is not None and kpm.dim() == 1 else kpm


def _call_record(module: nn.MultiheadAttention, args, kwargs) -> AttentionCall:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    return AttentionCall(raw_query=q.detach(), batch_first=module.batch_first, self_attention=q is k and k is v,
                         raw_key_padding_mask=det(a["key_padding_mask"]), attn_mask=det(a["attn_mask"]),
                         is_causal=bool(a["is_causal"]))


def attention_core(module: nn.MultiheadAttention, call: AttentionCall, s: torch.Tensor) -> torch.Tensor:
    """o (L, N, E): the attention output before ``out_proj`` for the projections s (L, N, 3E),
    masked as ``F.multi_head_attention_forward`` masks (boolean masks: True = not attended; a
    float mask is added; the key padding mask (N, S) and ``attn_mask`` (L, S) or (N·H, L, S)
    are merged; ``is_causal`` is only a hint there, ``attn_mask`` holds the causal mask), no dropout."""
    E, H = module.embed_dim, module.num_heads
    L, N, _ = s.shape
    q, k, v = (t.reshape(L, N, H, E // H).permute(1, 2, 0, 3) for t in s.split(E, dim=-1))  # (N, H, L, d_h)
    mask = None
    if call.attn_mask is not None:
        am = call.attn_mask
        am = torch.zeros(am.shape, dtype=s.dtype, device=s.device).masked_fill(am, float("-inf")) \
            if am.dtype == torch.bool else am.to(s.dtype)
        mask = am.reshape(N, H, L, -1) if am.dim() == 3 else am
    if call.key_padding_mask is not None:
        kp = call.key_padding_mask
        kp = torch.zeros(kp.shape, dtype=s.dtype, device=s.device).masked_fill(kp, float("-inf")) \
            if kp.dtype == torch.bool else kp.to(s.dtype)
        kp = kp.reshape(N, 1, 1, -1)
        mask = kp if mask is None else mask + kp
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, L, d_h)
    return o.permute(2, 0, 1, 3).reshape(L, N, E)


class _AttentionBlock(LinearBlock):
    """Shared by the two blocks: the module is the attention; capture records an AttentionCall."""

    factor_kind = KRONECKER
    module: nn.MultiheadAttention

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    @classmethod
    def refusal(cls, module: nn.Module):
        if not module._qkv_same_embed_dim:
            return ("separate q/k/v projection weights (kdim or vdim differs from embed_dim; only the fused "
                    "in_proj_weight of self-attention is modelled)")
        if module.bias_k is not None:
            return "add_bias_kv=True (the learned key/value biases are not modelled)"
        if module.add_zero_attn:
            return "add_zero_attn=True (not modelled)"
        for w, b, what in ((module.in_proj_weight, module.in_proj_bias, "in_proj_bias"),
                           (module.out_proj.weight, module.out_proj.bias, "out_proj.bias")):
            if b is not None and w.requires_grad and not b.requires_grad:
                return f"a frozen {what} beside a trainable weight (the block models weight and bias together)"
        return None

    @classmethod
    def create(cls, name: str, module: nn.Module, *, kfac_approx: str = "expand") -> list[CurvatureBlock]:
        out = []
        if module.in_proj_weight.requires_grad:
            out.append(AttentionInProjBlock(f"{name}.in_proj", module, kfac_approx=kfac_approx))
        if module.out_proj.weight.requires_grad:
            out.append(AttentionOutProjBlock(f"{name}.out_proj", module, kfac_approx=kfac_approx))
        return out

    @classmethod
    def covers(cls, module: nn.Module) -> list[nn.Module]:
        return [module.out_proj]

    def register_capture(self, record):
        def hook(module, args, kwargs, out):
            record(_call_record(module, args, kwargs), out[0])

        return self.module.register_forward_hook(hook, with_kwargs=True)

    # LinearBlock reads the weight/bias pair through these two
    def _weight(self) -> nn.Parameter:
        raise NotImplementedError

    def _bias(self) -> Optional[nn.Parameter]:
        raise NotImplementedError

    @property
    def has_bias(self) -> bool:
        return self._bias() is not None

    @property
    def d_in(self) -> int:
        return self._weight().shape[1]

    @property
    def d_out(self) -> int:
        return self._weight().shape[0]

    def params(self) -> list[nn.Parameter]:
        return [self._weight()] + ([self._bias()] if self.has_bias else [])

    def grad_matrix(self) -> torch.Tensor:
        return CurvatureBlock.grad_matrix(self)

    def param_matrix(self) -> torch.Tensor:
        return self.to_matrix(*self.params())

    def _by_example(self, t: torch.Tensor) -> torch.Tensor:
        """The module's output layout ((L, N, E), (N, L, E) with batch_first, (L, E)) -> (N, L, E)."""
        if t.dim() == 2:
            return t.unsqueeze(0)
        return t if self.module.batch_first else t.transpose(0, 1)

    def _check(self, call: AttentionCall) -> None:
        if not call.self_attention:
            raise ValueError(f"layer {self.name} was called with different query, key or value tensors "
                             "(cross-attention); its in-projection block needs the one input of self-attention. "
                             "Model cross-attention with separate nn.Linear projections, or freeze this module "
                             "(requires_grad_(False)) so K-FAC does not track it")

    def _projections(self, call: AttentionCall) -> torch.Tensor:
        """s (L, N, 3E) = x W_inᵀ + b_in at the recorded query."""
        m = self.module
        x = call.query.transpose(0, 1)
        b = None if m.in_proj_bias is None else m.in_proj_bias.detach().to(x.dtype)
        return F.linear(x, m.in_proj_weight.detach().to(x.dtype), b)


class AttentionInProjBlock(_AttentionBlock):
    """The fused in-projection W_in = [in_proj_weight | in_proj_bias], (3E, E + 1)."""

    def _weight(self):
        return self.module.in_proj_weight

    def _bias(self):
        return self.module.in_proj_bias

    def a_rows(self, call: AttentionCall) -> torch.Tensor:
        """The query (N, L, E) as rows (expand: N·L; reduce: the per-example mean)."""
        self._check(call)
        return super().a_rows(call.query)

    def output_rows(self, call: AttentionCall, g: torch.Tensor) -> torch.Tensor:
        """∂(Σ loss)/∂s by one VJP through the recomputed attention at the recorded ∂/∂y."""
        self._check(call)
        m = self.module
        gy = self._by_example(g).transpose(0, 1).to(call.query.dtype)  # (L, N, E)
        with torch.enable_grad():
            s = self._projections(call).requires_grad_(True)
            o = attention_core(m, call, s)
            w, b = m.out_proj.weight.detach().to(o.dtype), m.out_proj.bias
            y = F.linear(o, w, None if b is None else b.detach().to(o.dtype))
            (gs,) = torch.autograd.grad(y, s, grad_outputs=gy)
        return self.g_rows(gs.transpose(0, 1).to(g.dtype))


class AttentionOutProjBlock(_AttentionBlock):
    """``out_proj`` as W_out = [out_proj.weight | out_proj.bias], (E, E + 1), fed by the attention output."""

    def _weight(self):
        return self.module.out_proj.weight

    def _bias(self):
        return self.module.out_proj.bias

    def a_rows(self, call: AttentionCall) -> torch.Tensor:
        """o (N, L, E), recomputed from the recorded query, as rows."""
        self._check(call)
        with torch.no_grad():
            o = attention_core(self.module, call, self._projections(call))
        return super().a_rows(o.transpose(0, 1))

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        """∂(Σ loss)/∂y in the module's output layout -> rows."""
        return super().g_rows(self._by_example(g))
