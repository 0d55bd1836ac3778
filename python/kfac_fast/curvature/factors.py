"""Kronecker factors Ā_{i,j} = E[ā_i ā_jᵀ] and G_{i,j} = E[g_i g_jᵀ] (paper Sec 3, 5).

ā_{i-1} is layer i's input with the homogeneous coordinate LAST (when the layer has a bias);
g_i = ∂L(y, z)/∂s_i is the per-example derivative (not scaled by 1/m) with y drawn from the
MODEL's predictive distribution. Expectations average over the batch rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .capture import Recording, capture
from .layers import find_layers
from .losses import PredictiveDistribution, check_output, get_loss

FISHER_KINDS = ("exact", "mc", "empirical")


@dataclass
class KroneckerFactors:
    """Factors of one layer i (shapes: A (a_i, a_i), G (g_i, g_i)).

    A = Ā_{i-1,i-1}, G = G_{i,i}. For the block-tridiagonal inverse also
    A_next = Ā_{i-1,i} (a_i, a_{i+1}) and G_next = G_{i,i+1} (g_i, g_{i+1}); None on the last layer.
    """

    A: torch.Tensor
    G: torch.Tensor
    A_next: Optional[torch.Tensor] = None
    G_next: Optional[torch.Tensor] = None
    name: str = ""
    homogeneous: bool = True


def homogeneous_input(x: torch.Tensor, homogeneous: bool) -> torch.Tensor:
    """ā = [x, 1] (homogeneous coordinate last) as rows; x: (m, d) -> (m, d + 1)."""
    if not homogeneous:
        return x
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def per_example_derivatives(
    rec: Recording,
    z: torch.Tensor,
    loss: PredictiveDistribution,
    *,
    fisher: str,
    targets: Optional[torch.Tensor] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> list[list[torch.Tensor]]:
    """Per-example g_i for each "draw": returns draws[k][layer] of shape (m, d_out), with
    weights folded in so that G = (1/m) Σ_k g_kᵀ g_k.

    ``exact`` enumerates F_R = Σ_k b_k b_kᵀ (one backward per class / output unit),
    ``mc`` samples ``mc_samples`` targets from the model, ``empirical`` uses ``targets``.
    """
    outs = [o for o in rec.outputs]
    draws: list[list[torch.Tensor]] = []
    if fisher == "exact":
        B = loss.fisher_factors(z)  # (K, m, k)
        for k in range(B.shape[0]):
            grads = torch.autograd.grad(z, outs, grad_outputs=B[k], retain_graph=True)
            draws.append([g.reshape(-1, g.shape[-1]) for g in grads])
    elif fisher in ("mc", "empirical"):
        n = mc_samples if fisher == "mc" else 1
        scale = 1.0 / n ** 0.5
        for _ in range(n):
            y = loss.sample(z, generator) if fisher == "mc" else targets
            total = loss.total(z, y)  # sum: per-example derivatives, not scaled by 1/m
            grads = torch.autograd.grad(total, outs, retain_graph=True)
            draws.append([g.reshape(-1, g.shape[-1]) * scale for g in grads])
    else:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    return draws


def kronecker_factors(
    model: nn.Module,
    inputs: torch.Tensor,
    loss,
    *,
    fisher: str = "exact",
    targets: Optional[torch.Tensor] = None,
    mc_samples: int = 1,
    tridiagonal: bool = False,
    generator: Optional[torch.Generator] = None,
) -> list[KroneckerFactors]:
    """Kronecker factors of every supported layer of ``model`` on the batch ``inputs``.

    Args:
        model: network whose trainable parameters all sit in ``nn.Linear`` layers.
        inputs: (m, ...) batch; the expectations average over its m rows.
        loss: ``"softmax_cross_entropy"``, ``"sigmoid_cross_entropy"`` or ``"squared_error"``.
        fisher: ``"exact"`` (expectation over the predictive distribution, one backward per
            output class/unit: for small models), ``"mc"`` (``mc_samples`` sampled targets,
            Sec 5) or ``"empirical"`` (uses ``targets``; not the Fisher, see Sec 5 footnote).
        tridiagonal: also compute the cross factors A_next, G_next (Sec 4.3).
        generator: RNG for ``"mc"``.

    Returns:
        One :class:`KroneckerFactors` per layer, in forward order.
    """
    dist = get_loss(loss)
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs targets=")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    layers = find_layers(model)
    with torch.enable_grad():
        with capture(layers) as rec:
            z = model(inputs)
        check_output(z, dist)
        if fisher == "empirical":
            dist.check_targets(z, targets)
        draws = per_example_derivatives(
            rec, z, dist, fisher=fisher, targets=targets, mc_samples=mc_samples, generator=generator
        )
    order = rec.order
    abar = [homogeneous_input(layers[i].a_rows(rec.inputs[i]), layers[i].factor_spec.homogeneous) for i in order]
    m = abar[0].shape[0]
    gs = [[d[i] for i in order] for d in draws]
    result = []
    for pos, i in enumerate(order):
        A = abar[pos].t() @ abar[pos] / m
        G = sum(g[pos].t() @ g[pos] for g in gs) / m
        f = KroneckerFactors(A=A, G=G, name=layers[i].name, homogeneous=layers[i].factor_spec.homogeneous)
        if tridiagonal and pos + 1 < len(order):
            f.A_next = abar[pos].t() @ abar[pos + 1] / m
            f.G_next = sum(g[pos].t() @ g[pos + 1] for g in gs) / m
        result.append(f)
    return result


def check_factors(factors: Sequence[KroneckerFactors], *, tridiagonal: bool = False) -> None:
    """Validate shapes and finiteness; raise with the layer index/name and the fix."""
    if len(factors) == 0:
        raise ValueError("no factors given: the model has no supported layer")
    for i, f in enumerate(factors):
        label = f"layer {i}" + (f" ({f.name})" if f.name else "")
        for key in ("A", "G"):
            M = getattr(f, key)
            if M.dim() != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(f"{label}: factor {key} must be square, got shape {tuple(M.shape)}")
            if not bool(torch.isfinite(M).all()):
                raise ValueError(f"{label}: factor {key} contains NaN or inf; the activations or "
                                 "back-propagated derivatives that built it were non-finite")
        if tridiagonal and i + 1 < len(factors):
            nxt = factors[i + 1]
            for key, rows, cols in (("A_next", f.A.shape[0], nxt.A.shape[0]), ("G_next", f.G.shape[0], nxt.G.shape[0])):
                M = getattr(f, key)
                if M is None:
                    raise ValueError(f"{label}: {key} is missing; compute factors with tridiagonal=True")
                if tuple(M.shape) != (rows, cols):
                    raise ValueError(f"{label}: {key} must have shape ({rows}, {cols}), got {tuple(M.shape)}")
                if not bool(torch.isfinite(M).all()):
                    raise ValueError(f"{label}: cross factor {key} contains NaN or inf")


def factors_to_dict(f: KroneckerFactors) -> dict:
    """Detached copies of A, G, A_next, G_next (None where absent), for checkpoints."""
    return {k: (None if getattr(f, k) is None else getattr(f, k).detach().clone())
            for k in ("A", "G", "A_next", "G_next")}
