"""Data-parallel :class:`~kfac_fast.KFACPreconditioner` (issue 15): the same preconditioner on p
ranks, each with its own shard of the batch.

    torch.distributed.init_process_group("gloo")            # or torchrun + "nccl"
    model = DistributedDataParallel(net)                    # or the plain net
    pre = DistributedKFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2)
    for x, y in shard_of_loader:                            # m/p examples per rank
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()             # DDP averages .grad
        pre.step(x, y)                                      # .grad ← F̆⁻¹ .grad, same on all ranks
        sgd.step()

One iteration, per rank (the paper's Sec 8 tasks with the communication of
:mod:`kfac_fast.distributed` in between):

1. gradient: with a plain model, start ONE flat all-reduce of every ``.grad`` (the mean over
   ranks, as DDP would); a DDP model has already averaged them;
2. statistics on this rank's τ₁ subset (its own generator stream), the pending factors updated
   locally (Sec 5);
3. one small all-reduce of the failure flags (a non-finite sampled-pass output, non-finite
   gradients on any rank): every rank takes the same decision;
4. start ONE flat all-reduce of the pending factors (upper triangles), every
   ``factor_reduce_every`` iterations and always before a refresh;
5. refresh due (first 3 iterations, every T3): wait for the factors, commit, the sharded
   refresh (:class:`~kfac_fast.distributed.ShardedInverse`) and precondition; otherwise
   precondition with the current inverse while the factor reduction is in flight, then wait and
   commit;
6. write the directions into ``.grad`` (the same bits on every rank, so the parameters stay
   bitwise identical across ranks under any deterministic optimizer).

World 2 with batch m/2 per rank equals world 1 with batch m (float64, to rounding) when the
factors are exact averages (see :mod:`kfac_fast.distributed`: equal shard sizes, no
``diagonal``-kind blocks, no training-mode BatchNorm) and the τ₁ subsets together are the
union batch (``tau1=1``); with ``fisher="mc"`` or ``tau1 < 1`` the ranks draw different samples,
so the runs agree in distribution only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .batch import select
from .checkpoint import READABLE_VERSIONS, STATE_VERSION
from .curvature.capture import forward_order
from .curvature.factors import BlockFisher, KroneckerFactors, record_to_dict
from .curvature.inverses import build_block_inverse
from .curvature.running import RunningFactors, ema_decay, snapshot
from .curvature.statistics import NonFiniteOutputs, sampled_statistics
from .distributed import (
    Distributor,
    PhaseTimer,
    ShardedInverse,
    check_mode,
    default_distributor,
    common_seed,
    rank_generator,
    unwrap_model,
)
from .preconditioner import KFACPreconditioner
from .step_size import apply_step_size

STATE_KIND = "DistributedKFACPreconditioner"


def _all_finite(tensors) -> bool:
    """Whether every tensor is finite, with one host sync."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class DistributedKFACPreconditioner(KFACPreconditioner):
    """:class:`~kfac_fast.KFACPreconditioner` over the ranks of a ``torch.distributed`` group.

    Call :meth:`step` on every rank with that rank's batch shard, after ``loss.backward()``.
    Every argument of :class:`~kfac_fast.KFACPreconditioner` is accepted (keyword-only), plus:

    Args:
        model: the network, plain or wrapped in ``DistributedDataParallel`` (block names are
            the plain model's: ``model.0``, never ``model.module.0``).
        distributor: a :class:`~kfac_fast.distributed.Distributor` (default: a
            ``TorchDistributor`` over ``process_group`` when torch.distributed is initialised,
            else a ``LocalDistributor``).
        process_group: the group for the default distributor (None: the default group).
        mode: ``"replicate_inverses"`` (owners broadcast the inverses at each refresh, every
            rank preconditions every block) or ``"shard_inverses"`` (owners precondition their
            blocks, directions all-gathered every iteration).
        factor_reduce_every: reduce the factors every this many iterations (and always before
            a refresh and a checkpoint). The running averages are linear, so the factors at a
            reduction are the same (to rounding) whatever this is: between reductions each rank
            keeps its own ε-average of its own estimates; only the traffic changes.
        average_gradients: average every ``.grad`` over the ranks in :meth:`step` (default:
            True for a plain model, False for a DDP-wrapped one, which already did).
        seed: common seed of the per-rank generator streams (default: drawn from torch's
            global RNG on rank 0 and broadcast). Ignored when ``generator`` is given (which must
            then differ between ranks).
    """

    def __init__(self, model: nn.Module, *, loss: str, distributor: Optional[Distributor] = None,
                 process_group=None, mode: str = "replicate_inverses", factor_reduce_every: int = 1,
                 average_gradients: Optional[bool] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        self.mode = check_mode(mode)
        if not isinstance(factor_reduce_every, int) or factor_reduce_every < 1:
            raise ValueError(f"factor_reduce_every must be a positive integer, got {factor_reduce_every!r}")
        self.distributor = distributor if distributor is not None else default_distributor(process_group)
        self.factor_reduce_every = factor_reduce_every
        wrapped = isinstance(model, DistributedDataParallel)
        self.average_gradients = (not wrapped) if average_gradients is None else bool(average_gradients)
        inner = unwrap_model(model)
        d = self.distributor
        if generator is None:
            if seed is None:
                seed = common_seed(d)
            dev = next(inner.parameters()).device
            generator = rank_generator(seed, d.rank, dev)
        self.seed = seed
        if kwargs.get("capture", "pass") == "hooks":
            raise ValueError("capture='hooks' is not data-parallel yet: the statistics of the user's own passes "
                             "are not reduced over the ranks; use capture='pass' (the default) with "
                             "torch.distributed")
        if kwargs.get("Tf", 1) != 1:
            raise ValueError("Tf (statistics every Tf steps) is not data-parallel yet: drop it (factor_reduce_every "
                             "thins the factor reductions instead) or train on one process")
        super().__init__(inner, loss=loss, generator=generator, **kwargs)
        self.timer = PhaseTimer()
        self.inverse: Optional[ShardedInverse] = None
        self._synced = True  # the committed factors are the same on every rank

    # ------------------------------------------------------------------ the iteration
    def _new_inverse(self) -> ShardedInverse:
        def build(records, warm):
            return build_block_inverse(self.inverse_kind, records, damping=self.damping, backend=self.backend,
                                       warm_start=warm, factorization=self.factorization)

        return ShardedInverse(self.distributor, mode=self.mode, kind=self.inverse_kind, build=build,
                              backend=self.backend, timer=self.timer)

    def step(self, inputs, targets: Optional[torch.Tensor] = None) -> None:
        """Update the factors on (a τ₁ subset of) this rank's ``inputs``, reduce them over the
        ranks and precondition ``.grad`` in place, the same on every rank. A collective: every
        rank calls it once per iteration, with shards of equal size.

        Raises:
            FloatingPointError: the sampled-target pass met non-finite outputs on any rank (all
                ranks raise; nothing is committed).
        """
        d, t = self.distributor, self.timer
        m = self._check_batch(inputs, targets)
        for layer in self.layers:
            if any(p.grad is None for p in layer.params()):
                layer.grad_matrix()  # raises: backward was not called
        with t("gradient_start"):
            # local check before averaging (a NaN on this rank is a NaN in the mean); one sync
            local_ok = _all_finite(p.grad for l in self.layers for p in l.params())
            handle_g = None
            if self.average_gradients and d.world_size > 1:
                grads_all = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
                handle_g = d.start_all_reduce_mean(grads_all, kind="gradient")
        failure: Optional[BaseException] = None
        with t("statistics"):
            size = max(1, int(round(self.tau1 * m)))
            idx = torch.randperm(m, generator=self.generator, device=self.device)[:size]
            x1 = select(inputs, idx)
            y1 = None if targets is None else targets.index_select(0, idx)
            try:
                stats, rec = sampled_statistics(self.model, self.layers, x1, self.loss, fisher=self.fisher,
                                                targets=y1, generator=self.generator)
            except NonFiniteOutputs as exc:
                failure = exc
        with t("scalars"):
            # on the model's device: NCCL reduces CUDA tensors only
            flags = torch.tensor([float(failure is not None), float(not local_ok)], dtype=torch.float64,
                                 device=self.device)
            flags = d.reduce_scalars(flags, op="sum")
        if float(flags[0]) > 0:
            if handle_g is not None:
                handle_g.wait()
            if failure is not None:
                raise failure
            raise NonFiniteOutputs(f"the sampled-target pass met non-finite model outputs on {int(flags[0])} of "
                                   f"{d.world_size} ranks (not this one); the step is rejected on every rank")
        if not self._ordered:
            order = forward_order(self.layers, rec)
            self.layers = [self.layers[i] for i in order]
            stats = stats.permuted(order)
            self._ordered = True
        if self.factors is None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.inverse_kind == "block_tridiagonal")
        with t("factor_update"):
            self.factors.update(stats, eps=ema_decay(self.k, self.ema_max), backend=self.backend)
        refresh = self.inverse is None or self.k <= 3 or self.k % self.T3 == 0
        reduce = d.world_size > 1 and (refresh or self.k % self.factor_reduce_every == 0)
        with t("factor_start"):
            handle_f = d.start_reduce_factors(self.factors) if reduce else None
        with t("gradient_wait"):
            if handle_g is not None:
                handle_g.wait()
            # averaged gradients are the same on every rank, so is this check
            ok = float(flags[1]) == 0 and (handle_g is None or _all_finite(p.grad for l in self.layers
                                                                          for p in l.params()))
            grads = [l.grad_matrix() for l in self.layers]
        U = None
        if refresh:
            with t("factor_wait"):
                if handle_f is not None:
                    handle_f.wait()
                self.factors.commit()
            self._synced = True
            if self.inverse is None:
                self.inverse = self._new_inverse()
            self.inverse.refresh(snapshot(self.factors.current))
            if ok:
                U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
        else:
            if ok:  # overlapped with the factor reduction in flight
                U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
            with t("factor_wait"):
                if handle_f is not None:
                    handle_f.wait()
                self.factors.commit()
            self._synced = handle_f is not None or d.world_size == 1
        if U is None:
            # e.g. a GradScaler overflow step on any rank: leave .grad (non-finite) as it is
            self.k += 1
            return
        # the step-size rule reduces over U (norms, inner products): an owner's own direction and
        # the gathered copies elsewhere must have the same dtype and memory layout, or the sums'
        # rounding, and so the parameters, differ between ranks
        U = apply_step_size(self.step_size, grads, [u.to(g.dtype).contiguous() for u, g in zip(U, grads)])
        with t("write"):
            with torch.no_grad():
                for layer, u in zip(self.layers, U):
                    for p, part in zip(layer.params(), layer.from_matrix(u)):
                        p.grad.copy_(part.to(p.dtype).reshape(p.shape))
        self.k += 1

    # ------------------------------------------------------------------ checkpoints
    def sync_factors(self) -> None:
        """Average the committed factors over the ranks if iterations since the last reduction
        left them rank-local (``factor_reduce_every > 1``); a collective."""
        if self.factors is not None and not self._synced and self.distributor.world_size > 1:
            self.distributor.reduce_factors(self.factors, which="current")
        self._synced = True

    def state_dict(self) -> dict:
        """The whole state, on every rank (a collective: every rank calls it; save rank 0's).

        The factors are replicated (reduced first if needed) and the inverse is saved as the
        factor snapshot it was built from (also replicated), so nothing but the generator
        states needs gathering: ``"generators"`` holds every rank's, in rank order."""
        self.sync_factors()
        gens = self.distributor.all_gather_object(self.generator.get_state())
        inv = self.inverse
        return {
            "version": STATE_VERSION, "kind": STATE_KIND, "layers": [l.name for l in self.layers],
            "ordered": self._ordered, "k": self.k, "damping": self.damping,
            "factors": None if self.factors is None else self.factors.state(),
            "inverse_records": None if inv is None or inv.records is None else
            [record_to_dict(r) for r in inv.records],
            "generators": gens, "seed": self.seed, "world_size": self.distributor.world_size, "mode": self.mode,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on any world size (a collective when an inverse is rebuilt:
        every rank calls it with the same state). The refresh's assignment is recomputed for this
        world and every rank rebuilds its share of the inverse from the saved snapshot; each rank
        takes its own generator state when the world size is the one saved, else a fresh stream
        from the saved seed, the rank and the iteration."""
        if state.get("kind") != STATE_KIND or state.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a {STATE_KIND} state_dict of this version (got kind {state.get('kind')!r}); a "
                             "plain KFACPreconditioner state loads into KFACPreconditioner")
        self._load_layers_and_factors(state)
        self.inverse = None
        self._synced = True
        if state.get("inverse_records") is not None:
            if self.factors is None:
                raise ValueError("state_dict has an inverse but no factors")
            records = []
            for t, dct in zip(self.factors.current, state["inverse_records"]):
                if isinstance(t, BlockFisher):
                    records.append(BlockFisher(F=dct["F"].to(t.F.device, t.F.dtype), name=t.name, kind=t.kind))
                else:
                    cv = lambda v, like: None if v is None else v.to(like.device, like.dtype)  # noqa: E731
                    records.append(KroneckerFactors(A=cv(dct["A"], t.A), G=cv(dct["G"], t.G),
                                                    A_next=cv(dct.get("A_next"), t.A),
                                                    G_next=cv(dct.get("G_next"), t.G),
                                                    name=t.name, homogeneous=t.homogeneous))
            self.inverse = self._new_inverse()
            self.inverse.refresh(records)
        d = self.distributor
        gens = state.get("generators") or []
        if len(gens) == d.world_size:
            self.generator.set_state(gens[d.rank])
        elif self.seed is not None or state.get("seed") is not None:
            from .distributed import rank_seed

            base = state.get("seed") if state.get("seed") is not None else self.seed
            self.generator.manual_seed(rank_seed(rank_seed(int(base), self.k), d.rank))
