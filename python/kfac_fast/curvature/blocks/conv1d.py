"""``nn.Conv1d`` (groups = 1, zero padding) as a Kronecker block: KFC (Grosse & Martens 2016) on
the (m, C, 1, L) view of its (m, C, L) input, so the 2-D patch kernel and factor update serve it.

W = [weight.reshape(C_out, C_in·k) | bias] (homogeneous coordinate last); a patch ā_{n,r} holds
the C_in·k inputs under the kernel at output position r (entries ordered channel, tap), and
Ā = (1/(m·R)) Σ ā āᵀ, G = (1/N) Σ_{n,r} g_{n,r} g_{n,r}ᵀ with R = L_out (expand); reduce: the
mean patch and the summed g per example. Grouped Conv1d: :class:`~.grouped_conv.GroupedConvBlock` or
:class:`~.grouped_conv_kronecker.GroupedKroneckerConvBlock` (:meth:`Conv2dBlock.specialise`).
"""
from __future__ import annotations

import torch

from .conv2d import Conv2dBlock


class Conv1dBlock(Conv2dBlock):
    """An ``nn.Conv1d`` as the 1 × k convolution of a height-1 image."""

    def _padding(self) -> tuple[int, int]:
        m = self.module
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return (0, 0)
            total = m.dilation[0] * (m.kernel_size[0] - 1)
            if total % 2:
                raise ValueError(f"layer {self.name}: padding='same' with an even effective kernel pads "
                                 "asymmetrically; use explicit padding")
            return (0, total // 2)
        return (0, m.padding[0])

    def geometry(self) -> dict:
        m = self.module
        return dict(kernel_size=(1, m.kernel_size[0]), stride=(1, m.stride[0]), padding=self._padding(),
                    dilation=(1, m.dilation[0]))

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """(C, L), (m, C, L) or the (m, C, 1, L) view -> (m, C, 1, L)."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return x.unsqueeze(2) if x.dim() == 3 else x
