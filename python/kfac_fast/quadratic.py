"""The exact-Fisher quadratic model M(δ) (paper Sec 6.4, 7) and Appendix C.

M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇hᵀδ + h(θ), with F estimated on a mini-batch. Quadratic forms
uᵀFv are computed as (Ju)ᵀ F_R (Jv) from Jacobian-vector products (forward-mode AD), never
a full F·v (Appendix C).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp

from .curvature.layers import LinearLayer
from .curvature.losses import PredictiveDistribution


def directions_to_tangents(layers: Sequence[LinearLayer], direction: Sequence[torch.Tensor], names: dict):
    """Per-layer (d_out, d_in+h) matrices -> {param_name: tangent} for functional_call."""
    tangents = {}
    for layer, D in zip(layers, direction):
        parts = layer.from_matrix(D)
        for p, t in zip(layer.params(), parts):
            tangents[names[p]] = t.to(p.dtype).reshape(p.shape)
    return tangents


def fisher_gram(
    model: nn.Module,
    layers: Sequence[LinearLayer],
    inputs: torch.Tensor,
    loss: PredictiveDistribution,
    directions: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """Gram matrix Γ_ab = v_aᵀ F v_b (F = mini-batch exact Fisher of the mean loss on ``inputs``).

    One forward-mode pass per direction gives J v_a; every entry is then (Jv_a)ᵀ F_R (Jv_b),
    averaged over the rows (Appendix C). Returns a (n, n) float64 tensor.
    """
    names = {p: n for n, p in model.named_parameters()}
    params = {names[p]: p.detach() for layer in layers for p in layer.params()}
    Jv = []
    z = None
    for d in directions:
        tangents = directions_to_tangents(layers, d, names)
        with torch.no_grad():
            z, jv = jvp(lambda p: functional_call(model, p, (inputs,), strict=False), (params,), (tangents,))
        Jv.append(jv.reshape(jv.shape[0], -1) if jv.dim() != 2 else jv)
    n = len(directions)
    gram = torch.zeros(n, n, dtype=torch.float64)
    zz = z.reshape(z.shape[0], -1) if z.dim() != 2 else z
    for a in range(n):
        for b in range(a, n):
            val = loss.fisher_inner(zz, Jv[a], Jv[b]).double().mean()
            gram[a, b] = val
            gram[b, a] = val
    return gram


def inner(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i <u_i, v_i> over layers (each dot in the tensors' dtype), as a float64 0-d tensor."""
    return sum(torch.dot(a.reshape(-1), b.reshape(-1)).double() for a, b in zip(u, v))


@dataclass
class QuadraticSolution:
    """Minimiser of M over span{Δ, δ₀} (Sec 7) or over αΔ (Sec 6.4)."""

    alpha: float
    mu: float
    M: float  # M(δ) − M(0) = ½ ∇hᵀδ at the optimum


def solve_alpha_mu(gram: torch.Tensor, dots: torch.Tensor, grads_dot: torch.Tensor, damping: float) -> QuadraticSolution:
    """α, µ minimising M(αΔ + µδ₀).

    Args:
        gram: (k, k) exact-Fisher quadratic forms of [Δ, δ₀] (k = 1 without momentum).
        dots: (k, k) Euclidean inner products of the same vectors.
        grads_dot: (k,) ∇hᵀΔ, ∇hᵀδ₀.
        damping: λ + η.
    """
    Q = gram + damping * dots
    b = grads_dot
    k = Q.shape[0]
    if k == 2:
        det = float(Q[0, 0] * Q[1, 1] - Q[0, 1] * Q[1, 0])
        if det > 1e-12 * float(Q[0, 0] * Q[1, 1]) and math.isfinite(det):
            sol = -torch.linalg.solve(Q, b)
            M = 0.5 * float(b @ sol)
            return QuadraticSolution(alpha=float(sol[0]), mu=float(sol[1]), M=M)
        # Δ ∥ δ₀ (or δ₀ = 0): fall back to α alone
        Q, b = Q[:1, :1], b[:1]
    q = float(Q[0, 0])
    if not (q > 0) or not math.isfinite(q):
        return QuadraticSolution(alpha=0.0, mu=0.0, M=0.0)
    alpha = -float(b[0]) / q
    return QuadraticSolution(alpha=alpha, mu=0.0, M=0.5 * alpha * float(b[0]))
