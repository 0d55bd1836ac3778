"""Which block class handles which module type: ``register_block`` and ``find_blocks``.

Lookup walks the module's class hierarchy (most specific first), so a subclass of a registered
type uses its parent's block unless it has its own (kfac-jax's ``set_default_tag_to_block_ctor``
plays the same role). Modules of other libraries that K-FAC must not import are matched **by
structure** when no registered type matches (:data:`STRUCTURAL`: transformers' weight-transposed
``Conv1D``, its ``*RMSNorm`` modules, timm's ``LayerScale``); a registration always wins over a
structural match.
Trainable parameters no block claims (a custom ``nn.Parameter``, a layer
type without a block, a parameter shared by two modules) follow the ``unsupported`` policy; with
``tied_weights="kronecker_sum"`` an ``nn.Embedding`` tied to a bias-free ``nn.Linear`` output layer
becomes a tied pair instead (:mod:`.tied`: the head owns the weight, its inverse the Kronecker sum
over both uses).
"""
from __future__ import annotations

import inspect

from torch import nn

from .attention import AttentionInProjBlock
from .base import FACTOR_KINDS, CurvatureBlock, check_kfac_approx
from .conv1d import Conv1dBlock
from .conv2d import Conv2dBlock
from .diagonal import DiagonalBlock
from .embedding import EmbeddingBlock
from .layer_scale import LayerScaleBlock, is_layer_scale
from .linear import LinearBlock
from .scale_shift import NORM_TYPES, ScaleShiftBlock, is_rms_norm_like
from .tied import tie, tieable
from .transposed_linear import TransposedLinearBlock, is_transposed_linear

_REGISTRY: dict[type, type[CurvatureBlock]] = {}
UNSUPPORTED = ("diagonal", "skip", "error")


def register_block(module_type: type, block_cls: type) -> None:
    """Make K-FAC handle modules of ``module_type`` (and its subclasses without a block of their
    own) with ``block_cls``, a subclass of :class:`~kfac_fast.curvature.blocks.CurvatureBlock`.
    A second registration for the same type replaces the first.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` class or ``block_cls`` not a
            ``CurvatureBlock`` class.
        ValueError: ``block_cls.factor_kind`` is not one of ``FACTOR_KINDS``.
    """
    if not (inspect.isclass(module_type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_block(module_type, block_cls): module_type must be a subclass of torch.nn.Module "
                        f"(a class, e.g. nn.Linear), got {module_type!r}")
    if not (inspect.isclass(block_cls) and issubclass(block_cls, CurvatureBlock)):
        raise TypeError(f"register_block(module_type, block_cls): block_cls must be a subclass of "
                        f"kfac_fast.curvature.blocks.CurvatureBlock (a class, not an instance), got {block_cls!r}")
    if block_cls.factor_kind not in FACTOR_KINDS:
        raise ValueError(f"{block_cls.__name__}.factor_kind is {block_cls.factor_kind!r}; choose one of "
                         f"{', '.join(FACTOR_KINDS)}")
    _REGISTRY[module_type] = block_cls


def registered_blocks() -> dict[type, type[CurvatureBlock]]:
    """A copy of the registry: module type -> block class."""
    return dict(_REGISTRY)


#: (description, predicate, block class): modules recognised by their structure, not their type
STRUCTURAL = (
    ("a weight-transposed Linear (transformers' Conv1D: class Conv1D, nf, weight (nx, nf))", is_transposed_linear,
     TransposedLinearBlock),
    ("an RMSNorm of another library (class *RMSNorm or T5LayerNorm, one 1-D weight, variance_epsilon or eps)",
     is_rms_norm_like, ScaleShiftBlock),
    ("a layer scale (class *LayerScale or *LayerScale2d, one 1-D parameter)", is_layer_scale, LayerScaleBlock),
)


def block_class(module: nn.Module):
    """The block class for ``module`` (most specific registered base class, else the first
    structural match of :data:`STRUCTURAL`), or None."""
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t].specialise(module)
    for _, matches, cls in STRUCTURAL:
        if matches(module):
            return cls
    return None


def _describe(t: type) -> str:
    mod = t.__module__
    prefix = "nn." if mod.startswith("torch.nn") else f"{mod}."
    return prefix + t.__name__


def check_unsupported(unsupported: str) -> str:
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unknown unsupported={unsupported!r}; choose one of {', '.join(UNSUPPORTED)}")
    return unsupported


#: ``tied_weights=`` choices: an embedding tied to a bias-free output layer follows ``unsupported=``
#: like any other shared parameter (the default), or is one Kronecker-sum block (:mod:`.tied`)
TIED_WEIGHTS = ("unsupported", "kronecker_sum")


def check_tied_weights(tied_weights: str) -> str:
    if tied_weights not in TIED_WEIGHTS:
        raise ValueError(f"unknown tied_weights={tied_weights!r}; choose one of {', '.join(TIED_WEIGHTS)}")
    return tied_weights


def _survey(model: nn.Module, model_name: str, kfac_approx: str, tied_weights: str = "unsupported"):
    """(the blocks of the supported modules, module path -> why it has none, the trainable
    parameters no block claims as [(parameter name, parameter)], parameter id -> (module path, module))."""
    blocks: list[CurvatureBlock] = []
    refused: dict[str, str] = {}  # module path -> why
    covered: set[int] = set()  # sub-modules modelled by their parent's blocks (attention's out_proj)
    for name, module in model.named_modules():
        full = f"{model_name}.{name}" if name else model_name
        if id(module) in covered:
            continue
        cls = block_class(module)
        if cls is None:
            continue
        covered.update(id(m) for m in cls.covers(module))
        why = cls.refusal(module)
        if why is not None:
            refused[full] = f"{_describe(type(module))} with {why}"
            continue
        if cls.accepts(module):
            blocks += cls.create(full, module, kfac_approx=kfac_approx)
    # a parameter claimed by two blocks (tied weights): with tied_weights="kronecker_sum" an embedding
    # and a bias-free output layer of its transposed shape become a tied pair (one owner); any other
    # sharing, and that one by default, follows `unsupported=`
    owners: dict[int, list[CurvatureBlock]] = {}
    for b in blocks:
        for p in b.params():
            owners.setdefault(id(p), []).append(b)
    for bs in owners.values():
        pair = tieable(*bs) if len(bs) == 2 else None
        if pair is not None and tied_weights == "kronecker_sum":
            tied = dict(zip(map(id, pair), tie(*pair)))
            blocks = [tied.get(id(b), b) for b in blocks]
        elif len(bs) > 1:
            hint = ("; tied_weights='kronecker_sum' models both uses as one Kronecker-sum block" if pair is not None
                    else "")
            for b in bs:
                others = ", ".join(o.name for o in bs if o is not b)
                refused[b.name] = (f"{_describe(type(b.module))} sharing a parameter with {others} (tied weights: one "
                                   f"Kronecker block cannot model both uses{hint})")
    blocks = [b for b in blocks if b.name not in refused]
    claimed = {id(p) for b in blocks for p in b.params()}
    mod_of = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            mod_of.setdefault(id(p), (f"{model_name}.{mname}" if mname else model_name, module))
    loose = [(pname, p) for pname, p in model.named_parameters() if p.requires_grad and id(p) not in claimed]
    return blocks, refused, loose, mod_of


def why_unmodelled(model: nn.Module, *, model_name: str = "model", kfac_approx: str = "expand",
                   tied_weights: str = "unsupported") -> dict[str, str]:
    """Trainable parameter name -> why no Kronecker or norm block models it (its module's
    refusal, tied weights, a layer type without a block, a parameter a container module applies
    in its own forward: a layer scale, a class token, a position table)."""
    handled = ", ".join([_describe(t) for t in _REGISTRY] + [what for what, _, _ in STRUCTURAL])
    _, refused, loose, mod_of = _survey(model, model_name, kfac_approx, check_tied_weights(tied_weights))
    out = {}
    for pname, p in loose:
        path, module = mod_of[id(p)]
        # the module's refusal, or that of its blocks (attention: path.in_proj) or of a parent
        # whose blocks model it (attention's out_proj)
        what = (refused.get(path) or next((w for n, w in refused.items() if n.startswith(path + ".")), None)
                or next((w for n, w in refused.items() if path.startswith(n + ".")), None))
        if what is not None:
            out[pname] = f"{what} at {path}"
        elif block_class(module) is not None:
            out[pname] = f"{_describe(type(module))} at {path} whose weight is frozen"
        elif next(module.children(), None) is not None:  # a container's own parameter
            out[pname] = (f"a parameter used directly in the forward of {_describe(type(module))} at {path} (a "
                          "layer scale, class token, position embedding or bias table: no layer with a block "
                          "applies it)")
        else:
            out[pname] = (f"{_describe(type(module))} at {path} (no block for this layer type; K-FAC has "
                          f"Kronecker/norm blocks for {handled})")
    return out


def find_blocks(model: nn.Module, *, model_name: str = "model", kfac_approx: str = "expand",
                unsupported: str = "error", tied_weights: str = "unsupported") -> list[CurvatureBlock]:
    """One block per supported module of ``model`` (registration order; two for
    ``nn.MultiheadAttention``), then one :class:`DiagonalBlock` per other trainable parameter
    when ``unsupported="diagonal"``.

    ``unsupported``: what happens to trainable parameters no Kronecker/norm block models (a layer
    type without a block, a refused configuration such as cross-attention projections, a custom
    ``nn.Parameter``, a parameter shared by two modules): ``"diagonal"`` (a diagonal Fisher block
    each), ``"skip"`` (left alone: train them with another optimizer) or ``"error"``.
    :func:`~kfac_fast.curvature.coverage.coverage` says which parameters went where and why.

    ``tied_weights``: an ``nn.Embedding`` tied to a bias-free ``nn.Linear`` output layer (GPT-2,
    Gemma) follows ``unsupported`` (``"unsupported"``, the default) or is one Kronecker-sum block
    over both uses (``"kronecker_sum"``, :mod:`.tied`). The default is the fallback because it
    trained better: on a tied character LM, 250 iterations, 3 seeds, the held-out loss was
    2.48/2.11/2.38 (diagonal) against 2.80/2.69/2.38 (Kronecker sum) with ``KFAC`` and
    2.04/2.00/1.97 against 2.11/2.09/2.06 with ``KFACPreconditioner`` + AdamW
    (``benchmarks/bench_tied_lm.py``).

    Raises:
        ValueError: ``unsupported="error"`` and such a parameter exists (the message names the
            module and the choices), or no parameter is left for K-FAC.
    """
    check_kfac_approx(kfac_approx)
    check_unsupported(unsupported)
    check_tied_weights(tied_weights)
    handled = ", ".join([_describe(t) for t in _REGISTRY] + [what for what, _, _ in STRUCTURAL])
    blocks, _, loose, _ = _survey(model, model_name, kfac_approx, tied_weights)
    if loose and unsupported == "error":
        pname, _ = loose[0]
        why = why_unmodelled(model, model_name=model_name, kfac_approx=kfac_approx, tied_weights=tied_weights)[pname]
        raise ValueError(f"unsupported layer {why} (parameter {pname}); choose unsupported='diagonal' (a diagonal "
                         "Fisher block for its parameters), unsupported='skip' (K-FAC leaves them to another "
                         "optimizer), freeze them (requires_grad_(False)), or register a block with "
                         "kfac_fast.register_block")
    if unsupported == "diagonal":
        blocks += [DiagonalBlock(f"{model_name}.{pname}", p, kfac_approx=kfac_approx) for pname, p in loose]
    if not blocks:
        raise ValueError(
            f"{model_name} has no supported layer ({handled} with trainable weight) and no trainable parameter "
            "for a diagonal block (unsupported='diagonal'); K-FAC has nothing to train"
        )
    return blocks


register_block(nn.Linear, LinearBlock)
register_block(nn.Conv1d, Conv1dBlock)
register_block(nn.Conv2d, Conv2dBlock)
register_block(nn.Embedding, EmbeddingBlock)
register_block(nn.MultiheadAttention, AttentionInProjBlock)
for _t in NORM_TYPES:
    register_block(_t, ScaleShiftBlock)
