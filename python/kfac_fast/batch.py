"""Batches as training code has them: a tensor (``model(x)``), a tuple or list
(``model(*batch)``) or a dict (``model(**batch)``). Dim 0 of every tensor in a batch indexes the
examples, so the subsets S₁, S₂ of Sec 8 index dim 0 of each of them; anything that is not a
tensor (flags, strings, None) is passed through unchanged.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Union

import torch
from torch import nn

Batch = Union[torch.Tensor, tuple, list, dict]


def _tensors(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("inputs", batch)]
    if isinstance(batch, (tuple, list)):
        return [(f"inputs[{i}]", t) for i, t in enumerate(batch) if isinstance(t, torch.Tensor)]
    if isinstance(batch, dict):
        return [(f"inputs[{k!r}]", t) for k, t in batch.items() if isinstance(t, torch.Tensor)]
    raise TypeError(f"a batch is a tensor, a tuple/list (model(*batch)) or a dict (model(**batch)); "
                    f"got {type(batch).__name__}")


def batch_size(batch: Batch, device: torch.device | None = None) -> int:
    """m, the number of examples: dim 0 of every tensor in the batch (checked equal, and on
    ``device`` when given).

    Raises:
        TypeError: not a tensor/tuple/list/dict, or no tensor in it.
        ValueError: tensors disagree on dim 0, a 0-d tensor, or a tensor on another device.
    """
    items = _tensors(batch)
    if not items:
        raise TypeError("the batch holds no tensor: K-FAC needs the examples along dim 0 of its tensors")
    m = None
    for name, t in items:
        if t.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; every tensor of a batch has the examples along dim 0")
        if m is None:
            m = t.shape[0]
            first = name
        elif t.shape[0] != m:
            raise ValueError(f"{name} has {t.shape[0]} rows but {first} has {m}: every tensor of a batch has the "
                             "examples along dim 0 (pass per-batch constants as module buffers instead)")
        if device is not None and t.device != device:
            raise ValueError(f"{name} are on {t.device} but the model is on {device}; move them with .to()")
    return int(m)


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """The batch with ``fn`` applied to each of its tensors (same container type)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        out = [fn(t) if isinstance(t, torch.Tensor) else t for t in batch]
        return tuple(out) if isinstance(batch, tuple) else out
    if isinstance(batch, dict):
        return {k: (fn(t) if isinstance(t, torch.Tensor) else t) for k, t in batch.items()}
    raise TypeError(f"unsupported batch type {type(batch).__name__}")


def select(batch: Batch, idx: torch.Tensor) -> Batch:
    """The examples ``idx`` (an int64 index tensor) of every tensor in the batch."""
    return map_tensors(batch, lambda t: t.index_select(0, idx))


def repeat(batch: Batch, n: int) -> Batch:
    """n stacked copies of the batch along dim 0 (copy j is rows j·m … (j+1)·m − 1)."""
    if n == 1:
        return batch
    return map_tensors(batch, lambda t: t.repeat(n, *([1] * (t.dim() - 1))))


def model_output(out: Any) -> Any:
    """The outputs z (m, ..., k) in what a model returned: the tensor itself, or the ``logits``
    of an output object (Hugging Face's ``ModelOutput``: an attribute ``logits``, also reachable
    as ``out["logits"]``) or of a mapping with a ``"logits"`` key. Anything else is returned as
    it is, for the loss's own check to refuse with the fix."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    return logits if isinstance(logits, torch.Tensor) else out


def call(model: nn.Module, batch: Batch) -> Any:
    """The outputs of ``model(x)``, ``model(*batch)`` or ``model(**batch)`` (see
    :func:`model_output`)."""
    if isinstance(batch, torch.Tensor):
        return model_output(model(batch))
    if isinstance(batch, (tuple, list)):
        return model_output(model(*batch))
    if isinstance(batch, dict):
        return model_output(model(**batch))
    raise TypeError(f"unsupported batch type {type(batch).__name__}")


def functional_call(model: nn.Module, params: dict, batch: Batch) -> Any:
    """The outputs of ``model`` on ``batch`` with ``params`` (name -> tensor) in place of its
    own (``torch.func.functional_call``, non-strict: parameters not named keep their values)."""
    args, kwargs = call_args(batch)
    return model_output(torch.func.functional_call(model, params, args, kwargs, strict=False))


def call_args(batch: Batch) -> tuple[tuple, dict]:
    """(args, kwargs) for ``torch.func.functional_call``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (), dict(batch)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Module buffers (BatchNorm running statistics, ``num_batches_tracked``, ...) as they were
    before the block: K-FAC's extra passes (sampled targets, quadratic forms, ρ) must change the
    model no more than one plain training step does."""
    bufs = [b for b in model.buffers() if b is not None]
    saved = [b.detach().clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(bufs, saved):
                b.copy_(s)
