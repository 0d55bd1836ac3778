"""Recording each layer's input ā_{i-1} and pre-activation output s_i during a forward pass.

Per-example derivatives g_i = ∂L/∂s_i are then obtained in one call to
``torch.autograd.grad(surrogate, recording.outputs)`` (paper Algorithm 1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .blocks import CurvatureBlock


@dataclass
class Recording:
    """Input and output per block (None for blocks without a module hook), plus call order."""

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    order: list = field(default_factory=list)


_INTERNAL = [0]  # depth of kfac_fast's own passes (statistics forwards and backwards)


class Pausable:
    """A recorder that can be paused: :meth:`paused` nests, and ``self._paused`` (the depth) is
    what the recorder's hook checks before recording a forward."""

    _paused: int = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside the block are not recorded (kfac_fast's own replays, a validation
        pass with grad enabled); backwards of passes recorded before still are."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


@contextlib.contextmanager
def internal_pass() -> Iterator[None]:
    """Mark kfac_fast's own passes (the statistics forward and backward of ``KFAC`` and of
    ``KFACPreconditioner(capture="pass")``, the MC backward of ``capture="hooks"``): the hooks of
    :class:`~kfac_fast.curvature.hooks.HookCapture` record nothing inside."""
    _INTERNAL[0] += 1
    try:
        yield
    finally:
        _INTERNAL[0] -= 1


def in_internal_pass() -> bool:
    return _INTERNAL[0] > 0


def check_calls(layers: Sequence[CurvatureBlock], calls: Sequence[int]) -> None:
    """Each hooked layer ran exactly once in the forward pass (ValueError naming it otherwise)."""
    for layer, n in zip(layers, calls):
        if not layer.captures:
            continue
        if n > 1:
            raise ValueError(
                f"layer {layer.name} was called {n} times in one forward pass; K-FAC's Kronecker "
                "factors assume each layer is used once per forward (no weight sharing); share the weight as a plain "
                "nn.Parameter (a diagonal block, unsupported='diagonal') or give each use its own layer"
            )
        if n == 0:
            raise ValueError(
                f"layer {layer.name} was not used in the forward pass; remove it from the model or freeze it "
                "(requires_grad_(False)) so K-FAC does not track it"
            )


def forward_order(layers: Sequence[CurvatureBlock], rec: Recording) -> list[int]:
    """Block indices in the order the forward pass called them, blocks without a module hook
    (diagonal parameters) last."""
    return list(rec.order) + [i for i, layer in enumerate(layers) if not layer.captures]


@contextlib.contextmanager
def capture(layers: Sequence[CurvatureBlock], *, need_outputs: bool = True) -> Iterator[Recording]:
    """Hook ``layers`` for one forward pass (an :func:`internal_pass`: armed
    :class:`~kfac_fast.curvature.hooks.HookCapture` hooks record nothing in it).

    Raises (after the forward): ValueError naming a layer called more than once (weight
    sharing breaks the one-use-per-forward assumption of the factors) or never called.
    """
    rec = Recording(inputs=[None] * len(layers), outputs=[None] * len(layers))
    calls = [0] * len(layers)
    handles = []

    def make_hook(i: int):
        def hook(x, out):
            calls[i] += 1
            if calls[i] > 1:
                return
            rec.inputs[i] = x
            rec.order.append(i)
            if need_outputs:
                rec.outputs[i] = out

        return hook

    hooked = [i for i, layer in enumerate(layers) if layer.captures]
    for i in hooked:
        handles.append(layers[i].register_capture(make_hook(i)))
    try:
        with internal_pass():
            yield rec
    finally:
        for h in handles:
            h.remove()
    check_calls(layers, calls)
    if need_outputs:
        for i in hooked:
            layer = layers[i]
            if not rec.outputs[i].requires_grad:
                raise ValueError(
                    f"the output of layer {layer.name} does not require grad (forward under torch.no_grad()?)"
                )
