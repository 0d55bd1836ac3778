"""``nn.Conv2d`` as a Kronecker block: KFC (Grosse & Martens 2016) in the expand form.

W = [weight.reshape(C_out, C_in·kh·kw) | bias], shape (C_out, C_in·kh·kw + 1): the homogeneous
coordinate LAST, as for Linear. A patch ā_{n,r} is column r of
``F.unfold(x_n, (kh, kw), dilation, padding, stride)`` (entries ordered channel, kernel row,
kernel column; padding zeros are part of the patch) with a trailing 1, and g_{n,r} the
derivative at output location r. With R = H_out·W_out locations per example:

    Ā = (1/(m·R)) Σ_{n,r} ā_{n,r} ā_{n,r}ᵀ,        G = (1/N) Σ_n Σ_r g_{n,r} g_{n,r}ᵀ

(N = m for one loss term per example); for R = 1 this is the Linear convention.
``kfac_approx="reduce"``: one row per example, the mean patch and the summed g.
Grouped convolutions (groups > 1) get :class:`~.grouped_conv.GroupedConvBlock` (small groups:
the exact per-group Fisher) or :class:`~.grouped_conv_kronecker.GroupedKroneckerConvBlock` (one
Kronecker product per group) instead (:meth:`Conv2dBlock.specialise`); padding modes other than zeros are refused (the ``unsupported=``
policy then decides). ``nn.Conv1d`` is the same block on a (m, C, 1, L) view (:mod:`.conv1d`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import KRONECKER, CurvatureBlock, FactorSpec, frozen_bias, output_positions


class Conv2dBlock(CurvatureBlock):
    """An ``nn.Conv2d`` (groups = 1, zero padding) as W = [weight.reshape(C_out, −1) | bias]."""

    factor_kind = KRONECKER
    module: nn.Conv2d

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module.weight.requires_grad

    @classmethod
    def specialise(cls, module: nn.Module) -> type:
        """A grouped or depthwise convolution (groups > 1) gets its per-group block: the exact
        per-group Fisher where it is small, else one Kronecker product per group
        (:func:`~.grouped_conv_kronecker.grouped_conv_block`)."""
        if module.groups != 1:
            from .grouped_conv_kronecker import grouped_conv_block
            return grouped_conv_block(module)
        return cls

    @classmethod
    def refusal(cls, module: nn.Module):
        if module.groups != 1:
            return f"groups={module.groups} (this block models groups=1; grouped convolutions use GroupedConvBlock)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the patches assume zero padding)"
        return frozen_bias(module)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def patch_dim(self) -> int:
        return self.module.weight[0].numel()

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=self.patch_dim + int(self.has_bias),
                          g_dim=self.module.out_channels, homogeneous=self.has_bias)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = weight.reshape(weight.shape[0], -1)
        return w if bias is None else torch.cat([w, bias.unsqueeze(1)], dim=1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        shape = self.module.weight.shape
        w = M[:, : self.patch_dim].reshape(shape)
        return [w, M[:, self.patch_dim]] if self.has_bias else [w]

    def _padding(self) -> tuple[int, int]:
        m = self.module
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return (0, 0)
            # 'same' (stride 1): total padding d·(k−1) per dim; unfold pads symmetrically, so
            # only odd-sized effective kernels are exact
            pads = []
            for d, k in zip(m.dilation, m.kernel_size):
                total = d * (k - 1)
                if total % 2:
                    raise ValueError(f"layer {self.name}: padding='same' with an even effective kernel pads "
                                     "asymmetrically; use explicit padding")
                pads.append(total // 2)
            return tuple(pads)
        return tuple(m.padding)

    @property
    def implicit_a(self) -> bool:
        """Expand: Ā comes straight from the input (``ops.conv_factor_update``: no (m·R, C·kh·kw)
        patch matrix); ``a_rows`` is only formed where rows are needed (tridiagonal cross factors)."""
        return self.kfac_approx == "expand"

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """The input (or output derivative) as (m, C, H, W): an unbatched (C, H, W) gets m = 1."""
        return x.unsqueeze(0) if x.dim() == 3 else x

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.implicit_a:
            return self.a_rows(x)
        return self.batched(x)

    def geometry(self) -> dict:
        """kernel_size, stride, padding, dilation as pairs, for ``ops.conv_factor_update``."""
        m = self.module
        return dict(kernel_size=tuple(m.kernel_size), stride=tuple(m.stride), padding=self._padding(),
                    dilation=tuple(m.dilation))

    def a_row_count(self, x: torch.Tensor) -> int:
        """Rows of Ā for input x: m·R (expand) or m (reduce)."""
        x = self.batched(x)
        if self.kfac_approx == "reduce":
            return x.shape[0]
        return x.shape[0] * output_positions(x, self.geometry())

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(m, C_in, H, W) -> (m, C_in·kh·kw, R), the unfolded patches."""
        geo = self.geometry()
        return F.unfold(x, geo["kernel_size"], dilation=geo["dilation"], padding=geo["padding"], stride=geo["stride"])

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """expand: (m·R, C_in·kh·kw) patches as rows; reduce: (m, C_in·kh·kw) mean patches."""
        P = self.patches(self.batched(x))
        if self.kfac_approx == "reduce":
            return P.mean(2)
        return P.transpose(1, 2).reshape(-1, P.shape[1])

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        """(m, C_out, H_out, W_out) -> expand: (m·R, C_out), rows in the order of ``a_rows``;
        reduce: (m, C_out) summed over locations."""
        g = self.batched(g)
        if self.kfac_approx == "reduce":
            return g.sum((2, 3))
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
