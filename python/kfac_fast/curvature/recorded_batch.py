"""The batch of the user's own forward passes, recorded so that a step called with no arguments
(``optimizer.step()`` as ``torch.optim`` loops, Hugging Face ``Trainer`` and Lightning call it)
can run K-FAC's extra passes on it (Sec 5: the sampled-target pass; Sec 6.4-6.5: the
exact-Fisher products and ρ of :class:`kfac_fast.KFAC`).

:class:`RecordedBatch` puts one forward pre-hook (with keyword arguments) on the model's root
module. Every call ``model(...)`` with grad enabled, outside kfac_fast's own passes
(:func:`~kfac_fast.curvature.capture.internal_pass`) and outside :meth:`RecordedBatch.paused`,
appends its arguments as a batch in the form :mod:`kfac_fast.batch` replays:

* ``model(x)`` -> ``x``; ``model(a, b)`` -> ``(a, b)``; ``model(**kw)`` -> ``kw`` (a dict);
* 0-d tensors among keyword arguments are per-batch constants, not examples (Hugging Face's
  ``num_items_in_batch``, a loss normaliser): they are left out of the replayed batch;
* positional tensors together with keyword tensors cannot be replayed as one batch: the step
  refuses such a recording, naming the fix.

Targets come from, in this order: the step's own argument, :meth:`set_targets` (one step),
or the ``targets`` callable (``targets(batch) -> Tensor``, every step). Nothing is copied: the
recorder holds references to the user's tensors until :meth:`take` releases them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .capture import Pausable, in_internal_pass

__all__ = ["RecordedBatch", "TargetsFn"]

TargetsFn = Callable[[Any], Any]


def _as_batch(args: tuple, kwargs: dict):
    """(batch, problem): the call's arguments as a replayable batch, or why they are not one."""
    kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, torch.Tensor) and v.dim() == 0)}
    tensor_kw = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    if not kwargs:
        return (args[0] if len(args) == 1 else tuple(args)), None
    if not args:
        return dict(kwargs), None
    if tensor_kw:
        return None, (f"the model was called with positional arguments and the keyword tensor(s) "
                      f"{', '.join(tensor_kw)}; K-FAC replays a batch as model(x), model(*args) or model(**kwargs): "
                      "call the model one of these ways, or pass the batch to step() yourself")
    return tuple(args), None  # keyword flags only (e.g. return_dict=True): replayed positionally


class RecordedBatch(Pausable):
    """The batches of the user's grad-enabled forwards since the last :meth:`take`.

    Args:
        model: the root module the user calls.
        targets: optional ``targets(batch) -> Tensor`` (or a list for several batches is built by
            calling it per batch), e.g. ``lambda b: kfac_fast.causal_lm_targets(b["labels"])``.
    """

    def __init__(self, model: nn.Module, *, targets: Optional[TargetsFn] = None):
        if targets is not None and not callable(targets):
            raise TypeError(f"targets must be a callable batch -> targets tensor, got {type(targets).__name__}; "
                            "for one step's tensor use set_targets(y) or step(targets=y)")
        self.model = model
        self.targets_fn = targets
        self.batches: list = []
        self.problems: list[str] = []
        self._next_targets = None
        self._paused = 0
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        if self._paused or in_internal_pass() or not torch.is_grad_enabled():
            return
        batch, problem = _as_batch(tuple(args), dict(kwargs))
        self.batches.append(batch)
        if problem is not None:
            self.problems.append(problem)

    # it only records (the forward is unchanged), so linearized passes that bypass the module call
    # (curvature.sequential_jvp) may skip it
    _record.kfac_fast_passive = True

    def set_targets(self, targets) -> None:
        """The targets of the next step only (a tensor, or a list with one per recorded pass)."""
        self._next_targets = targets

    def take(self, targets=None) -> tuple[list, Any]:
        """(the recorded batches, the targets: ``targets`` if given, else :meth:`set_targets`'s, else
        the callable's per batch (a single tensor for a single batch), else None); the recorder is
        empty afterwards."""
        batches, problems, pending = self.batches, self.problems, self._next_targets
        self.batches, self.problems, self._next_targets = [], [], None
        if problems:
            raise ValueError(problems[0])
        if targets is None:
            targets = pending
        if targets is None and self.targets_fn is not None and batches:
            ys = [self.targets_fn(b) for b in batches]
            targets = ys[0] if len(ys) == 1 else ys
        return batches, targets

    def clear(self) -> None:
        self.batches, self.problems, self._next_targets = [], [], None

    def remove(self) -> None:
        """Take the hook off the model and drop what was recorded (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.clear()
