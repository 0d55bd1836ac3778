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
  through one retained graph add up, as ``.grad`` does); for the MC Fisher (``sampler``)
  the output tensor itself, until the backward reaches z;
* for the MC Fisher, in the first backward that reaches z (z's hook runs before any node of
  the model's graph, so that graph is still whole): the sampler's cotangent c of the
  sampled-target loss is backpropagated from z to the block outputs by a nested
  ``torch.autograd.grad(z, outputs, c, retain_graph=True)`` (Sec 5's extra backward, inside the
  user's: the user's backward needs no ``retain_graph``, and the pass then holds no graph);
* with ``record_grads``, a tensor hook on every diagonal block's parameter that sums ∂L/∂θ into
  the pass whose backward is running (the last pass whose z received a gradient).

Activation checkpointing (``torch.utils.checkpoint``) runs a segment of the forward again inside
the backward. A module called while autograd runs a backward (:func:`in_backward`) is such a
recomputation, never a pass or a stray call:

* ``use_reentrant=False``: the forward built the graph (only its saved tensors are recomputed),
  so the outputs hooked in the forward receive the derivatives; the recomputation is ignored;
* ``use_reentrant=True``: the forward ran the segment under no_grad (its blocks' outputs did not
  require grad) and the backward differentiates the recomputed outputs: their tensor hooks sum
  ∂L/∂s into the pass whose backward is running; :func:`check_pass` asks for one recomputation
  per backward of the pass. The MC Fisher's nested backward cannot enter such a segment
  (reentrant checkpointing refuses ``autograd.grad``): refused, naming ``use_reentrant=False``.

The recorded inputs are those of the forward (the recomputation's are equal); the statistics
equal those without checkpointing.

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
* modules called inside a backward (activation checkpointing's recomputation, above);
* a pass whose output never received a gradient (a forward without backward) is dropped by
  :meth:`take`: it contributed nothing to ``.grad`` either.

Memory: a pass holds its detached block inputs and its output derivatives (empirical: summed
in the backward; MC: the sampled ones; until its backward the MC pass also holds its output
tensors and z, attached) until :meth:`take` hands them over; the consumer drops them after the
step. :meth:`remove` takes every hook off the model and drops whatever is pending.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..batch import model_output
from .blocks import CurvatureBlock
from .capture import Pausable, Recording, check_calls, in_internal_pass, internal_pass

#: pending passes at which :class:`HookCapture` warns that ``step()`` is not being called
PENDING_WARN = 64

#: torch.compile's refusal to backpropagate twice through a backward that donated its buffers
DONATED = "donated buffers"

#: ``sampler(z, gz) -> (cotangent, kept rows) or None``: the MC Fisher's sampled-target cotangent
Sampler = Callable[[torch.Tensor, torch.Tensor], Optional[Tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class CapturedPass:
    """One forward of the model with grad enabled, and what its backwards sent back.

    Per block (the capture's block order): ``inputs`` the detached module input or None,
    ``grads`` Σ over backwards of ∂L/∂(module output) (Kronecker / dense blocks) or ∂L/∂θ
    (diagonal blocks) or None, ``outputs`` the output tensor (MC only, until the backward) or
    None, ``out_meta`` (shape, dtype, device) of the output, ``calls`` how often the module ran
    in this pass; ``order`` the block indices in call order; ``z`` the model output (MC: attached
    to the graph until the backward reaches it, else detached), ``gz`` Σ ∂L/∂z,
    ``backward_seen`` whether any backward reached z; ``backwards`` how many did; ``no_grad``
    the blocks whose output did not require grad in the forward and ``recomputed`` how often
    each was recomputed with grad in a backward (reentrant checkpointing); MC: ``sampled`` per
    block ∂(Σ sampled loss terms)/∂(output or θ) (None: not reached), ``kept`` the loss terms
    (rows of z) the sampled loss kept (None: all)."""

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
    no_grad: list = field(default_factory=list)  # blocks whose output did not require grad in the forward
    recomputed: dict = field(default_factory=dict)  # block -> recomputations in backwards (reentrant checkpointing)
    backwards: int = 0  # user backwards that reached z
    sampled: Optional[list] = None  # MC: per block ∂(Σ sampled loss terms)/∂(output or θ), None if not reached
    kept: Optional[torch.Tensor] = None  # MC: the loss terms (rows of z) the sampled loss kept
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


class HookCapture(Pausable):
    """Hooks on ``model`` that record every block's statistics from the user's passes.

    Args:
        model: the root module the user calls (``model(x)``); a pass starts at its forward.
        blocks: the curvature blocks (``find_blocks(model)``), in the order the passes index.
        record_grads: sum ∂L/∂(block output) and ∂L/∂θ of diagonal blocks in the backward
            (the empirical Fisher).
        sampler: the MC Fisher: ``sampler(z, gz) -> (c, keep) or None`` gives the cotangent c
            (shape of z) of the sampled-target loss and the kept loss terms (bool, one per row of
            z), or None to skip the pass (not a statistics step). Called in the first user
            backward that reaches z, which then also backpropagates c from z to the block outputs
            (a nested backward with the graph still intact: no ``retain_graph`` needed).

    Raises (at construction): ValueError when a block's module is the root itself (the root
    forward hook must see the pass open before the block records).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[CurvatureBlock], *, record_grads: bool,
                 sampler: Optional[Sampler] = None):
        self.model = model
        self.blocks = list(blocks)
        self.record_grads = bool(record_grads)
        self.sampler = sampler
        self.keep_outputs = sampler is not None
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
        return (self.armed and not self._paused and torch.is_grad_enabled() and not in_internal_pass()
                and not in_backward())

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
            if in_backward():  # activation checkpointing recomputes the layer in the backward
                self._recomputed(i, out)
                return
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
            p.no_grad.append(i)
            return
        if self.keep_outputs:
            p.outputs[i] = out
        if self.record_grads:
            p.handles.append(out.register_hook(partial(self._block_grad, p, i)))

    def _recomputed(self, i: int, out) -> None:
        """Block i ran again inside a backward (activation checkpointing). Non-reentrant
        checkpointing (``use_reentrant=False``) backpropagates through the graph of the forward,
        whose outputs the pass already hooked: nothing to do. Reentrant checkpointing ran the
        forward under no_grad and backpropagates through this recomputed output instead: its
        derivative is the block's g, summed into the pass whose backward is running."""
        p = self._bw_pass
        if p is None or in_internal_pass() or i not in p.no_grad or not isinstance(out, torch.Tensor):
            return
        if not out.requires_grad:
            return
        p.recomputed[i] = p.recomputed.get(i, 0) + 1
        if self.record_grads:
            p.handles.append(out.register_hook(partial(self._block_grad, p, i)))

    def _output_grad(self, p: CapturedPass, g: torch.Tensor) -> None:
        if in_internal_pass():
            return
        p.backwards += 1
        p.backward_seen = True
        p.gz = g.detach() if p.gz is None else p.gz + g.detach()
        self._bw_pass = p
        if self.sampler is not None and p.backwards == 1:
            self._sampled_backward(p, g.detach())

    def _sampled_backward(self, p: CapturedPass, gz: torch.Tensor) -> None:
        """The MC Fisher's backward (Sec 5), inside the user's: its first node is z's, so the graph
        between z and the blocks is still whole; differentiate the sampled loss through it now
        (retaining it for the user's backward, which then frees it as usual)."""
        z, outputs = p.z, p.outputs
        p.z, p.outputs = z.detach(), [None] * len(self.blocks)  # the graph is not held past the backward
        if p.no_grad:  # reentrant checkpointing: outside this graph (check_pass names the fix)
            return
        got = self.sampler(p.z, gz)
        if got is None:
            return
        c, p.kept = got
        idx = [i for i, b in enumerate(self.blocks) if not b.captures or outputs[i] is not None]
        wrt = [outputs[i] if self.blocks[i].captures else self.blocks[i].params()[0] for i in idx]
        try:
            with torch.enable_grad(), internal_pass():
                gs = torch.autograd.grad(z, wrt, grad_outputs=c, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if DONATED in str(exc):
                raise RuntimeError("fisher='mc' with capture='hooks' backpropagates the sampled targets through your "
                                   "graph inside your backward, which must then keep the graph for the rest of your "
                                   "backward, and a torch.compile'd part of the model donated its saved tensors "
                                   "(freed by the first backward): use fisher='empirical' or capture='pass', or set "
                                   "torch._functorch.config.donated_buffer = False") from exc
            raise
        p.sampled = [None] * len(self.blocks)
        for i, t in zip(idx, gs):
            p.sampled[i] = t

    def _block_grad(self, p: CapturedPass, i: int, g: torch.Tensor) -> None:
        if in_internal_pass():
            return
        p.grads[i] = g.detach() if p.grads[i] is None else p.grads[i] + g.detach()

    def _param_grad(self, i: int, g: torch.Tensor) -> None:
        p = self._bw_pass
        if p is None or in_internal_pass():
            return
        p.grads[i] = g.detach() if p.grads[i] is None else p.grads[i] + g.detach()


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread (a module called now is a
    recomputation by activation checkpointing, not a forward of the user's)."""
    return torch._C._current_autograd_node() is not None


def check_pass(blocks: Sequence[CurvatureBlock], p: CapturedPass, *, sampled: bool = False) -> None:
    """The one-use-per-forward rule of :func:`~kfac_fast.curvature.capture.capture` for a
    recorded pass, a tensor model output, and every block run under no_grad in the forward
    (reentrant activation checkpointing) recomputed once per backward (``sampled``: the MC
    Fisher, which cannot reach such blocks at all)."""
    if p.bad_output is not None:
        raise TypeError(f"the model returned {p.bad_output}; capture='hooks' needs the model to return one tensor of "
                        "shape (m, ..., k) (the logits): wrap the model so that it does")
    check_calls(blocks, p.calls)
    for i in p.no_grad:
        name, n = blocks[i].name, p.recomputed.get(i, 0)
        if sampled:
            raise ValueError(f"layer {name} ran under torch.no_grad() in the recorded forward (reentrant activation "
                             "checkpointing, use_reentrant=True), outside the graph that fisher='mc' backpropagates "
                             "the sampled targets through: checkpoint with use_reentrant=False (the default of "
                             "transformers' gradient_checkpointing_enable()), or use fisher='empirical' or "
                             "capture='pass'")
        if n < p.backwards:
            raise ValueError(f"the output of layer {name} did not require grad in the recorded forward (run under "
                             "torch.no_grad() inside the model) and was not recomputed with grad in the backward (as "
                             "reentrant activation checkpointing does), so its output derivatives cannot be recorded; "
                             "run it with grad, or use capture='pass' for such a model")
        if n > p.backwards:
            raise ValueError(f"layer {name} was recomputed {n} times in {p.backwards} backward(s) of its pass: several "
                             "forwards backpropagated together under reentrant activation checkpointing "
                             "(use_reentrant=True) cannot be told apart; call backward once per forward, or "
                             "checkpoint with use_reentrant=False")
