"""One batch's curvature statistics per block (paper Sec 5, Algorithm 1), for every block kind.

From one forward pass with the blocks' modules hooked and one backward pass of the SUM of the
loss terms (targets sampled from the model, or given for the empirical Fisher):

* Kronecker blocks: the A rows (patches, positions or examples) and the G rows;
* Kronecker with diagonal Ā (Embedding): the token ids and the G rows;
* one Kronecker product per group (grouped convolutions): the raw input and G rows (rows, groups, g);
* small dense blocks (norm scale-and-shift): per-example derivatives u (m, k, b);
* diagonal blocks (any other parameter): the summed gradient as (1, numel, 1).

Scaling (see :mod:`.blocks.base`): Ā averages its rows; G and the small blocks divide by N, the
number of loss terms (:meth:`PredictiveDistribution.count`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .blocks import DENSE, DIAGONAL, KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED, CurvatureBlock
from .capture import Recording, internal_pass


@dataclass
class BatchStatistics:
    """Per block (same order as the blocks): ``a`` A rows / token ids / the raw input of a
    block with ``implicit_a`` (a convolution: its patches are never materialised) / None,
    ``g`` G rows / None, ``u`` per-example vectors (m, k, b) / None; ``n_terms`` = N."""

    a: list
    g: list
    u: list
    n_terms: "int | torch.Tensor"  # a 0-d int64 tensor on the device when a mask leaves terms out

    def permuted(self, order: Sequence[int]) -> "BatchStatistics":
        """The same statistics for the blocks reordered as ``order``."""
        return BatchStatistics(a=[self.a[i] for i in order], g=[self.g[i] for i in order],
                               u=[self.u[i] for i in order], n_terms=self.n_terms)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.a + self.g + self.u if t is not None and t.is_floating_point()]


def block_rows(blocks: Sequence[CurvatureBlock], rec: Recording, grads: Sequence[Optional[torch.Tensor]],
               n_terms) -> BatchStatistics:
    """The statistics from the recorded inputs and ``grads`` (per block: ∂(Σ loss)/∂output for
    module blocks, ∂(Σ loss)/∂parameter for diagonal blocks; None = unused: zeros)."""
    a, g, u = [], [], []
    for i, b in enumerate(blocks):
        kind = b.factor_kind
        if kind in (KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED):
            a.append(b.a_input(rec.inputs[i]))
            g.append(b.output_rows(rec.inputs[i], grads[i]))
            u.append(None)
        elif kind == DENSE:
            a.append(None)
            g.append(None)
            u.append(b.per_example(rec.inputs[i], grads[i]))
        elif kind == DIAGONAL:
            gr = grads[i]
            if gr is None:
                gr = torch.zeros_like(b.params()[0])
            a.append(None)
            g.append(None)
            u.append(b.from_gradient(gr.detach()))
        else:  # pragma: no cover - the registry checks kinds
            raise ValueError(f"block {b.name}: unknown factor kind {kind!r}")
    return BatchStatistics(a=a, g=g, u=u, n_terms=n_terms if isinstance(n_terms, torch.Tensor) else int(n_terms))


def backward_targets(blocks: Sequence[CurvatureBlock], rec: Recording) -> list[torch.Tensor]:
    """What the statistics backward differentiates: each module block's output, each diagonal
    block's parameter."""
    return [rec.outputs[i] if b.captures else b.params()[0] for i, b in enumerate(blocks)]


def statistics_grads(total: torch.Tensor, blocks: Sequence[CurvatureBlock], rec: Recording,
                     *, retain_graph: bool = False, grad_outputs=None, outputs=None) -> list:
    """∂total/∂(block outputs or parameters), None for a parameter the forward did not use."""
    targets = backward_targets(blocks, rec)
    with internal_pass():
        return list(torch.autograd.grad(total if outputs is None else outputs, targets, grad_outputs=grad_outputs,
                                        retain_graph=retain_graph, allow_unused=True))


def concat_statistics(blocks: Sequence[CurvatureBlock], parts: Sequence[BatchStatistics]) -> BatchStatistics:
    """The statistics of several passes (gradient accumulation: micro-batches of one step) as one
    batch: rows of every block stacked along dim 0, N summed. Ā then averages all rows and G
    divides by the total N, as for one batch holding every micro-batch.

    Raises:
        ValueError: a convolution (``implicit_a``) whose input differs in size between passes
            (its raw inputs cannot be stacked).
    """
    if len(parts) == 1:
        return parts[0]

    def cat(i: int, ts: list, what: str):
        if all(t is None for t in ts):
            return None
        b = blocks[i]
        if what == "a" and b.implicit_a and len({tuple(t.shape[1:]) for t in ts}) > 1:
            raise ValueError(f"layer {b.name}: the passes to accumulate have inputs of different sizes "
                             f"{sorted({tuple(t.shape[1:]) for t in ts})}; call step() after each backward instead")
        return torch.cat(ts, 0)

    n = len(blocks)
    return BatchStatistics(a=[cat(i, [s.a[i] for s in parts], "a") for i in range(n)],
                           g=[cat(i, [s.g[i] for s in parts], "g") for i in range(n)],
                           u=[cat(i, [s.u[i] for s in parts], "u") for i in range(n)],
                           n_terms=sum(int(s.n_terms) for s in parts))


def finite_flags(blocks: Sequence[CurvatureBlock], stats: BatchStatistics) -> tuple[torch.Tensor, list[str]]:
    """(flags, names): a (n,) bool device tensor, one flag per floating statistics tensor
    (True: finite), and what each one is ("output derivatives of layer model.0"). No host sync."""
    checks, names = [], []
    for b, a, g, u in zip(blocks, stats.a, stats.g, stats.u):
        for what, t in (("inputs", a), ("output derivatives", g), ("per-example derivatives", u)):
            if t is not None and t.is_floating_point():
                checks.append(torch.isfinite(t).all())
                names.append(f"{what} of layer {b.name}")
    return (torch.stack(checks) if checks else torch.ones(0, dtype=torch.bool)), names


def first_non_finite(blocks: Sequence[CurvatureBlock], stats: BatchStatistics) -> Optional[str]:
    """Name the first block whose statistics hold NaN/inf (one host sync for the whole check)."""
    flags, names = finite_flags(blocks, stats)
    if not names:
        return None
    flags = flags.tolist()
    return None if all(flags) else names[flags.index(False)]


class NonFiniteOutputs(FloatingPointError):
    """The statistics pass met non-finite model outputs."""


def sampled_statistics(model, blocks: Sequence[CurvatureBlock], batch, loss, *, fisher: str = "mc",
                       targets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                       check_finite: bool = True) -> tuple[BatchStatistics, Recording]:
    """Steps 2-3 of Algorithm 2's statistics (Sec 5): one forward on ``batch`` with the blocks
    hooked and one backward of Σ loss(y) with y sampled from the model (``fisher="mc"``; the
    ignored terms of ``targets`` stay ignored) or y = ``targets`` (``"empirical"``). Module
    buffers are left as they were (:func:`~kfac_fast.batch.buffers_kept`).

    ``check_finite=False`` (the sync-free step): no host check of the outputs; targets are drawn
    from the outputs with NaN/inf replaced by 0, and the non-finite outputs show up in the
    statistics (``finite_flags``), which the caller then keeps out of the factors. N stays a
    device tensor when a mask leaves terms out."""
    from ..batch import batch_size, buffers_kept, call
    from .capture import capture
    from .losses import check_output, sample_targets

    with torch.enable_grad(), buffers_kept(model), internal_pass():
        with capture(blocks) as rec:
            try:
                z = call(model, batch)
            except ValueError as e:
                if "more than 1 value per channel" not in str(e):
                    raise
                raise ValueError(
                    f"K-FAC's statistics pass runs on a subset of {batch_size(batch)} example(s) of the batch (the "
                    "tau1 fraction) and a BatchNorm in training mode has one value per channel there: use a batch of "
                    "at least 2/tau1 examples or raise tau1 (KFAC(..., tau1=), KFACPreconditioner(..., tau1=)); "
                    f"torch said: {e}") from e
        check_output(z, loss)
        if fisher == "mc":
            if not check_finite:
                y = sample_targets(loss, torch.nan_to_num(z.detach(), nan=0.0, posinf=0.0, neginf=0.0), generator,
                                   like=targets)
            elif not bool(torch.isfinite(z).all()):
                raise NonFiniteOutputs("the model's outputs in the sampled-target pass contain NaN or inf, so no "
                                       "targets can be sampled: the parameters or inputs have diverged (lower the "
                                       "learning rate or raise the damping)")
            else:
                y = sample_targets(loss, z, generator, like=targets)
        else:
            y = targets
            loss.check_targets(z, y)
        n_terms = loss.count(z, y)
        grads = statistics_grads(loss.total(z, y), blocks, rec)
    return block_rows(blocks, rec, grads, n_terms if not check_finite else int(n_terms)), rec
