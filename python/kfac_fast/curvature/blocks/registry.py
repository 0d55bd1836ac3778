"""Which block class handles which module type: ``register_block`` and ``find_blocks``.

Lookup walks the module's class hierarchy (most specific first), so a subclass of a registered
type uses its parent's block unless it has its own (kfac-jax's ``set_default_tag_to_block_ctor``
plays the same role).
"""
from __future__ import annotations

import inspect

from torch import nn

from .base import FACTOR_KINDS, CurvatureBlock
from .linear import LinearBlock

_REGISTRY: dict[type, type[CurvatureBlock]] = {}


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


def block_class(module: nn.Module):
    """The block class for ``module`` (most specific registered base class), or None."""
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    return None


def _describe(t: type) -> str:
    mod = t.__module__
    prefix = "nn." if mod.startswith("torch.nn") else f"{mod}."
    return prefix + t.__name__


def find_blocks(model: nn.Module, *, model_name: str = "model") -> list[CurvatureBlock]:
    """One block per supported module of ``model``, in registration order.

    Raises:
        ValueError: a module owning trainable parameters is not supported (K-FAC would
            silently skip its parameters), or the model has no supported layer.
    """
    handled = ", ".join(_describe(t) for t in _REGISTRY)
    blocks: list[CurvatureBlock] = []
    for name, module in model.named_modules():
        full = f"{model_name}.{name}" if name else model_name
        cls = block_class(module)
        if cls is not None:
            if cls.accepts(module):
                blocks.append(cls(full, module))
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            raise ValueError(
                f"unsupported layer {_describe(type(module))} at {full}: K-FAC here handles {handled} only; "
                "freeze its parameters (requires_grad_(False)) or train them with another optimizer"
            )
    if not blocks:
        raise ValueError(
            f"{model_name} has no supported layer ({handled} with trainable weight); "
            "K-FAC needs at least one to build Kronecker factors"
        )
    return blocks


register_block(nn.Linear, LinearBlock)
