"""The exact-Fisher quadratic model M(δ) (paper Sec 6.4, 7) and Appendix C.

M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇hᵀδ + h(θ), with F estimated on a mini-batch. Quadratic forms
uᵀFv are computed as (Ju)ᵀ F_R (Jv) from Jacobian-vector products (forward-mode AD), never
a full F·v (Appendix C).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


from ._sequential_jvp import sequential_jvp, sequential_plan
from .batch import buffers_kept, call_args
from .curvature.blocks import CurvatureBlock
from .curvature.losses import PredictiveDistribution, rows


def linearized_forward(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                       direction: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, J·v) for a parameter direction v given as per-block (g_dim, a_dim) matrices.

    Forward-mode AD through the model (Appendix C: "a linearized version of the standard
    forward pass"), see :func:`linearized_forward_many`.
    """
    z, (jv,) = linearized_forward_many(model, layers, inputs, [direction])
    return z, jv


def _dual_forward(model: nn.Module, layers: Sequence[CurvatureBlock], inputs, direction, names: dict) -> tuple:
    """(z, J·v) with every block parameter a dual tensor (``functional_call``): works for any
    block kind and any model, one pass per direction. ``names``: parameter id -> name."""
    import torch.autograd.forward_ad as fwAD

    args, kwargs = call_args(inputs)
    with torch.no_grad(), fwAD.dual_level():
        params = {}
        for layer, D in zip(layers, direction):
            for p, t in zip(layer.params(), layer.from_matrix(D)):
                params[names[id(p)]] = fwAD.make_dual(p.detach(), t.to(p.dtype).reshape(p.shape))
        out = torch.func.functional_call(model, params, args, kwargs, strict=False)
        z, jv = fwAD.unpack_dual(out)
        if jv is None:
            jv = torch.zeros_like(z)
        return z.clone(), jv.clone()


def linearized_forward_many(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                            directions: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, [J·v_1, …, J·v_n]): one linearized forward pass per direction (Appendix C).

    Every block parameter enters ``torch.func.functional_call`` as a dual tensor whose tangent
    is the direction's block (``block.from_matrix``), so the result is the exact Jacobian-vector
    product of the model as it computes, for every block kind and any model: modules applied
    to inputs shared by the whole batch (a position embedding on ``arange(T)``), BatchNorm in
    training mode, parameters without a module. (Stacking the n directions as n copies of the
    batch would pay the per-operation overhead once, but silently mixes the copies' tangents
    in exactly those cases.) Plain ``nn.Sequential`` networks of Linear layers and elementwise
    activations take a hand-written path with the same result (:mod:`kfac_fast._sequential_jvp`).
    ``inputs`` is a batch (tensor, tuple or dict); module buffers are left as they were.
    """
    n = len(directions)
    if n == 0:
        raise ValueError("linearized_forward_many needs at least one direction")
    if isinstance(inputs, torch.Tensor):
        plan = sequential_plan(model, layers)
        if plan is not None:
            fast = sequential_jvp(plan, layers, inputs, directions)
            if fast is not None:
                return fast
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    with buffers_kept(model):
        zs = [_dual_forward(model, layers, inputs, d, names) for d in directions]
    return zs[0][0], [jv for _, jv in zs]


def fisher_gram(
    model: nn.Module,
    layers: Sequence[CurvatureBlock],
    inputs,
    loss: PredictiveDistribution,
    directions: Sequence[Sequence[torch.Tensor]],
    *,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gram matrix Γ_ab = v_aᵀ F v_b (F = mini-batch exact Fisher of the mean loss on ``inputs``).

    One forward-mode pass for all directions together gives every J v_a; every entry is then
    (Jv_a)ᵀ F_R (Jv_b), averaged over the N loss terms (Appendix C): the rows of (m, ..., k)
    outputs, without the terms ``targets`` marks as ignored. Returns a (n, n) float64 tensor on
    the inputs' device.
    """
    z, Jv = linearized_forward_many(model, layers, inputs, directions)
    zz = rows(z)
    Jv = [rows(jv) for jv in Jv]
    n = len(directions)
    mask = loss.mask(targets)
    w = None if mask is None else mask.to(torch.float64)
    # all entries stay on the device: the caller moves the whole Gram matrix in one transfer
    vals = {}
    for a in range(n):
        for b in range(a, n):
            e = loss.fisher_inner(zz, Jv[a], Jv[b]).double()
            vals[a, b] = vals[b, a] = e.mean() if w is None else (e * w).sum() / w.sum().clamp_min(1)
    return torch.stack([torch.stack([vals[a, b] for b in range(n)]) for a in range(n)])


def inner(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i <u_i, v_i> over layers (each dot in the tensors' dtype), as a float64 0-d tensor."""
    return sum(torch.dot(a.reshape(-1), b.reshape(-1)).double() for a, b in zip(u, v))


@dataclass
class QuadraticSolution:
    """Minimiser of M over span{Δ, δ₀} (Sec 7) or over αΔ (Sec 6.4)."""

    alpha: float
    mu: float
    M: float  # M(δ) − M(0) = ½ ∇hᵀδ at the optimum


def solve_alpha_mu(gram: torch.Tensor, dots: torch.Tensor, grads_dot: torch.Tensor, damping: float, *,
                   mu_max: float = math.inf) -> QuadraticSolution:
    """α, µ minimising M(αΔ + µδ₀) subject to |µ| ≤ ``mu_max``.

    Args:
        gram: (k, k) exact-Fisher quadratic forms of [Δ, δ₀] (k = 1 without momentum).
        dots: (k, k) Euclidean inner products of the same vectors.
        grads_dot: (k,) ∇hᵀΔ, ∇hᵀδ₀.
        damping: λ + η.
        mu_max: bound on |µ| (the paper has none: ``math.inf``). With Q = Γ + (λ+η)D positive
            definite, min over α of M is a convex quadratic in µ, so the constrained optimum
            clips µ to [−mu_max, mu_max] and re-solves α: α = −(b₀ + Q₀₁µ)/Q₀₀.
    """
    Q = gram + damping * dots
    b = grads_dot
    k = Q.shape[0]
    if k == 2:
        det = float(Q[0, 0] * Q[1, 1] - Q[0, 1] * Q[1, 0])
        if det > 1e-12 * float(Q[0, 0] * Q[1, 1]) and math.isfinite(det):
            sol = -torch.linalg.solve(Q, b)
            alpha, mu = float(sol[0]), float(sol[1])
            if abs(mu) <= mu_max:
                return QuadraticSolution(alpha=alpha, mu=mu, M=0.5 * float(b @ sol))
            mu = math.copysign(mu_max, mu)
            q00, q01, q11 = float(Q[0, 0]), float(Q[0, 1]), float(Q[1, 1])
            b0, b1 = float(b[0]), float(b[1])
            alpha = -(b0 + q01 * mu) / q00
            M = 0.5 * (q00 * alpha * alpha + 2 * q01 * alpha * mu + q11 * mu * mu) + b0 * alpha + b1 * mu
            return QuadraticSolution(alpha=alpha, mu=mu, M=M)
        # Δ ∥ δ₀ (or δ₀ = 0): fall back to α alone
        Q, b = Q[:1, :1], b[:1]
    q = float(Q[0, 0])
    if not (q > 0) or not math.isfinite(q):
        return QuadraticSolution(alpha=0.0, mu=0.0, M=0.0)
    alpha = -float(b[0]) / q
    return QuadraticSolution(alpha=alpha, mu=0.0, M=0.5 * alpha * float(b[0]))
