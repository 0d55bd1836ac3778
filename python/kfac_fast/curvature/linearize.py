"""J·v for the exact-Fisher products: the linearized forward pass of Appendix C, from a provider.

The quadratic model M(δ) that picks α and µ (Sec 6.4, 7) and predicts the reduction that ρ
compares with (Sec 6.5) needs uᵀFv = (Ju)ᵀ F_R (Jv) for a few parameter directions: the
Jacobian-vector products J·v of the network's output z with respect to its parameters. Several
ways compute the same J·v, and not every model admits every way:

``"sequential"``
    hand-written tangent propagation for plain ``nn.Sequential`` MLPs
    (:mod:`kfac_fast.curvature.sequential_jvp`): one primal pass for all directions, one GEMM per layer
    for all tangents.
``"forward"``
    forward-mode AD, every block parameter a dual tensor, one pass per direction; fails on
    operations without a forward derivative, e.g. the fused attention kernels behind
    ``F.scaled_dot_product_attention``.
``"forward_math"``
    forward-mode AD inside ``sdpa_kernel(SDPBackend.MATH)``: attention is computed by its
    composite (matmul, softmax) form, which has one.
``"reverse_over_reverse"``
    J·v = ∂⟨Jᵀu, v⟩/∂u: a reverse pass with graph for u ↦ Jᵀu, then one double-backward per
    direction (inside ``sdpa_kernel(MATH)`` too: the fused kernels have no double-backward
    either); for operations with a backward but no forward derivative (``autograd.Function``
    without ``jvp``, ``nn.MultiheadAttention``'s inference fast path).

:func:`jvp` picks one per model, once: ``"sequential"`` where it applies, else the first of
``"forward"``, ``"forward_math"``, ``"reverse_over_reverse"`` that does not fail for want of a
derivative (benchmarks/bench_jvp_paths.py, CPU: with the 1-2 directions K-FAC uses, forward
mode is 1.1-2.5x cheaper than reverse-over-reverse where it works). Every provider returns the
model's own output z as the same call computes it (under the caller's autocast, if any) and
leaves module buffers as they were.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .sequential_jvp import sequential_jvp, sequential_plan
from ..batch import buffers_kept, call_args, model_output
from .blocks import CurvatureBlock

#: (z, [J·v_1, …, J·v_n]) from (model, blocks, inputs, directions)
Provider = Callable[[nn.Module, Sequence[CurvatureBlock], object, Sequence[Sequence[torch.Tensor]]],
                    Optional[tuple[torch.Tensor, list[torch.Tensor]]]]

#: the general providers in the order :func:`jvp` tries them
FALLBACK_ORDER = ("forward", "forward_math", "reverse_over_reverse")

# model -> name of the general provider chosen for it (decided on its first linearized pass)
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()

# an operation without the derivative a provider needs: torch raises NotImplementedError for a
# missing forward derivative, RuntimeError for a missing double-backward
_MISSING_DERIVATIVE = ("forward ad", "derivative for", "not implemented", "does not support")


def _math_attention():
    """``sdpa_kernel(MATH)``: scaled_dot_product_attention by its composite form, which has
    forward and double-backward derivatives (the fused CPU/CUDA kernels have neither)."""
    return sdpa_kernel(SDPBackend.MATH)


_JVP_DECOMPOSITIONS_LOADED = False


def _load_jvp_decompositions() -> None:
    """Import torch's forward-AD decompositions once, without the ``torch.jit.script is
    deprecated`` warning their registration emits (torch's own code; ``make_dual`` imports them
    on first use)."""
    global _JVP_DECOMPOSITIONS_LOADED
    if not _JVP_DECOMPOSITIONS_LOADED:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated",
                                    category=DeprecationWarning)
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        _JVP_DECOMPOSITIONS_LOADED = True


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def _tangents(layer: CurvatureBlock, D: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, its part of the (g_dim, a_dim) direction D in the parameter's shape and dtype)."""
    return [(p, t.to(p.dtype).reshape(p.shape)) for p, t in zip(layer.params(), layer.from_matrix(D))]


def sequential(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
               directions: Sequence[Sequence[torch.Tensor]]) -> Optional[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The ``nn.Sequential`` MLP fast path, or None where it does not apply (another model
    structure, hooks, inputs that are not one 2-D tensor)."""
    if not isinstance(inputs, torch.Tensor):
        return None
    plan = sequential_plan(model, layers)
    return None if plan is None else sequential_jvp(plan, layers, inputs, directions)


def _dual_pass(model: nn.Module, layers: Sequence[CurvatureBlock], inputs, direction, names: dict) -> tuple:
    import torch.autograd.forward_ad as fwAD

    args, kwargs = call_args(inputs)
    with torch.no_grad(), fwAD.dual_level():
        params = {}
        for layer, D in zip(layers, direction):
            for p, t in _tangents(layer, D):
                params[names[id(p)]] = fwAD.make_dual(p.detach(), t)
        out = model_output(torch.func.functional_call(model, params, args, kwargs, strict=False))
        z, jv = fwAD.unpack_dual(out)
        if jv is None:
            jv = torch.zeros_like(z)
        return z.clone(), jv.clone()


def forward(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
            directions: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward-mode AD: one pass of ``torch.func.functional_call`` per direction with every
    block parameter a dual tensor whose tangent is the direction's block. Exact for every block
    kind and any model structure (shared inputs such as ``arange(T)`` position embeddings,
    BatchNorm in training mode, parameters without a module)."""
    _load_jvp_decompositions()
    names = _names(model)
    with buffers_kept(model):
        zs = [_dual_pass(model, layers, inputs, d, names) for d in directions]
    return zs[0][0], [jv for _, jv in zs]


def forward_math(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                 directions: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`forward` with ``scaled_dot_product_attention`` on its math backend."""
    with _math_attention():
        return forward(model, layers, inputs, directions)


def reverse_over_reverse(model: nn.Module, layers: Sequence[CurvatureBlock], inputs,
                         directions: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """J·v without forward-mode AD: g(u) = Jᵀu by a reverse pass that keeps its graph, then
    J·v = ∂⟨g(u), v⟩/∂u by one more backward per direction (g is linear in u, so u = 0 serves).
    Cost: one forward, one backward with graph, n double-backwards."""
    names = _names(model)
    args, kwargs = call_args(inputs)
    with buffers_kept(model), torch.enable_grad(), _math_attention():
        params, leaves = {}, []
        for layer in layers:
            for p in layer.params():
                leaf = p.detach().requires_grad_(True)
                params[names[id(p)]] = leaf
                leaves.append(leaf)
        out = model_output(torch.func.functional_call(model, params, args, kwargs, strict=False))
        z = out.detach()
        if not out.requires_grad:  # the output does not depend on the block parameters
            return z, [torch.zeros_like(z) for _ in directions]
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        Jv = []
        for n, direction in enumerate(directions):
            tangents = [t for layer, D in zip(layers, direction) for _, t in _tangents(layer, D)]
            jv = None
            if live:
                (jv,) = torch.autograd.grad([g[i] for i in live], u, [tangents[i] for i in live],
                                            retain_graph=n + 1 < len(directions), allow_unused=True)
            Jv.append(torch.zeros_like(z) if jv is None else jv.detach())
        return z, Jv


PROVIDERS: dict[str, Provider] = {
    "sequential": sequential,
    "forward": forward,
    "forward_math": forward_math,
    "reverse_over_reverse": reverse_over_reverse,
}


def _missing_derivative(err: BaseException) -> bool:
    if isinstance(err, NotImplementedError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and any(s in msg for s in _MISSING_DERIVATIVE)


def chosen(model: nn.Module) -> Optional[str]:
    """The general provider :func:`jvp` settled on for ``model`` (None before its first
    linearized pass, and for models that always take the ``"sequential"`` path)."""
    return _CHOSEN.get(model)


def provider_for(model: nn.Module, layers: Sequence[CurvatureBlock], inputs) -> str:
    """The name of the provider :func:`jvp` uses for this call: ``"sequential"`` where the fast
    path applies, else the one chosen for the model (``"forward"`` before any failure)."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and sequential_plan(model, layers) is not None:
        return "sequential"
    return _CHOSEN.get(model, FALLBACK_ORDER[0])


def jvp(model: nn.Module, layers: Sequence[CurvatureBlock], inputs, directions: Sequence[Sequence[torch.Tensor]],
        *, provider: Optional[str] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, [J·v_1, …, J·v_n]): the model output on ``inputs`` and its Jacobian-vector products
    with the parameter directions (Appendix C).

    Args:
        model: the network; its blocks' parameters are the ones the directions move.
        layers: the curvature blocks, in the order of each direction's entries.
        inputs: a batch (tensor, tuple or dict) with m examples along dim 0.
        directions: n directions, each a list with one (g_dim, a_dim) matrix per block.
        provider: a name from :data:`PROVIDERS` to force one; None picks per model: the
            ``"sequential"`` fast path where it applies, else the provider chosen for this model,
            decided on its first call by trying :data:`FALLBACK_ORDER` until one does not fail
            for want of a derivative.

    Returns:
        z: the model output (m, ..., k) in the dtype the model computes it in; J·v: n tensors
        shaped like z. Module buffers are left as they were.

    Raises:
        ValueError: no direction, or an unknown provider name.
        NotImplementedError: every provider lacks a derivative of some operation in the model.
    """
    if not directions:
        raise ValueError("the linearized forward pass needs at least one direction")
    if provider is not None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown J·v provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        out = PROVIDERS[provider](model, layers, inputs, directions)
        if out is None:
            raise ValueError(f"the {provider!r} provider does not apply to this model or batch (it takes a plain "
                             "nn.Sequential of Linear layers and elementwise activations on 2-D inputs); "
                             "use provider=None to choose automatically")
        return out
    fast = sequential(model, layers, inputs, directions)
    if fast is not None:
        return fast
    start = _CHOSEN.get(model)
    order = FALLBACK_ORDER[FALLBACK_ORDER.index(start):] if start is not None else FALLBACK_ORDER
    errors = []
    for name in order:
        try:
            out = PROVIDERS[name](model, layers, inputs, directions)
        except (NotImplementedError, RuntimeError) as err:
            if not _missing_derivative(err):
                raise
            errors.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        _CHOSEN[model] = name
        return out
    raise NotImplementedError(
        "no J·v provider can differentiate this model (the exact-Fisher products for α, µ and ρ need J·v):\n  "
        + "\n  ".join(errors)
        + "\ngive the failing operation a forward derivative (autograd.Function.jvp) or a differentiable "
          "backward, or run KFAC with rescale=False (no exact-Fisher model)")
