"""Helpers from the paper's experiments (Sec 13)."""
from __future__ import annotations

import math


import torch
from torch import nn


def batch_size_schedule(k: int, *, m1: int, b: float, dataset_size: int) -> int:
    """Exponentially increasing mini-batch size m_k = min(m₁·exp((k−1)/b), |S|) (Sec 13).

    Args: k ≥ 1 the iteration, m1 the first batch size, b > 0 the growth time-scale.
    """
    if k < 1 or m1 < 1 or b <= 0 or dataset_size < 1:
        raise ValueError(f"need k >= 1, m1 >= 1, b > 0, dataset_size >= 1 (got k={k}, m1={m1}, b={b}, "
                         f"dataset_size={dataset_size})")
    return int(min(round(m1 * math.exp((k - 1) / b)), dataset_size))


class PolyakAverage:
    """Exponentially decayed iterate averaging θ̄_k = ξ_k θ̄_{k-1} + (1 − ξ_k) θ_k, ξ_k = min(1 − 1/k, ξ) (Sec 13).

    The paper used ξ = 0.99. ``swap()`` exchanges the model's parameters with the averages
    (call it twice to swap back), e.g. to evaluate the averaged model.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.99):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.k = 0

    @torch.no_grad()
    def update(self) -> None:
        self.k += 1
        xi = min(1.0 - 1.0 / self.k, self.decay)
        for a, p in zip(self.average, self.params):
            a.mul_(xi).add_(p.detach(), alpha=1 - xi)

    @torch.no_grad()
    def swap(self) -> None:
        for a, p in zip(self.average, self.params):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    def state_dict(self) -> dict:
        return {"k": self.k, "decay": self.decay, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.decay = state["k"], state["decay"]
        for a, s in zip(self.average, state["average"]):
            a.copy_(s)
