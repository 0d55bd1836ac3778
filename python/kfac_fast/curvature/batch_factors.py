"""The curvature of one batch: Kronecker factors and block Fisher matrices computed from the
model's per-example derivatives (paper Sec 3, 5), with the exact, sampled (MC) or empirical
Fisher. The running averages across iterations are :mod:`.running`'s.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..batch import batch_size, call, select
from .blocks import DIAGONAL, CurvatureBlock, find_blocks
from .capture import Recording, capture, forward_order
from .factors import KroneckerFactors
from .losses import PredictiveDistribution, check_output, get_loss, rows, sample_targets
from .running import RunningFactors
from .statistics import BatchStatistics, block_rows, statistics_grads

FISHER_KINDS = ("exact", "mc", "empirical")


def per_example_derivatives(
    rec: Recording,
    z: torch.Tensor,
    loss: PredictiveDistribution,
    *,
    fisher: str,
    targets: Optional[torch.Tensor] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    blocks: Optional[Sequence[CurvatureBlock]] = None,
) -> list[list[torch.Tensor]]:
    """Per-example g for each "draw": draws[k][block] = ∂(Σ loss terms)/∂(block output) (or
    ∂/∂parameter for diagonal blocks), weights folded in so that G = (1/N) Σ_k Σ_rows g gᵀ.

    ``exact`` enumerates F_R = Σ_k b_k b_kᵀ (one backward per class / output unit; ignored
    terms get b = 0), ``mc`` samples ``mc_samples`` targets from the model (ignored terms of
    ``targets`` stay ignored), ``empirical`` uses ``targets``. Without ``blocks`` the draws are
    w.r.t. ``rec.outputs`` (every recorded block).
    """
    if blocks is None:
        outs = list(rec.outputs)
        grad = lambda out, go=None: list(torch.autograd.grad(out, outs, grad_outputs=go, retain_graph=True))  # noqa
    else:
        grad = lambda out, go=None: statistics_grads(out, blocks, rec, retain_graph=True, grad_outputs=go)  # noqa
    draws: list[list[torch.Tensor]] = []
    if fisher == "exact":
        # E_y[g gᵀ] with independent y_t per loss term: Σ_t J_tᵀ F_R J_t, no products between
        # terms. One backward per (class k, term position p): the m examples' terms at position p
        # share a pass (an example's rows only see its own terms), the P positions of an example
        # do not (a row feeding several terms, e.g. a token before causal attention, would
        # otherwise collect the cross terms J_tᵀ b b'ᵀ J_t').
        B = loss.fisher_factors(rows(z))  # (K, M, k)
        mask = loss.mask(targets)
        if mask is not None:
            B = B * mask.to(B.dtype).unsqueeze(-1)
        m = z.shape[0]
        P = B.shape[1] // m
        for k in range(B.shape[0]):
            Bk = B[k].reshape(m, P, -1)
            for p in range(P):
                if P == 1:
                    go = Bk
                else:
                    go = torch.zeros_like(Bk)
                    go[:, p] = Bk[:, p]
                draws.append(grad(z, go.reshape(z.shape)))
    elif fisher in ("mc", "empirical"):
        n = mc_samples if fisher == "mc" else 1
        scale = 1.0 / n ** 0.5
        for _ in range(n):
            y = sample_targets(loss, z, generator, like=targets) if fisher == "mc" else targets
            total = loss.total(z, y)  # sum: per-example derivatives, not scaled by 1/N
            draws.append([None if g is None else g * scale for g in grad(total)])
    else:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    return draws


def _exact_diagonal(model, batch, loss, block, targets) -> torch.Tensor:
    """N·diag F of one parameter, exactly: Σ_n Σ_t Σ_c (J_{n,t}ᵀ b_{n,t,c})², one backward per
    example, loss term and output class (small models only: ``fisher="exact"``)."""
    p = block.params()[0]
    m = batch_size(batch)
    total = torch.zeros_like(p, dtype=torch.float64)
    for n in range(m):
        one = select(batch, torch.tensor([n], device=p.device))
        z = call(model, one)
        B = loss.fisher_factors(rows(z))  # (K, P, k)
        mask = loss.mask(None if targets is None else targets[n:n + 1])
        if mask is not None:
            B = B * mask.to(B.dtype).unsqueeze(-1)
        for k in range(B.shape[0]):
            for t in range(B.shape[1]):
                go = torch.zeros_like(B[k])
                go[t] = B[k, t]
                (g,) = torch.autograd.grad(z, [p], grad_outputs=go.reshape(z.shape), retain_graph=True,
                                           allow_unused=True)
                if g is not None:
                    total += g.double() ** 2
    return total


def block_factors(
    model: nn.Module,
    inputs,
    loss,
    *,
    fisher: str = "exact",
    targets: Optional[torch.Tensor] = None,
    mc_samples: int = 1,
    tridiagonal: bool = False,
    generator: Optional[torch.Generator] = None,
    kfac_approx: str = "expand",
    unsupported: str = "diagonal",
    tied_weights: str = "unsupported",
    ignore_index: Optional[int] = -100,
    ignore_nan_targets: bool = False,
) -> list:
    """The curvature of every block of ``model`` on one batch (no running average).

    Returns one record per block in forward order (diagonal blocks of loose parameters last):
    :class:`KroneckerFactors` for Kronecker blocks (Linear, Conv2d: Ā dense; Embedding: Ā a
    vector, its diagonal) and :class:`BlockFisher` (F: (k, b, b)) for norm scale-and-shift and
    diagonal blocks. Conventions: :mod:`kfac_fast.curvature.blocks.base` (Ā the mean over its
    rows, G and F divided by N, the number of loss terms). Arguments as :func:`kronecker_factors`;
    ``unsupported``, ``tied_weights`` as :func:`~kfac_fast.curvature.blocks.find_blocks`.
    """
    dist = get_loss(loss, ignore_index=ignore_index, ignore_nan_targets=ignore_nan_targets)
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs targets=")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    blocks = find_blocks(model, kfac_approx=kfac_approx, unsupported=unsupported, tied_weights=tied_weights)
    batch_size(inputs)  # validates the batch
    with torch.enable_grad():
        with capture(blocks) as rec:
            z = call(model, inputs)
        check_output(z, dist)
        if targets is not None:
            dist.check_targets(z, targets)
        N = int(dist.count(z, targets))
        draws = per_example_derivatives(rec, z, dist, fisher=fisher, targets=targets, mc_samples=mc_samples,
                                        generator=generator, blocks=blocks)
    order = forward_order(blocks, rec)
    blocks = [blocks[i] for i in order]
    rec = Recording(inputs=[rec.inputs[i] for i in order], outputs=[rec.outputs[i] for i in order])
    first = next(p for b in blocks for p in b.params())  # a tied embedding owns none
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    running = RunningFactors(blocks, dtype=dtype, device=z.device, tridiagonal=tridiagonal)
    # the batch estimate sums over the draws (each draw's derivatives already carry 1/sqrt(n)):
    # one update with every draw's G rows and per-example vectors stacked; the A rows are the
    # same in every draw (the first draw's)
    per_draw = [block_rows(blocks, rec, [d[i] for i in order], N) for d in draws]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    stats = BatchStatistics(a=per_draw[0].a, g=[cat([s.g[i] for s in per_draw]) for i in range(len(blocks))],
                            u=[cat([s.u[i] for s in per_draw]) for i in range(len(blocks))], n_terms=N)
    running.update(stats, eps=0.0, backend="torch")
    acc = running.pending
    if fisher == "exact":  # diagonal blocks: the exact per-example diagonal, not the summed square
        with torch.enable_grad():
            for i, b in enumerate(blocks):
                if b.factor_kind == DIAGONAL:
                    acc[i].F.copy_((_exact_diagonal(model, inputs, dist, b, targets) / N).reshape(-1, 1, 1))
    return acc


def kronecker_factors(
    model: nn.Module,
    inputs,
    loss,
    *,
    fisher: str = "exact",
    targets: Optional[torch.Tensor] = None,
    mc_samples: int = 1,
    tridiagonal: bool = False,
    generator: Optional[torch.Generator] = None,
    kfac_approx: str = "expand",
    ignore_index: Optional[int] = -100,
    unsupported: str = "error",
    ignore_nan_targets: bool = False,
) -> list[KroneckerFactors]:
    """Kronecker factors of every Kronecker block of ``model`` on the batch ``inputs``.

    Args:
        model: network with Linear, Conv2d or Embedding layers (other trainable parameters are
            ignored here; :func:`block_factors` gives every block).
        inputs: the batch: a tensor, tuple (``model(*inputs)``) or dict (``model(**inputs)``);
            dim 0 of its tensors indexes the m examples.
        loss: ``"softmax_cross_entropy"``, ``"sigmoid_cross_entropy"`` or ``"squared_error"``;
            outputs (m, ..., k), one loss term per leading position.
        fisher: ``"exact"`` (expectation over the predictive distribution, one backward per
            output class/unit: for small models), ``"mc"`` (``mc_samples`` sampled targets,
            Sec 5) or ``"empirical"`` (uses ``targets``; not the Fisher, see Sec 5 footnote).
        tridiagonal: also compute the cross factors A_next, G_next (Sec 4.3) between
            consecutive dense Kronecker blocks with the same rows (else zeros).
        generator: RNG for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers applied at R positions per example
            (Eschenhagen et al. 2023); see :mod:`kfac_fast.curvature.blocks.base`.
        ignore_index: softmax targets equal to it are excluded (masks the exact/mc draws too
            when ``targets`` are given). ``ignore_nan_targets``: the same for the float losses,
            a term whose targets are all NaN.
        unsupported: ``"error"`` (default: a trainable parameter no block models is refused, as
            no factor would cover it) or ``"skip"`` (ignore such parameters). Norm blocks are
            not Kronecker blocks: they are left out of the list (see :func:`block_factors`).

    Returns:
        One :class:`KroneckerFactors` per Kronecker block, in forward order: A (a, a) the mean
        over its rows of ā āᵀ (a vector for Embedding's diagonal Ā), G = (1/N) Σ_rows g gᵀ.
    """
    recs = block_factors(model, inputs, loss, fisher=fisher, targets=targets, mc_samples=mc_samples,
                         tridiagonal=tridiagonal, generator=generator, kfac_approx=kfac_approx,
                         unsupported="skip" if unsupported == "diagonal" else unsupported,
                         ignore_index=ignore_index, ignore_nan_targets=ignore_nan_targets)
    return [r for r in recs if isinstance(r, KroneckerFactors)]
