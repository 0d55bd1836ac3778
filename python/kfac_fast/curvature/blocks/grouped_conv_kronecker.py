"""Grouped convolutions (``nn.Conv1d``/``nn.Conv2d`` with groups = G > 1) as one Kronecker
product per group: KFC (Grosse & Martens 2016, KFAC-expand) restricted to each group, kind
``kronecker_grouped``; and the rule that picks this form or the exact per-group block.

Group j maps input channels j·C_in/G … to output channels j·C_out/G … with its own weight matrix
W_j = [weight[group j's outputs].reshape(C_out/G, C_in/G·K) | bias] (K kernel taps, the
homogeneous coordinate last as for Conv2d). Its Fisher block is approximated by Ā_j ⊗ G_j with

    Ā_j = (1/(m·R)) Σ_{n,r} ā_{n,j,r} ā_{n,j,r}ᵀ,      G_j = (1/N) Σ_{n,r} g_{n,j,r} g_{n,j,r}ᵀ

ā_{n,j,r} the patch of group j's input channels at output position r (entries ordered channel,
kernel row, kernel column, as ``F.unfold``; a trailing 1 with a bias), g_{n,j,r} the derivative
of the summed loss w.r.t. group j's outputs there, R positions per example, N loss terms: the
conventions of :mod:`.conv2d` and :mod:`.base` (``kfac_approx="reduce"``: one row per example,
the mean patch and the summed g). Different groups share no parameter and the block is
block-diagonal over the groups (zero cross-group curvature, as between layers in Sec 4.2).
Factors are stored batched, Ā (G, a, a) and G (G, g, g) with a = C_in/G·K (+1), g = C_out/G, so
the update, the damped inverses (one π per group by the trace rule, Sec 6.3) and the
preconditioning are batched matrix products. The block matrix is (C_out, a): group j's rows are
rows j·g … (j+1)·g − 1, the same layout as an ungrouped Conv2d's W.

Which form a grouped convolution gets (:func:`grouped_conv_block`), with b = g·a parameters per
group:

* the EXACT per-group Fisher (:class:`~.grouped_conv.GroupedConvBlock`, kind ``dense``, b × b per
  group) where it is small: b ≤ :data:`EXACT_MAX_PARAMS` (64: at most 4,096 numbers per group,
  e.g. depthwise 3×3 or 7×7, b = 10 or 50), or a depthwise convolution without channel
  multiplier (g = 1) with b ≤ 1,024: there Ā_j alone is already b × b, so the exact block costs
  what the Kronecker form costs and drops K-FAC's independence assumption (Sec 3);
* otherwise one Kronecker product per group (ResNeXt / RegNet groups of 4 … 32 channels), whose
  a² + g² numbers per group replace the exact block's b² = g²a²: a RegNet group of width 8
  (3×3, no bias) keeps 72² + 8² = 5,248 numbers instead of 576² = 331,776;
* refused (the ``unsupported=`` policy decides) when a per-group factor exceeds
  :data:`MAX_GROUP_FACTOR` (4,096, the default ``max_block_dim``).

``max_block_dim`` does not apply to the per-group factors: no per-group diagonal form is
implemented; instead a group whose Ā_j or G_j exceeds :data:`MAX_GROUP_FACTOR` is refused. The
per-group factors of timm's resnext50_32x4d, regnetx_002 and regnety_016 are at most 288 (Ā_j)
and 32 (G_j), and a refresh costs groups·(a³ + g³) instead of the exact block's groups·b³.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import KRONECKER_GROUPED, FactorSpec, frozen_bias, output_positions
from .grouped_conv import MAX_BLOCK, GroupedConvBlock

#: per-group parameter count b up to which the exact (b × b) per-group Fisher is kept
EXACT_MAX_PARAMS = 64
#: the largest per-group Kronecker factor (Ā_j or G_j) modelled; a larger one is refused
MAX_GROUP_FACTOR = 4096


def grouped_conv_block(module: nn.Module) -> type:
    """The block class of a grouped convolution (groups > 1): the exact per-group block where it
    is small (b ≤ :data:`EXACT_MAX_PARAMS`, or g = 1 and b ≤ 1,024), else the per-group Kronecker
    block (see the module docstring)."""
    b = GroupedConvBlock._group_size(module)
    g = module.weight.shape[0] // module.groups
    if b <= EXACT_MAX_PARAMS or (g == 1 and b <= MAX_BLOCK):
        return GroupedConvBlock
    return GroupedKroneckerConvBlock


class GroupedKroneckerConvBlock(GroupedConvBlock):
    """A Conv1d/Conv2d with groups > 1 (zero padding): per group Ā_j ⊗ G_j, factors batched."""

    factor_kind = KRONECKER_GROUPED

    @classmethod
    def refusal(cls, module: nn.Module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the patches assume zero padding)"
        a = module.weight[0].numel() + int(module.bias is not None)
        g = module.weight.shape[0] // module.groups
        if max(a, g) > MAX_GROUP_FACTOR:
            return (f"groups={module.groups} with per-group Kronecker factors of size {a} (A) and {g} (G); factors "
                    f"above {MAX_GROUP_FACTOR} are not modelled per group (use fewer, smaller groups)")
        return frozen_bias(module)

    @property
    def group_in(self) -> int:
        """C_in/G·K, the patch size of one group (without the homogeneous coordinate)."""
        return self.module.weight[0].numel()

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=self.group_in + int(self.has_bias),
                          g_dim=self.module.weight.shape[0] // self.groups, homogeneous=self.has_bias)

    @property
    def implicit_a(self) -> bool:
        """The statistics keep the raw input (the patches are formed per chunk of groups when the
        factors are accumulated, :meth:`a_rows`), so micro-batches must have one input size."""
        return True

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(C_out, C_in/G·K [+1]): W = [weight.reshape(C_out, −1) | bias]; rows of group j are
        j·g … (j+1)·g − 1."""
        w = weight.reshape(weight.shape[0], -1)
        return w if bias is None else torch.cat([w, bias.unsqueeze(1)], 1)

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        """The captured input as (m, C_in, H, W) (Conv1d: (m, C_in, 1, L))."""
        return self._as_4d(x)

    def a_rows(self, x: torch.Tensor, groups: "slice | None" = None) -> torch.Tensor:
        """(rows, G', C_in/G·K): the patches of the groups in ``groups`` (all by default) as rows,
        rows = m·R (expand) or m (reduce: the mean patch); ``x`` as :meth:`a_input` returns it."""
        geo = self._geometry()
        G = self.groups
        cg = x.shape[1] // G
        sl = groups or slice(0, G)
        j0, j1, _ = sl.indices(G)
        P = F.unfold(x[:, j0 * cg: j1 * cg], geo["kernel_size"], dilation=geo["dilation"], padding=geo["padding"],
                     stride=geo["stride"])  # (m, G'·cg·K, R), channel-major: group by group
        P = P.reshape(x.shape[0], j1 - j0, -1, P.shape[-1])
        if self.kfac_approx == "reduce":
            return P.mean(3)
        return P.permute(0, 3, 1, 2).reshape(-1, j1 - j0, P.shape[2])

    def a_row_count(self, x: torch.Tensor) -> int:
        """Rows of Ā_j for the input x (as :meth:`a_input`): m·R (expand) or m (reduce)."""
        if self.kfac_approx == "reduce":
            return x.shape[0]
        return x.shape[0] * output_positions(x, self._geometry())

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        """∂(Σ loss)/∂output (m, C_out, H_out, W_out) (or the Conv1d shape) -> (rows, G, C_out/G):
        expand m·R rows in the order of :meth:`a_rows`, reduce m rows summed over positions."""
        g = self._as_4d(g)
        G = self.groups
        if self.kfac_approx == "reduce":
            return g.sum((2, 3)).reshape(g.shape[0], G, -1)
        return g.permute(0, 2, 3, 1).reshape(-1, G, g.shape[1] // G)

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a {self.factor_kind!r} block: no per-example rows")
