"""Predictive distributions R_{y|z} and their losses (paper Sec 2.1, 5; Appendix C).

Each loss is the negative log-likelihood of an exponential family with natural
parameters z (the network output), so the Fisher equals the generalised Gauss-Newton
matrix and F_R, the Fisher of R_{y|z} w.r.t. z, has a closed form used by Appendix C.
The objective is the MEAN over the batch of per-example losses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class PredictiveDistribution:
    """Interface: per-example loss, sampling, and F_R (as vectors and as a bilinear form)."""

    name: str = ""

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example negative log-likelihood, shape (m,). z: (m, k)."""
        raise NotImplementedError

    def total(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over examples of :meth:`loss` (a 0-d tensor), computed with a fused "sum" reduction:
        no (m, k) intermediate survives into the backward pass."""
        return self.loss(z, y).sum()

    def sample(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution (Sec 5), no grad."""
        raise NotImplementedError

    def fisher_factors(self, z: torch.Tensor) -> torch.Tensor:
        """(K, m, k) vectors b with Σ_K b bᵀ = F_R for each example (exact expectation over y)."""
        raise NotImplementedError

    def fisher_inner(self, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-example uᵀ F_R v, shape (m,). u, v: (m, k) output-space directions (J·Δθ)."""
        raise NotImplementedError

    def check_targets(self, z: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError


class SoftmaxCrossEntropy(PredictiveDistribution):
    """Categorical over logits z. Targets: int64 class indices of shape (m,)."""

    name = "softmax_cross_entropy"

    def loss(self, z, y):
        return F.cross_entropy(z, y, reduction="none")

    def total(self, z, y):
        return F.cross_entropy(z, y, reduction="sum")

    def sample(self, z, generator=None):
        p = torch.softmax(z.detach().float(), dim=-1)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def fisher_factors(self, z):
        p = torch.softmax(z.detach(), dim=-1)  # (m, k)
        k = p.shape[1]
        eye = torch.eye(k, dtype=p.dtype, device=p.device)
        # sqrt(p_c) (e_c - p): Σ_c p_c (e_c - p)(e_c - p)ᵀ = diag(p) - ppᵀ
        return p.sqrt().t().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))

    def fisher_inner(self, z, u, v):
        p = torch.softmax(z.detach(), dim=-1)
        return (p * u * v).sum(-1) - (p * u).sum(-1) * (p * v).sum(-1)

    def check_targets(self, z, y):
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"softmax_cross_entropy targets must be integer class indices, got {y.dtype}")
        if y.shape != z.shape[:1]:
            raise ValueError(
                f"softmax_cross_entropy targets must have shape ({z.shape[0]},) (one class per example), "
                f"got {tuple(y.shape)}"
            )
        if y.numel():
            lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host sync
            if lo < 0 or hi >= z.shape[1]:
                raise ValueError(f"softmax_cross_entropy targets must lie in [0, {z.shape[1]}), got range [{lo}, {hi}]")


class SigmoidCrossEntropy(PredictiveDistribution):
    """Independent Bernoulli over logits z (the paper's autoencoders). Targets in [0, 1], shape (m, k)."""

    name = "sigmoid_cross_entropy"

    def loss(self, z, y):
        return F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)

    def total(self, z, y):
        return F.binary_cross_entropy_with_logits(z, y, reduction="sum")

    def sample(self, z, generator=None):
        p = torch.sigmoid(z.detach())
        return torch.bernoulli(p, generator=generator)

    def fisher_factors(self, z):
        p = torch.sigmoid(z.detach())
        w = (p * (1 - p)).sqrt()  # (m, k)
        k = z.shape[1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        return eye.unsqueeze(1) * w.t().unsqueeze(-1)  # (k, m, k)

    def fisher_inner(self, z, u, v):
        p = torch.sigmoid(z.detach())
        return (p * (1 - p) * u * v).sum(-1)

    def check_targets(self, z, y):
        if not y.is_floating_point():
            raise TypeError(f"sigmoid_cross_entropy targets must be floating point in [0, 1], got {y.dtype}")
        if y.shape != z.shape:
            raise ValueError(f"sigmoid_cross_entropy targets must have the output's shape {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}")
        lo, hi = torch.stack(torch.aminmax(y)).tolist() if y.numel() else (0.0, 1.0)  # one host sync
        if not (0 <= lo and hi <= 1):  # NaN fails too
            raise ValueError("sigmoid_cross_entropy targets must lie in [0, 1] (probabilities/intensities)")


class SquaredError(PredictiveDistribution):
    """Gaussian with unit variance: L = ½‖y − z‖². Targets: floats of the output's shape."""

    name = "squared_error"

    def loss(self, z, y):
        return 0.5 * (y - z).pow(2).sum(-1)

    def sample(self, z, generator=None):
        zd = z.detach()
        return zd + torch.randn(zd.shape, generator=generator, dtype=zd.dtype, device=zd.device)

    def fisher_factors(self, z):
        k = z.shape[1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        return eye.unsqueeze(1).expand(k, z.shape[0], k)

    def fisher_inner(self, z, u, v):
        return (u * v).sum(-1)

    def check_targets(self, z, y):
        if not y.is_floating_point():
            raise TypeError(f"squared_error targets must be floating point, got {y.dtype}")
        if y.shape != z.shape:
            raise ValueError(f"squared_error targets must have the output's shape {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}")


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, SigmoidCrossEntropy, SquaredError)}


def get_loss(loss) -> PredictiveDistribution:
    """A :class:`PredictiveDistribution` from its name (or pass one through)."""
    if isinstance(loss, PredictiveDistribution):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[loss]()


def check_output(z: torch.Tensor, loss: PredictiveDistribution) -> None:
    if z.dim() != 2:
        raise ValueError(f"{loss.name} expects model outputs of shape (m, k), got {tuple(z.shape)}")


