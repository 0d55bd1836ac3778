"""Which modules K-FAC handles, and how their parameters map to the paper's W_i.

Paper Sec 2.1: layer i computes s_i = W_i ā_{i-1} with ā_{i-1} = [a_{i-1}; 1]; the
homogeneous coordinate is LAST, so W_i = [weight | bias] has shape (d_out, d_in + 1).
A layer without bias has no homogeneous coordinate (W_i = weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = (nn.Linear,)


@dataclass
class LinearLayer:
    """An ``nn.Linear`` seen as the paper's W_i = [weight | bias] of shape (d_out, d_in + h)."""

    name: str
    module: nn.Linear

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features

    @property
    def a_dim(self) -> int:
        """Size of Ā_{i-1,i-1}: d_in + 1 with bias, d_in without."""
        return self.d_in + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.d_out

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[weight | bias] as (d_out, d_in + h)."""
        if bias is None:
            return weight
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        """Split a (d_out, d_in + h) matrix into [weight-shaped, bias-shaped] tensors."""
        if self.has_bias:
            return [M[:, : self.d_in], M[:, self.d_in]]
        return [M]

    def grad_matrix(self) -> torch.Tensor:
        w = self.module.weight.grad
        b = self.module.bias.grad if self.has_bias else None
        if w is None or (self.has_bias and b is None):
            raise RuntimeError(f"layer {self.name} has no .grad; call loss.backward() before preconditioning")
        return self.to_matrix(w, b)

    def param_matrix(self) -> torch.Tensor:
        return self.to_matrix(self.module.weight, self.module.bias)


def _describe(module: nn.Module) -> str:
    mod = type(module).__module__
    prefix = "nn." if mod.startswith("torch.nn") else f"{mod}."
    return prefix + type(module).__name__


def find_layers(model: nn.Module, *, model_name: str = "model") -> list[LinearLayer]:
    """Supported layers of ``model`` in registration order.

    Raises:
        ValueError: a module owning trainable parameters is not supported (K-FAC would
            silently skip its parameters), or the model has no supported layer.
    """
    layers: list[LinearLayer] = []
    for name, module in model.named_modules():
        full = f"{model_name}.{name}" if name else model_name
        if isinstance(module, SUPPORTED):
            if module.weight.requires_grad:
                layers.append(LinearLayer(full, module))
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            raise ValueError(
                f"unsupported layer {_describe(module)} at {full}: K-FAC here handles nn.Linear only; "
                "freeze its parameters (requires_grad_(False)) or train them with another optimizer"
            )
    if not layers:
        raise ValueError(
            f"{model_name} has no supported layer (nn.Linear with trainable weight); "
            "K-FAC needs at least one to build Kronecker factors"
        )
    return layers
