"""Models from the paper's experiments (Sec 13)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MNIST_AUTOENCODER = (784, 1000, 500, 250, 30)


def deep_autoencoder(encoder: Sequence[int] = MNIST_AUTOENCODER, *, sparse_init: int = 15,
                     generator: torch.Generator | None = None) -> nn.Sequential:
    """Hinton & Salakhutdinov (2006) deep autoencoder: encoder sizes mirrored into a decoder,
    logistic units, a linear code layer and linear output (logits for sigmoid cross-entropy).

    Args:
        encoder: layer widths from the input to the code, e.g. (784, 1000, 500, 250, 30).
        sparse_init: incoming non-zero weights per unit, N(0, 1), biases 0 (Martens 2010's
            sparse initialisation, used by the paper); 0 means PyTorch's default init.
    """
    sizes = list(encoder) + list(encoder[-2::-1])
    code = len(encoder) - 1
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if sparse_init:
            with torch.no_grad():
                lin.weight.zero_()
                lin.bias.zero_()
                k = min(sparse_init, sizes[i])
                for row in range(sizes[i + 1]):
                    idx = torch.randperm(sizes[i], generator=generator)[:k]
                    lin.weight[row, idx] = torch.randn(k, generator=generator)
        mods.append(lin)
        last = i == len(sizes) - 2
        if not last and i + 1 != code:
            mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def reconstruction_error(model: nn.Module, X: torch.Tensor, *, chunk: int = 2500) -> float:
    """Mean over cases of the squared error summed over pixels, ‖σ(z) − x‖² (Sec 13)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, X.shape[0], chunk):
            x = X[i : i + chunk]
            total += float((torch.sigmoid(model(x)) - x).pow(2).sum())
    return total / X.shape[0]
