"""The exact-Fisher quadratic model M(δ) (paper Sec 6.4, 7) and Appendix C.

M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇hᵀδ + h(θ), with F estimated on a mini-batch. Quadratic forms
uᵀFv are computed as (Ju)ᵀ F_R (Jv) from Jacobian-vector products (the J·v providers of
:mod:`kfac_fast.curvature.linearize`), never a full F·v (Appendix C).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


from .curvature import linearize
from .curvature.blocks import CurvatureBlock
from .curvature.losses import PredictiveDistribution, rows


def linearized_forward(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                       direction: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, J·v) for a parameter direction v given as per-block (g_dim, a_dim) matrices
    (Appendix C: "a linearized version of the standard forward pass"), see
    :func:`linearized_forward_many`."""
    z, (jv,) = linearized_forward_many(model, layers, inputs, [direction])
    return z, jv


def linearized_forward_many(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                            directions: Sequence[Sequence[torch.Tensor]], *,
                            provider: Optional[str] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, [J·v_1, …, J·v_n]): the model output on ``inputs`` (m, ..., k) and its exact
    Jacobian-vector products with n parameter directions, each given as one (g_dim, a_dim)
    matrix per block (Appendix C).

    The products come from the J·v provider chosen for the model
    (:func:`kfac_fast.curvature.linearize.jvp`): the hand-written ``nn.Sequential`` MLP path,
    forward-mode AD, forward-mode AD with attention on its math backend, or reverse-over-reverse,
    all with the same result (``provider`` names one to force it; None: the per-model choice).
    ``inputs`` is a batch (tensor, tuple or dict); module buffers are
    left as they were. z and J·v come in the dtype the model computes in (under autocast, its
    low-precision dtype): :func:`fisher_gram` takes them to float32 or wider.
    """
    return linearize.jvp(model, layers, inputs, directions, provider=provider)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Outputs and tangents enter F_R and the quadratic forms in float32 (or float64): under
    autocast the model computes them in bfloat16 / float16."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def fisher_gram(
    model: nn.Module,
    layers: Sequence[CurvatureBlock],
    inputs,
    loss: PredictiveDistribution,
    directions: Sequence[Sequence[torch.Tensor]],
    *,
    targets: Optional[torch.Tensor] = None,
    provider: Optional[str] = None,
) -> torch.Tensor:
    """Gram matrix Γ_ab = v_aᵀ F v_b (F = mini-batch exact Fisher of the mean loss on ``inputs``).

    One linearized pass (:func:`linearized_forward_many`) gives every J v_a; every entry is then
    (Jv_a)ᵀ F_R (Jv_b), averaged over the N loss terms (Appendix C): the rows of (m, ..., k)
    outputs, without the terms ``targets`` marks as ignored. z and J v_a enter F_R in float32 or
    wider (the model's pass itself runs under the caller's autocast, if any). Returns a (n, n)
    float64 tensor on the inputs' device. ``provider``: the J·v provider to force (a name from
    :data:`kfac_fast.curvature.linearize.PROVIDERS`); None uses the one chosen for the model.
    """
    z, Jv = linearized_forward_many(model, layers, inputs, directions, provider=provider)
    zz = rows(_at_least_fp32(z))
    Jv = [rows(_at_least_fp32(jv)) for jv in Jv]
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
    """Σ_i <u_i, v_i> over layers, as a float64 0-d tensor: each dot in the wider of the two
    tensors' dtypes and at least float32 (a 16-bit block, e.g. from a bf16 model, is widened)."""
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return torch.dot(a.reshape(-1).to(dt), b.reshape(-1).to(dt)).double()

    return sum(dot(a, b) for a, b in zip(u, v))


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
