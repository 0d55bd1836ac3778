"""A small residual CNN (He et al. 2016) with BatchNorm2d for the 28×28 MNIST digits.

Every trainable parameter lives in an ``nn.Conv2d`` (groups = 1), an ``nn.BatchNorm2d``
(scale-shift) or the ``nn.Linear`` head, the blocks K-FAC covers for architectures
(``/work/shared/arch/API.md``: Kronecker blocks for Conv2d and Linear, 2×2 blocks per channel
for the norm).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MNIST_RESNET_WIDTHS = (16, 32, 64)


class ResidualBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU.

    The shortcut is the identity when shape is kept, else conv1×1(stride) → BN (He et al.'s
    option B).

    Shapes: (m, c_in, H, W) → (m, c_out, ⌈H/stride⌉, ⌈W/stride⌉).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv3×3 → BN → ReLU, one residual block per width (the first at stride 1, the others
    at stride 2), global average pool, Linear head.

    With the defaults (widths (16, 32, 64), stem stride 2) on (m, 1, 28, 28): stem
    (m, 16, 14, 14) → blocks (m, 16, 14, 14), (m, 32, 7, 7), (m, 64, 4, 4) → pool (m, 64) →
    logits (m, classes).
    Any input size works (the pool is global), e.g. scikit-learn's 8×8 digits.

    Args:
        in_channels: image channels (1 for MNIST).
        classes: number of classes (10).
        widths: channels of the stem/first block and of each later (stride-2) block.
        stem_stride: stride of the stem conv. 2 (default) halves the resolution of every block:
            a training step on 128 MNIST images costs ~60 ms on one CPU thread, against ~250 ms
            at stride 1.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, widths: Sequence[int] = MNIST_RESNET_WIDTHS,
                 *, stem_stride: int = 2):
        super().__init__()
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must name at least one block")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = [ResidualBlock(widths[0], widths[0], 1)]
        blocks += [ResidualBlock(a, b, 2) for a, b in zip(widths[:-1], widths[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (m, in_channels, H, W) float → logits (m, classes)."""
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def small_resnet(in_channels: int = 1, classes: int = 10, widths: Sequence[int] = MNIST_RESNET_WIDTHS, *,
                 stem_stride: int = 2, seed: int | None = None) -> SmallResNet:
    """:class:`SmallResNet` with PyTorch's default init (Kaiming-uniform convs, BN γ = 1, β = 0),
    drawn from ``torch.manual_seed(seed)`` inside a forked RNG when ``seed`` is given (the global
    RNG is left as it was), so every method of a comparison starts from the same weights."""
    if seed is None:
        return SmallResNet(in_channels, classes, widths, stem_stride=stem_stride)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallResNet(in_channels, classes, widths, stem_stride=stem_stride)


def classification_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, chunk: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (X (N, ...), y (N,) int64), without grad and
    in eval mode (BatchNorm uses its running statistics, as at deployment); the model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, X.shape[0], chunk):
                z = model(X[i : i + chunk])
                total += float(F.cross_entropy(z, y[i : i + chunk], reduction="sum"))
                correct += int((z.argmax(1) == y[i : i + chunk]).sum())
    finally:
        model.train(was_training)
    return total / X.shape[0], correct / X.shape[0]
