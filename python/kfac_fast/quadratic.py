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

    from torch.nn.attention import SDPBackend, sdpa_kernel

    args, kwargs = call_args(inputs)
    # the fused CPU/CUDA attention kernels have no forward-mode derivative; the math backend
    # (softmax and matmuls) has, and gives the same z
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
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


def solve_alpha_mu_t(gram: torch.Tensor, dots: torch.Tensor, grads_dot: torch.Tensor, damping, *,
                     mu_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α, µ minimising M(αΔ + µδ₀) subject to |µ| ≤ ``mu_max``, as 0-d tensors on the inputs'
    device: every case is a ``torch.where`` selection, so the host never reads a value (the
    sync-free step). Returns (α, µ, M(δ) − M(0)).

    Args:
        gram: (k, k) exact-Fisher quadratic forms of [Δ, δ₀] (k = 1 without momentum).
        dots: (k, k) Euclidean inner products of the same vectors.
        grads_dot: (k,) ∇hᵀΔ, ∇hᵀδ₀.
        damping: λ + η (a float or a 0-d tensor).
        mu_max: bound on |µ| (the paper has none: ``math.inf``). With Q = Γ + (λ+η)D positive
            definite, min over α of M is a convex quadratic in µ, so the constrained optimum
            clips µ to [−mu_max, mu_max] and re-solves α: α = −(b₀ + Q₀₁µ)/Q₀₀.

    Cases, in order: the 2×2 solve (Cramer's rule) when det Q > 1e-12·Q₀₀Q₁₁; else (Δ ∥ δ₀, or
    δ₀ = 0 after a rejected step) α alone, α = −b₀/Q₀₀; α = µ = M = 0 when Q₀₀ is not a positive
    finite number (M's curvature along Δ is unusable).
    """
    Q = gram + damping * dots
    b = grads_dot
    q00, b0 = Q[0, 0], b[0]
    one_ok = (q00 > 0) & torch.isfinite(q00)
    a1 = torch.where(one_ok, -b0 / q00, torch.zeros_like(q00))
    alpha, mu, M = a1, torch.zeros_like(a1), 0.5 * a1 * b0
    if Q.shape[0] == 2:
        q01, q10, q11, b1 = Q[0, 1], Q[1, 0], Q[1, 1], b[1]
        det = q00 * q11 - q01 * q10
        two_ok = (det > 1e-12 * (q00 * q11)) & torch.isfinite(det)
        a2 = -(q11 * b0 - q01 * b1) / det
        m2 = -(q00 * b1 - q10 * b0) / det
        # |µ| > mu_max: clip µ, re-solve α on the line (M is convex in µ there)
        clip = m2.abs() > mu_max
        mu_c = torch.where(clip, torch.sign(m2) * min(mu_max, 1e300), m2)
        a_c = torch.where(clip, -(b0 + q01 * mu_c) / q00, a2)
        M2 = torch.where(clip, 0.5 * (q00 * a_c * a_c + 2 * q01 * a_c * mu_c + q11 * mu_c * mu_c) + b0 * a_c + b1 * mu_c,
                         0.5 * (b0 * a2 + b1 * m2))
        alpha = torch.where(two_ok, a_c, alpha)
        mu = torch.where(two_ok, mu_c, mu)
        M = torch.where(two_ok, M2, M)
    return alpha, mu, M


def solve_alpha_mu(gram: torch.Tensor, dots: torch.Tensor, grads_dot: torch.Tensor, damping: float, *,
                   mu_max: float = math.inf) -> QuadraticSolution:
    """:func:`solve_alpha_mu_t` with the result on the host (a :class:`QuadraticSolution`)."""
    alpha, mu, M = torch.stack(solve_alpha_mu_t(gram, dots, grads_dot, damping, mu_max=mu_max)).tolist()
    return QuadraticSolution(alpha=alpha, mu=mu, M=M)
