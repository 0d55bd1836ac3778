"""Block inputs and output derivatives recorded from the user's own forward and backward passes
(paper Sec 5, Algorithm 1 steps 2-3 without K-FAC's extra pass; what KAISA and ASDL do with
module hooks).

:class:`HookCapture` arms, on the model given to it,

* a forward pre-hook and a forward hook on the **root** module: each call ``model(...)`` with
  grad enabled opens one :class:`CapturedPass` and keeps its output z (m, ..., k) with a tensor
  hook that sums ∂L/∂z over the backwards through it (``gz``; L is the user's loss, whatever its
  reduction);
* a forward hook on every block module (:meth:`CurvatureBlock.register_capture`) that records the
  block's input ā (detached, (m, ..., d) as the module saw it; an attention block records its
  call) and the output's shape; for the empirical Fisher (``record_grads``) a
  tensor hook on the output that sums ∂L/∂s over the backwards through it (several backwards
  through one retained graph add up, as ``.grad`` does); for the MC Fisher (``keep_outputs``)
  the output tensor itself, so that one extra backward of Σ loss(sampled y) can differentiate
  w.r.t. it through the retained graph;
* with ``record_grads``, a tensor hook on every diagonal block's parameter that sums ∂L/∂θ into
  the pass whose backward is running (the last pass whose z received a gradient).

Nothing here rescales: the derivatives are those of the user's loss; turning them into
∂(Σ loss terms)/∂s (the convention of :mod:`.blocks.base`) is the consumer's job
(:class:`kfac_fast.KFACPreconditioner` multiplies by N / grad_scale for a mean loss).

Not recorded (documented rules):

* forwards with grad disabled (``torch.no_grad()``, ``torch.inference_mode()``, a frozen
  model): nothing could be backpropagated through them; the module's train/eval mode does not
  matter (a model fine-tuned in eval mode still gets statistics);
* forwards inside :meth:`HookCapture.paused` (a validation pass that needs grad, e.g. for
  input attributions);
* kfac_fast's own passes (:func:`~kfac_fast.curvature.capture.internal_pass`: the statistics
  passes of ``KFAC`` and of ``KFACPreconditioner(capture="pass")``, the MC backward);
* a pass whose output never received a gradient (a forward without backward) is dropped by
  :meth:`take`: it contributed nothing to ``.grad`` either.

Memory: a pass holds its detached block inputs, its output derivatives (empirical) or its
output tensors (MC: they keep the user's retained graph alive) until :meth:`take` hands them
over; the consumer drops them after the step. :meth:`remove` takes every hook off the model
and drops whatever is pending.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..batch import model_output
from .blocks import CurvatureBlock
from .capture import Recording, check_calls, in_internal_pass

#: pending passes at which :class:`HookCapture` warns that ``step()`` is not being called
PENDING_WARN = 64


@dataclass
class CapturedPass:
    """One forward of the model with grad enabled, and what its backwards sent back.

    Per block (the capture's block order): ``inputs`` the detached module input or None,
    ``grads`` Σ over backwards of ∂L/∂(module output) (Kronecker / dense blocks) or ∂L/∂θ
    (diagonal blocks) or None, ``outputs`` the output tensor (MC only) or None, ``out_meta``
    (shape, dtype, device) of the output, ``calls`` how often the module ran in this pass;
    ``order`` the block indices in call order; ``z`` the model output (attached to the graph
    with ``keep_outputs``, else detached), ``gz`` Σ ∂L/∂z, ``backward_seen`` whether any
    backward reached z."""

    inputs: list
    grads: list
    outputs: list
    out_meta: list
    calls: list
    order: list = field(default_factory=list)
    z: Optional[torch.Tensor] = None
    gz: Optional[torch.Tensor] = None
    backward_seen: bool = False
    bad_output: Optional[str] = None
    detached: list = field(default_factory=list)  # blocks whose output did not require grad
    handles: list = field(default_factory=list)  # its tensor hooks (they reference the pass)

    def unhook(self) -> None:
        """Remove the pass's tensor hooks: they reference the pass, and z's hook with z held by
        the pass is a cycle through autograd that the garbage collector cannot see."""
        for h in self.handles:
            h.remove()
        self.handles = []

    @classmethod
    def empty(cls, n: int) -> "CapturedPass":
        return cls(inputs=[None] * n, grads=[None] * n, outputs=[None] * n, out_meta=[None] * n, calls=[0] * n)

    def recording(self) -> Recording:
        """The pass as a :class:`~kfac_fast.curvature.capture.Recording` (what ``block_rows`` reads)."""
        return Recording(inputs=list(self.inputs), outputs=list(self.outputs), order=list(self.order))

    def output_grad(self, i: int) -> torch.Tensor:
        """∂L/∂(output of block i), zeros when no backward reached that output (the block's
        output did not influence the loss: it contributed nothing to ``.grad``)."""
        g = self.grads[i]
        if g is not None:
            return g
        shape, dtype, device = self.out_meta[i]
        return torch.zeros(shape, dtype=dtype, device=device)


class HookCapture:
    """Hooks on ``model`` that record every block's statistics from the user's passes.

    Args:
        model: the root module the user calls (``model(x)``); a pass starts at its forward.
        blocks: the curvature blocks (``find_blocks(model)``), in the order the passes index.
        record_grads: sum ∂L/∂(block output) and ∂L/∂θ of diagonal blocks in the backward
            (the empirical Fisher).
        keep_outputs: keep the block output tensors (attached) and z with its graph (the MC
            Fisher's extra backward).

    Raises (at construction): ValueError when a block's module is the root itself (the root
    forward hook must see the pass open before the block records).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[CurvatureBlock], *, record_grads: bool,
                 keep_outputs: bool):
        self.model = model
        self.blocks = list(blocks)
        self.record_grads = bool(record_grads)
        self.keep_outputs = bool(keep_outputs)
        self.passes: list[CapturedPass] = []
        self.stray: list[str] = []  # blocks that ran outside a forward of the model
        self._current: Optional[CapturedPass] = None
        self._depth = 0
        self._bw_pass: Optional[CapturedPass] = None
        self._paused = 0
        self._warned = False
        self._handles: list = []
        for b in self.blocks:
            if b.captures and b.module is model:
                raise ValueError(f"layer {b.name} is the model itself; wrap it (nn.Sequential(layer)) so that "
                                 "capture='hooks' can tell the pass from the layer")
        self._handles.append(model.register_forward_pre_hook(self._open))
        self._handles.append(model.register_forward_hook(self._close, always_call=True))
        for i, b in enumerate(self.blocks):
            if b.captures:
                self._handles.append(b.register_capture(partial(self._block_forward, i)))
            elif self.record_grads:
                self._handles.append(b.params()[0].register_hook(partial(self._param_grad, i)))

    # ------------------------------------------------------------------ state
    @property
    def armed(self) -> bool:
        """Whether the hooks are on the model (False after :meth:`remove`)."""
        return bool(self._handles)

    def _recording(self) -> bool:
        return self.armed and not self._paused and torch.is_grad_enabled() and not in_internal_pass()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside the block are not recorded (backwards of passes recorded before still are)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def remove(self) -> None:
        """Take every hook off the model and drop whatever is pending (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the pending passes (and with them their references to the user's graph)."""
        for p in self.passes:
            p.unhook()
        self.passes = []
        self.stray = []
        self._current = None
        self._depth = 0
        self._bw_pass = None

    def take(self) -> tuple[list[CapturedPass], list[str]]:
        """(the pending passes that a backward reached, the names of blocks that ran outside a
        forward of the model); the capture is empty afterwards."""
        passes = [p for p in self.passes if p.backward_seen]
        stray = list(self.stray)
        self.clear()  # unhooks every pass: a backward after take() adds nothing
        return passes, stray

    # ------------------------------------------------------------------ hooks
    def _open(self, module, args) -> None:
        if self._depth:  # the root called inside its own forward: one pass
            self._depth += 1
            return
        if not self._recording():
            return
        self._depth = 1
        self._current = CapturedPass.empty(len(self.blocks))

    def _close(self, module, args, out) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        p, self._current = self._current, None
        if out is None:  # the forward raised
            return
        out = model_output(out)
        if not isinstance(out, torch.Tensor):
            p.bad_output = type(out).__name__
            p.backward_seen = True  # reported by the consumer, not dropped silently
        elif out.requires_grad:
            p.z = out if self.keep_outputs else out.detach()
            p.handles.append(out.register_hook(partial(self._output_grad, p)))
        else:
            return  # nothing can be backpropagated through it
        self.passes.append(p)
        if len(self.passes) > PENDING_WARN and not self._warned:
            self._warned = True
            warnings.warn(f"{len(self.passes)} forward passes recorded since the last step() of the K-FAC "
                          "preconditioner (capture='hooks'); they stay in memory until step() or remove_hooks(). "
                          "Wrap forwards that are not training passes in `with pre.paused():`", stacklevel=3)

    def _block_forward(self, i: int, x, out) -> None:
        p = self._current
        if p is None:
            if self._recording() and self.blocks[i].name not in self.stray:
                self.stray.append(self.blocks[i].name)
            return
        p.calls[i] += 1
        if p.calls[i] > 1 or not isinstance(out, torch.Tensor):
            return
        p.inputs[i] = x
        p.order.append(i)
        p.out_meta[i] = (out.shape, out.dtype, out.device)
        if not out.requires_grad:  # inside torch.no_grad() within the forward (reentrant checkpointing)
            p.detached.append(i)
            return
        if self.keep_outputs:
            p.outputs[i] = out
        if self.record_grads:
            p.handles.append(out.register_hook(partial(self._block_grad, p, i)))

    def _output_grad(self, p: CapturedPass, g: torch.Tensor) -> None:
        if in_internal_pass():
            return
        p.backward_seen = True
        p.gz = g.detach() if p.gz is None else p.gz + g.detach()
        self._bw_pass = p

    def _block_grad(self, p: CapturedPass, i: int, g: torch.Tensor) -> None:
        if in_internal_pass():
            return
        p.grads[i] = g.detach() if p.grads[i] is None else p.grads[i] + g.detach()

    def _param_grad(self, i: int, g: torch.Tensor) -> None:
        p = self._bw_pass
        if p is None or in_internal_pass():
            return
        p.grads[i] = g.detach() if p.grads[i] is None else p.grads[i] + g.detach()


def check_pass(blocks: Sequence[CurvatureBlock], p: CapturedPass) -> None:
    """The one-use-per-forward rule of :func:`~kfac_fast.curvature.capture.capture` for a
    recorded pass, and a tensor model output."""
    if p.bad_output is not None:
        raise TypeError(f"the model returned {p.bad_output}; capture='hooks' needs the model to return one tensor of "
                        "shape (m, ..., k) (the logits): wrap the model so that it does")
    check_calls(blocks, p.calls)
    if p.detached:
        raise ValueError(f"the output of layer {blocks[p.detached[0]].name} did not require grad in the recorded forward "
                         "(run under torch.no_grad() inside the model, e.g. by activation checkpointing), so its output "
                         "derivatives cannot be recorded; use capture='pass' for such a model")
