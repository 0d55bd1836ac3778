"""Any other trainable parameter as a diagonal block: a custom ``nn.Parameter``, the fused
in-projection of ``nn.MultiheadAttention``, a parameter shared by two modules, the weights of a
layer type without a Kronecker block (Conv1d/3d, RNN cells, grouped convolutions).

The block is the diagonal of the Fisher, F_jj = (1/N) Σ_n E_y[(∂ℓ_n/∂θ_j)²]. Estimator (stated):
with targets y sampled from the model independently per loss term, the per-term gradients have
zero mean and are independent, so the cross terms of the squared summed gradient vanish in
expectation:

    E[(∂/∂θ_j Σ_t ℓ_t(y_t))²] = Σ_t E[(∂ℓ_t/∂θ_j)²]   ⇒   F̂_jj = (1/N) (∂/∂θ_j Σ_t ℓ_t(y_t))²

is unbiased for the diagonal of the (MC) Fisher from the same sampled backward pass that gives
the Kronecker factors' G, at no extra pass (single-sample noisy: the running average of Sec 5
smooths it). With the empirical Fisher (given targets) the cross terms do not vanish and the
estimate includes N·(mean gradient)² (an over-estimate that acts as extra damping). The
damped inverse is (F̂_jj + γ²)⁻¹, γ² playing the role of the Tikhonov term of the Kronecker
blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import DIAGONAL, CurvatureBlock, FactorSpec


class DiagonalBlock(CurvatureBlock):
    """One parameter (any shape) with a diagonal Fisher block; block matrix (numel, 1)."""

    factor_kind = DIAGONAL
    captures = False

    def __init__(self, name: str, param: nn.Parameter, *, kfac_approx: str = "expand", module=None):
        super().__init__(name, module, kfac_approx=kfac_approx)
        self.param = param

    def __repr__(self) -> str:
        return f"DiagonalBlock(name={self.name!r}, shape={tuple(self.param.shape)})"

    @property
    def factor_spec(self) -> FactorSpec:
        return FactorSpec(kind=self.factor_kind, a_dim=1, g_dim=self.param.numel(), homogeneous=False)

    def params(self) -> list[nn.Parameter]:
        return [self.param]

    def to_matrix(self, p: torch.Tensor) -> torch.Tensor:
        return p.reshape(-1, 1)

    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        return [M.reshape(self.param.shape)]

    def from_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """(numel, 1, 1): the summed sampled-loss gradient as the one 'example' whose square
        estimates N·diag(F) (see the module docstring)."""
        return grad.reshape(1, -1, 1)
