"""Grouped and depthwise convolutions (``nn.Conv1d``/``nn.Conv2d`` with groups = G > 1): the
exact Fisher of each group's parameters, one small dense block per group (kind ``dense``).

Group j maps input channels j·C_in/G … to output channels j·C_out/G … with its own weights
W_j = [weight[group j's outputs].reshape(C_out/G, C_in/G·K) | bias] (K kernel taps). Its
per-example derivative is exact and cheap (the weight gradient of one convolution with the
examples folded into the groups; no patch matrix):

    u_{n,j} = vec_rows( Σ_r g_{n,j,r} ā_{n,j,r}ᵀ ),   F_j = (1/N) Σ_n u_{n,j} u_{n,j}ᵀ

(ā the group's patch with a trailing 1, g the group's output derivative at position r), a
(b × b) block with b = (C_out/G)·(C_in/G·K + 1). This exact form is chosen where it is small
(b ≤ 64, or a depthwise convolution with C_out/G = 1 and b ≤ 1,024: depthwise 3×3, b = 10, a
10 × 10 block per channel against a 10 × 10 Ā_j and a 1 × 1 G_j for the Kronecker form): it costs
no more than the Kronecker factors and drops K-FAC's independence assumption between
activations and derivatives (Sec 3). Larger groups (ResNeXt, RegNet) get one Kronecker product
per group, :class:`~.grouped_conv_kronecker.GroupedKroneckerConvBlock`; the rule is
:func:`~.grouped_conv_kronecker.grouped_conv_block`. Used directly, this block refuses groups with
b > MAX_BLOCK (b² memory per group).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import DENSE, CurvatureBlock, FactorSpec, frozen_bias

#: the largest per-group parameter count b modelled exactly (b × b per group)
MAX_BLOCK = 1024


class GroupedConvBlock(CurvatureBlock):
    """A Conv1d/Conv2d with groups > 1 (zero padding): per group the exact (b × b) Fisher block."""

    factor_kind = DENSE

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module.weight.requires_grad

    @classmethod
    def refusal(cls, module: nn.Module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the patches assume zero padding)"
        b = cls._group_size(module)
        if b > MAX_BLOCK:
            return (f"groups={module.groups} with {b} parameters per group (exact per-group Fisher blocks are kept up to "
                    f"{MAX_BLOCK}; larger groups take the per-group Kronecker block, GroupedKroneckerConvBlock)")
        return frozen_bias(module)

    @staticmethod
    def _group_size(module: nn.Module) -> int:
        w = module.weight
        return (w.shape[0] // module.groups) * (w[0].numel() + int(module.bias is not None))

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=self._group_size(self.module), g_dim=self.groups,
                          homogeneous=False)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(G, b): row j is group j's [weight | bias] rows, flattened row-major."""
        w = weight.reshape(weight.shape[0], -1)
        if bias is not None:
            w = torch.cat([w, bias.unsqueeze(1)], 1)
        return w.reshape(self.groups, -1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        shape = self.module.weight.shape
        W = M.reshape(shape[0], -1)
        k = self.module.weight[0].numel()
        return [W[:, :k].reshape(shape), W[:, k]] if self.has_bias else [W.reshape(shape)]

    def _geometry(self):
        m = self.module
        one_d = isinstance(m, nn.Conv1d)
        pad = m.padding
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0,) * len(m.kernel_size)
            else:
                totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
                if any(t % 2 for t in totals):
                    raise ValueError(f"layer {self.name}: padding='same' with an even effective kernel pads "
                                     "asymmetrically; use explicit padding")
                pad = tuple(t // 2 for t in totals)
        lift = (lambda t: (1,) + tuple(t)) if one_d else tuple
        return dict(kernel_size=lift(m.kernel_size), dilation=lift(m.dilation), stride=lift(m.stride),
                    padding=((0,) + tuple(pad)) if one_d else tuple(pad))

    def _as_4d(self, t: torch.Tensor) -> torch.Tensor:
        spatial = 1 if isinstance(self.module, nn.Conv1d) else 2
        if t.dim() == spatial + 1:  # unbatched
            t = t.unsqueeze(0)
        return t.unsqueeze(2) if spatial == 1 else t

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(m, G, b): per example and group, the derivative of the summed loss w.r.t. the group's
        [weight | bias] rows, flattened row-major. The weight part is the weight gradient of one
        convolution with the examples folded into the groups (m·G groups), so no patch matrix is
        formed: O(m·C_out·C_in/G·K) memory."""
        x, g = self._as_4d(x).to(g.dtype), self._as_4d(g)
        geo = self._geometry()
        m, G = x.shape[0], self.groups
        Co = g.shape[1]
        w_shape = (m * Co, x.shape[1] // G) + tuple(geo["kernel_size"])
        dw = torch.nn.grad.conv2d_weight(x.reshape(1, -1, *x.shape[2:]), w_shape, g.reshape(1, -1, *g.shape[2:]),
                                         stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"],
                                         groups=m * G)  # (m·C_out, C_in/G, kh, kw): per-example weight gradients
        u = dw.reshape(m, Co, -1)
        if self.has_bias:
            u = torch.cat([u, g.sum((2, 3)).unsqueeze(2)], 2)
        return u.reshape(m, G, -1)
