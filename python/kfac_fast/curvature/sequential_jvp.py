"""Fast path of the linearized forward pass (Appendix C) for plain feed-forward networks.

For an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (the networks of
the paper's experiments) the Jacobian-vector products J·v_1 … J·v_n are propagated by hand:

    s = W x + b,          T_j ← T_j Wᵀ + x D_jᵀ (+ d_j)       (one GEMM for all j each)
    y = φ(s),             T_j ← φ'(s) ⊙ T_j

so the primal is computed once for all n directions, the n tangent products through W are one
GEMM over the stacked tangents, and the n products x D_jᵀ are one GEMM against the stacked
directions. Anything else (other module types, hooks, non-2-D inputs) returns ``None`` and the
caller (:mod:`kfac_fast.curvature.linearize`) uses another J·v provider, which gives the same
numbers.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# φ'(s) from (s, φ(s)), exact for each activation
_DERIVATIVE: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Sigmoid: lambda s, y: y * (1 - y),
    nn.Tanh: lambda s, y: 1 - y * y,
    nn.ReLU: lambda s, y: (s > 0).to(y.dtype),
    nn.Identity: None,  # type: ignore[dict-item]
}


def _passive(hook) -> bool:
    """A hook kfac_fast installs that only records its arguments and never changes the forward
    (``RecordedBatch``): the hand-written pass may skip it."""
    return getattr(hook, "kfac_fast_passive", False)


def _plain(m: nn.Module) -> bool:
    return not (m._forward_hooks or any(not _passive(h) for h in m._forward_pre_hooks.values())
                or getattr(m, "_forward_hooks_with_kwargs", None))


def sequential_plan(model: nn.Module, layers: Sequence) -> Optional[list]:
    """[(kind, module, layer index or None)] when the fast path applies, else None."""
    if type(model) is not nn.Sequential or not _plain(model):
        return None
    by_module = {id(l.module): i for i, l in enumerate(layers)}
    plan, seen = [], 0
    for m in model:
        if not _plain(m):
            return None
        if type(m) is nn.Linear and id(m) in by_module:
            plan.append(("linear", m, by_module[id(m)]))
            seen += 1
        elif type(m) in _DERIVATIVE:
            if type(m) is nn.ReLU and m.inplace:
                return None
            plan.append(("act", m, None))
        else:
            return None
    return plan if seen == len(layers) else None


def sequential_jvp(plan: list, layers: Sequence, inputs: torch.Tensor,
                   directions: Sequence[Sequence[torch.Tensor]]) -> Optional[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(z, [J v_j]) for the plan from :func:`sequential_plan`; None for non-2-D inputs."""
    if inputs.dim() != 2:
        return None
    n = len(directions)
    r = inputs.shape[0]
    x = inputs
    T: Optional[torch.Tensor] = None  # (n·r, width): tangent j in rows j·r … (j+1)·r − 1
    with torch.no_grad():
        for kind, m, li in plan:
            if kind == "linear":
                layer = layers[li]
                s = F.linear(x, m.weight, m.bias)
                dt = s.dtype
                # x D_jᵀ (+ d_j) for all j: one GEMM against the directions stacked by rows
                Dw = torch.cat([d[li][:, : layer.d_in] for d in directions]).to(dt)  # (n·d_out, d_in)
                extra = (x.to(dt) @ Dw.t()).view(r, n, -1)
                if layer.has_bias:
                    extra = extra + torch.stack([d[li][:, layer.d_in] for d in directions]).to(dt)
                extra = extra.transpose(0, 1).reshape(n * r, -1)
                T = extra if T is None else torch.addmm(extra, T.to(dt), m.weight.to(dt).t())
                x = s
            else:
                y = m(x)
                if T is not None and _DERIVATIVE[type(m)] is not None:
                    w = T.shape[1]
                    T = (T.view(n, r, w) * _DERIVATIVE[type(m)](x, y).to(T.dtype)).view(n * r, w)
                x = y
    z = x
    if T is None:
        T = torch.zeros(n * r, z.shape[1], dtype=z.dtype, device=z.device)
    return z, list(T.view(n, r, -1).unbind(0))
