"""Step-size control between K-FAC's direction and your optimizer (used by
:class:`kfac_fast.KFACPreconditioner` at the end of its step).

The preconditioner hands your optimizer u = F̆⁻¹∇ (Sec 4.2) in place of ∇. With a fixed damping
γ and no re-scaling by the exact Fisher (Sec 6.4), u can be 100-1000× the gradient, so the
learning rate that suits ∇ throws the parameters far off. A rule here turns u into the tensor
your optimizer receives, per Kronecker/norm block i (the block's (g_dim, a_dim) matrix, weights
and bias together):

  * :class:`Graft` (default): u_i · ‖∇_i‖ / ‖u_i‖: each block's step keeps the norm your
    optimizer's own rule gives it and takes its direction from K-FAC (grafting, as Distributed
    Shampoo grafts its direction onto a first-order method's per-layer norm). With SGD (with or
    without momentum) the base step on block i has norm lr·‖∇_i‖, so the usual SGD learning rate
    carries over. Adam's update is invariant to the scale of what it receives per coordinate, so
    under Adam the graft only keeps its moment estimates on the gradient's scale (ε keeps its
    meaning).
  * :class:`KLClip`: the whole of u scaled by ν = min(1, sqrt(κ / (lr² Σ_i ∇_iᵀ u_i))) (KAISA's
    ``kl_clip``, Ba et al. 2017): lr² ∇ᵀF̆⁻¹∇ is the KL change K-FAC's own quadratic model
    predicts for the step lr·u, and ν caps it at κ.
  * ``None``: u unchanged (the learning rate then needs tuning for K-FAC alone).

No rule reads the host: the factors stay on the device (no synchronisation per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

#: norms below this are treated as zero (a block with no gradient keeps a zero step)
TINY = 1e-30


@dataclass(frozen=True)
class Graft:
    """Each block's step takes its norm from the gradient, its direction from K-FAC:
    .grad_i ← u_i · ‖∇_i‖_F / ‖u_i‖_F (a zero u_i stays zero).

    Shapes: ``grads`` and ``directions`` are per-block (g_dim, a_dim) matrices (Sec 2.1).
    """

    def apply(self, grads: Sequence[torch.Tensor], directions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        directions = list(directions)
        if not directions:
            return []
        # the norms of all blocks in two fused calls (one kernel per device and dtype)
        gn = torch._foreach_norm([g.to(u.dtype) for g, u in zip(grads, directions)])
        un = torch._foreach_norm(directions)
        return [u * (a / b.clamp_min(TINY)) for u, a, b in zip(directions, gn, un)]

    def describe(self) -> str:
        return "graft: per-block norm of the gradient, direction of K-FAC"


LR = Union[float, Callable[[], float], "torch.optim.Optimizer"]


@dataclass(frozen=True)
class KLClip:
    """Scale every block's u by ν = min(1, sqrt(κ / (lr² Σ_i ⟨∇_i, u_i⟩))) (KAISA's ``kl_clip``).

    Args:
        kappa: κ > 0, the largest KL change (K-FAC's model) one step may make; KAISA's default 1e-3.
        lr: your optimizer's learning rate: a number, a callable returning it, or the optimizer
            (its first parameter group's ``lr`` is read at every step, so schedulers apply).
    """

    kappa: float = 1e-3
    lr: Optional[LR] = None

    def __post_init__(self):
        if not (isinstance(self.kappa, (int, float)) and self.kappa > 0 and math.isfinite(self.kappa)):
            raise ValueError(f"KLClip kappa must be a positive finite number, got {self.kappa!r}")
        if self.lr is None:
            raise ValueError("KLClip needs your optimizer's learning rate: KLClip(lr=optimizer) (read every step), "
                             "lr=0.1 or lr=lambda: scheduler.get_last_lr()[0]")

    def current_lr(self) -> float:
        lr = self.lr
        if isinstance(lr, torch.optim.Optimizer):
            return float(lr.param_groups[0]["lr"])
        return float(lr() if callable(lr) else lr)

    def apply(self, grads: Sequence[torch.Tensor], directions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lr = self.current_lr()
        vg = sum((g.to(u.dtype) * u).sum() for g, u in zip(grads, directions)) * (lr * lr)
        # ∇ᵀF̆⁻¹∇ ≥ 0 for a positive definite F̆; its rounding error can make it ≤ 0: no clip then
        nu = torch.where(vg > 0, (self.kappa / vg.clamp_min(TINY)).sqrt().clamp(max=1.0), torch.ones_like(vg))
        return [u * nu for u in directions]

    def describe(self) -> str:
        return f"kl_clip kappa={self.kappa:g}"


StepSize = Union[Graft, KLClip, None]
RULES = (Graft, KLClip)


def check_step_size(rule) -> StepSize:
    """``rule`` validated: a :class:`Graft`, a :class:`KLClip` or None."""
    if rule is None or isinstance(rule, RULES):
        return rule
    raise ValueError(f"step_size must be kfac_fast.step_size.Graft(), KLClip(kappa=..., lr=optimizer) or None, "
                     f"got {rule!r}")


def apply_step_size(rule: StepSize, grads: Sequence[torch.Tensor], directions: Sequence[torch.Tensor]) -> list:
    """The tensors your optimizer receives: ``directions`` (u_i = F̆⁻¹∇ per block) under ``rule``."""
    return list(directions) if rule is None else rule.apply(grads, directions)
