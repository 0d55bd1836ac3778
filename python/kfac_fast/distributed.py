"""Data-parallel K-FAC: the communication K-FAC adds to data parallelism (DESIGN item 6).

A :class:`Distributor` is everything the optimizers need from the ranks: average gradients,
average the running factors, shard the inverse refresh and give every rank the result, reduce
the scalars every rank must agree on. :class:`LocalDistributor` (one process) makes every call a
no-op; :class:`TorchDistributor` runs them over ``torch.distributed`` (any backend; tested with
gloo on CPU). Every collective is counted in bytes by kind (:class:`ByteCounter`).

Why averaging the pending factors is the global statistic (checked against
:meth:`~kfac_fast.curvature.running.RunningFactors.update`). Each rank r computes, for every
block, ``pending_r = ε·current + (1−ε)·E_r`` with ``current`` the committed factors and E_r its
batch estimate (Sec 5). If ``current`` is the same on every rank (it is: it was committed from
the previous reduction's result, which the all-reduce makes bitwise identical everywhere) and ε
too (ε depends only on the iteration k), then mean_r pending_r = ε·current + (1−ε)·mean_r E_r,
so the reduction is exact as soon as mean_r E_r is the estimate of the union of the ranks'
batches. It is, for every factor that is a normalised SUM over rows: Ā = (1/R) Σ ā āᵀ (R rows),
G = (1/N) Σ g gᵀ (N loss terms), the diagonal Ā of an embedding (token counts / tokens), the
small dense blocks F = (1/N) Σ u uᵀ and the tridiagonal cross factors, **provided every rank has
the same R and N** (the same local batch size, and for masked losses the same number of kept
terms); then (1/p) Σ_r (1/R) S_r = (1/(pR)) Σ_r S_r. It is **not** exact for:

* the ``diagonal`` kind (a parameter no Kronecker block models), whose estimate is the square
  of the summed gradient, (1/N)(Σ_t ∂ℓ_t)²: the rank mean is (1/p) Σ_r (1/N_r) S_r², the
  squares of the shard sums, not of the total. With sampled targets (``fisher="mc"``) both are
  unbiased for the Fisher's diagonal (the cross terms have zero mean); with the empirical
  Fisher the over-estimate N·(mean gradient)² becomes the ranks' (N/p)·(shard mean)² terms;
* statistics that depend on the batch as a whole (BatchNorm in training mode normalises with
  the τ₁ subset's moments: each rank uses its own subset, as DDP without SyncBatchNorm does).

Because the update is linear, reducing only every ``r``-th iteration (less communication) gives
exactly the same factors at the reduction iterations (up to rounding): between reductions each
rank keeps its own ε-average of its own estimates, and the average of the ranks' averages is the
average of the averaged estimates. What must not happen is to read a rank-local factor: the
inverse refresh (and a checkpoint) must come right after a reduction. With unequal R or N the
plain mean weights the ranks equally, not by their rows.

Sharding the refresh (Sec 8 task 5). The blocks' inverse work is assigned to ranks by greedy
longest-processing-time bin packing on cost n³ (:func:`assign`, as KAISA and Distributed
Shampoo do; deterministic, so every rank computes the same owners without talking). Two modes
(:data:`MODES`):

* ``"replicate_inverses"``: each owner builds its blocks' damped inverses and broadcasts them;
  every rank then preconditions every block (more memory: all inverses everywhere; traffic only
  on refresh iterations);
* ``"shard_inverses"``: each owner keeps its blocks' inverses and preconditions only its blocks;
  the directions are all-gathered every iteration (least memory: 1/p of the inverses; traffic
  every iteration, the size of the gradient).

Agreement: everything that decides (h, ∇hᵀδ, Γ on S₂, ρ's numerator, finite checks) must be
the same number on every rank: :meth:`Distributor.reduce_scalars` packs them into one vector.
A sum (or mean) is NaN on every rank as soon as one rank's contribution is NaN, so a reduced
finite check rejects the step on all ranks together. Quantities that are already replicated
(the averaged gradient, δ, Euclidean products of replicated vectors) need no reduction: they are
computed from bitwise identical inputs by the same code.

Per-rank sampling: :func:`rank_generator` derives one generator stream per rank from a common
seed (the τ₁ subset and the sampled targets differ between ranks, as they must for the ranks'
estimates to be independent).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from .curvature.block_inverse import apply_factored, apply_grouped
from .curvature.running import RunningFactors, pack_tensors, packed_numel, unpack_tensors_
from .curvature.tied_inverse import TiedSumInverse

#: communication kinds the byte counter reports
KINDS = ("gradient", "factors", "inverses", "directions", "scalars", "buffers")
#: the two ways of giving every rank the preconditioned directions (see the module docstring)
MODES = ("replicate_inverses", "shard_inverses")

Symmetric = Union[bool, Sequence[bool]]
#: all_gather_directions pads every rank's share to the largest while p·max ≤ PAD_LIMIT·total
PAD_LIMIT = 1.25


# ---------------------------------------------------------------------------- byte accounting
@dataclass
class ByteCounter:
    """Bytes handed to collectives, per kind (:data:`KINDS`).

    ``payload[kind]``: the size of the buffers passed to the collectives (for an all-reduce the
    buffer, for a broadcast the buffer, for an all-gather the p gathered chunks), summed over
    calls; ``calls[kind]`` the number of collectives. ``sent[kind]``: bytes each rank sends on
    the wire under the usual bandwidth-optimal algorithms (ring all-reduce 2(p−1)/p·S, ring
    all-gather (p−1)/p·S, broadcast S on the root and pipelined forwarding ≈ S per rank
    averaged over ranks: (p−1)/p·S). The backend may do otherwise (gloo picks its algorithm by
    size); the payload is exact, the wire model is the one :mod:`benchmarks.cost_model_distributed`
    uses."""

    payload: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    sent: dict = field(default_factory=lambda: {k: 0.0 for k in KINDS})
    calls: dict = field(default_factory=lambda: {k: 0 for k in KINDS})

    def add(self, kind: str, op: str, nbytes: int, world: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown communication kind {kind!r}; choose one of {', '.join(KINDS)}")
        p = max(world, 1)
        wire = {"all_reduce": 2.0 * (p - 1) / p, "all_gather": (p - 1) / p, "broadcast": (p - 1) / p}[op]
        self.payload[kind] += int(nbytes)
        self.sent[kind] += wire * nbytes
        self.calls[kind] += 1

    def reset(self) -> None:
        for d in (self.payload, self.sent, self.calls):
            for k in d:
                d[k] = 0

    def snapshot(self) -> dict:
        """{"payload": {...}, "sent": {...}, "calls": {...}} copies."""
        return {"payload": dict(self.payload), "sent": dict(self.sent), "calls": dict(self.calls)}


# ---------------------------------------------------------------------------- pure helpers
def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of every work item: greedy longest-processing-time bin packing.

    Items in decreasing cost (ties: lower index first) each go to the rank with the least load
    so far (ties: lower rank). Pure and deterministic: every rank computes the same owners from
    the same costs without communicating. LPT's makespan is at most 4/3 − 1/(3p) of the optimum
    (Graham 1969).

    Args:
        costs: one non-negative cost per item (here n³ per factor or Σ n³ per block).
        world: number of ranks p ≥ 1.

    Returns:
        owners: list of ranks in [0, p), one per item.
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    costs = [float(c) for c in costs]
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"costs must be finite and non-negative, got {costs}")
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda q: (load[q], q))
        owners[i] = r
        load[r] += costs[i]
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], world: int) -> list[float]:
    """Total cost per rank of an assignment."""
    out = [0.0] * world
    for c, r in zip(costs, owners):
        out[r] += float(c)
    return out


def imbalance(costs: Sequence[float], owners: Sequence[int], world: int) -> float:
    """max/mean load of an assignment (1 = perfect balance)."""
    ld = loads(costs, owners, world)
    mean = sum(ld) / world
    return max(ld) / mean if mean > 0 else 1.0


def record_cost(record) -> float:
    """n³ cost of one block's inverse refresh: Σ n³ over its dense factors and n over its
    diagonal ones (a³ + g³ for a dense Kronecker block, g³ + a for a diagonal Ā, a³ + g for a
    diagonal G, k·b³ for k small dense blocks of size b, groups·(a³ + g³) for a grouped block's
    per-group factors)."""
    from .curvature.factors import BlockFisher

    if isinstance(record, BlockFisher):
        k, b = record.F.shape[0], record.F.shape[-1]
        return float(k * b ** 3)
    if record.grouped:
        return float(record.A.shape[0] * (record.A.shape[-1] ** 3 + record.G.shape[-1] ** 3))
    a = record.A.shape[0]
    g = record.G.shape[0]
    return float((a ** 3 if record.A.dim() == 2 else a) + (g ** 3 if record.G.dim() == 2 else g))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for ``rank``'s stream, derived from the common ``seed`` (splitmix64 of the
    pair: distinct, well-mixed seeds for neighbouring ranks and seeds)."""
    return _splitmix64(_splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ int(rank)) >> 1


def rank_generator(seed: int, rank: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator on ``device`` for ``rank``'s own stream (τ₁ subsets, sampled targets), seeded
    by :func:`rank_seed` (common seed, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(rank_seed(seed, rank))
    return g


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict:
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _sym_list(tensors: Sequence[torch.Tensor], symmetric: Symmetric) -> list[bool]:
    if isinstance(symmetric, bool):
        return [symmetric] * len(tensors)
    sym = list(symmetric)
    if len(sym) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(sym)} symmetric flags")
    return sym


# ---------------------------------------------------------------------------- handles
class FactorReduction:
    """An in-flight factor all-reduce (:meth:`Distributor.start_reduce_factors`). ``wait()``
    blocks until it is done, writes the mean back into the factors and returns the mean of the
    ``extra`` vector (None without one). Waiting twice is a no-op returning the same."""

    def __init__(self, factors: Optional[RunningFactors], which: str, buf: Optional[torch.Tensor], work,
                 world: int, n_extra: int, extra: Optional[torch.Tensor]):
        self._factors, self._which, self._buf, self._work = factors, which, buf, work
        self._world, self._n_extra, self._extra = world, n_extra, extra
        self._done = False
        self._result: Optional[torch.Tensor] = None

    def wait(self) -> Optional[torch.Tensor]:
        if self._done:
            return self._result
        self._done = True
        if self._buf is None:  # single process: nothing was sent
            self._result = self._extra
            return self._result
        if self._work is not None:
            self._work.wait()
        self._buf.div_(self._world)
        n = self._buf.numel() - self._n_extra
        self._factors.unpack_flat_(self._buf[:n], self._which)
        self._result = self._buf[n:].clone() if self._n_extra else None
        self._buf = None
        return self._result


class GradientReduction:
    """An in-flight gradient all-reduce (:meth:`Distributor.start_all_reduce_mean`); ``wait()``
    writes the means back into the tensors."""

    def __init__(self, parts: list, world: int):
        self._parts, self._world = parts, world  # [(work, buf, tensors)]

    def wait(self) -> None:
        for work, buf, tensors in self._parts:
            if work is not None:
                work.wait()
            buf.div_(self._world)
            unpack_tensors_(buf, tensors, False)
        self._parts = []


# ---------------------------------------------------------------------------- the protocol
@runtime_checkable
class Distributor(Protocol):
    """What the K-FAC optimizers need from the ranks (see the module docstring). All methods
    are collectives: every rank calls them in the same order with tensors of the same shapes."""

    world_size: int
    rank: int
    counter: ByteCounter

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor], *, kind: str = "gradient") -> None: ...

    def start_all_reduce_mean(self, tensors: Sequence[torch.Tensor], *, kind: str = "gradient"
                              ) -> GradientReduction: ...

    def reduce_factors(self, factors: RunningFactors, *, which: str = "pending",
                       extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]: ...

    def start_reduce_factors(self, factors: RunningFactors, *, which: str = "pending",
                             extra: Optional[torch.Tensor] = None) -> FactorReduction: ...

    def reduce_scalars(self, vec: torch.Tensor, *, op: str = "sum") -> torch.Tensor: ...

    def all_finite(self, ok: Union[bool, torch.Tensor]) -> bool: ...

    def broadcast_from_owners(self, tensors_per_block: Sequence[Sequence[torch.Tensor]], owners: Sequence[int],
                              *, symmetric: Optional[Sequence[Symmetric]] = None, kind: str = "inverses") -> None: ...

    def all_gather_directions(self, directions: Sequence[torch.Tensor], owners: Sequence[int], *,
                              kind: str = "directions") -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list: ...


class LocalDistributor:
    """One process: every collective is a no-op (the tensors already are the global ones), rank
    0 of a world of 1; nothing is counted (nothing is sent)."""

    world_size = 1
    rank = 0

    def __init__(self):
        self.counter = ByteCounter()

    def all_reduce_mean_(self, tensors, *, kind="gradient") -> None:
        return None

    def start_all_reduce_mean(self, tensors, *, kind="gradient") -> GradientReduction:
        return GradientReduction([], 1)

    def reduce_factors(self, factors, *, which="pending", extra=None):
        return extra

    def start_reduce_factors(self, factors, *, which="pending", extra=None) -> FactorReduction:
        return FactorReduction(None, which, None, None, 1, 0, extra)

    def reduce_scalars(self, vec, *, op="sum"):
        _check_op(op)
        return vec

    def all_finite(self, ok) -> bool:
        return _local_ok(ok)

    def broadcast_from_owners(self, tensors_per_block, owners, *, symmetric=None, kind="inverses") -> None:
        if any(r != 0 for r in owners):
            raise ValueError(f"LocalDistributor has one rank (0); owners {sorted(set(owners))}")

    def all_gather_directions(self, directions, owners, *, kind="directions") -> None:
        if any(r != 0 for r in owners):
            raise ValueError(f"LocalDistributor has one rank (0); owners {sorted(set(owners))}")

    def broadcast_object(self, obj, src=0):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]


def _local_ok(ok: Union[bool, torch.Tensor]) -> bool:
    """A bool as it is; a floating tensor: all finite; any other tensor: all true."""
    if isinstance(ok, torch.Tensor):
        return bool(torch.isfinite(ok).all()) if ok.is_floating_point() else bool(ok.all())
    return bool(ok)


def _check_op(op: str) -> None:
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")


class TorchDistributor:
    """The collectives over ``torch.distributed`` (initialised by the caller:
    ``torch.distributed.init_process_group("gloo" | "nccl", ...)``).

    Args:
        process_group: the group to reduce over (None: the default group).
        counter: a :class:`ByteCounter` to add to (a new one by default).
    """

    def __init__(self, process_group=None, *, counter: Optional[ByteCounter] = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributor needs an initialised process group: call "
                               "torch.distributed.init_process_group(backend, ...) first (torchrun sets the "
                               "environment), or use LocalDistributor() for one process")
        self._dist = dist
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.counter = counter if counter is not None else ByteCounter()

    def _global(self, r: int) -> int:
        """The global rank of group rank ``r`` (broadcast's ``src`` is a global rank)."""
        return r if self.group is None else self._dist.get_global_rank(self.group, r)

    def _count(self, kind: str, op: str, buf: torch.Tensor, n: int = 1) -> None:
        self.counter.add(kind, op, buf.numel() * buf.element_size() * n, self.world_size)

    # ------------------------------------------------------------------ means of tensors
    def start_all_reduce_mean(self, tensors: Sequence[torch.Tensor], *, kind: str = "gradient"
                              ) -> GradientReduction:
        """Start averaging ``tensors`` over the ranks: one flat all-reduce per dtype (and device)
        of all of them packed (any shapes); ``wait()`` on the handle writes the means back."""
        tensors = list(tensors)
        parts = []
        for (_dtype, _dev), idx in _by_dtype(tensors).items():
            ts = [tensors[i] for i in idx]
            buf = pack_tensors(ts, False)
            self._count(kind, "all_reduce", buf)
            work = self._dist.all_reduce(buf, group=self.group, async_op=True)
            parts.append((work, buf, ts))
        return GradientReduction(parts, self.world_size)

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor], *, kind: str = "gradient") -> None:
        """Replace every tensor by its mean over the ranks, in place: one flat all-reduce per
        dtype. ``kind`` is the byte counter's label (default ``"gradient"``)."""
        self.start_all_reduce_mean(tensors, kind=kind).wait()

    # ------------------------------------------------------------------ factors
    def start_reduce_factors(self, factors: RunningFactors, *, which: str = "pending",
                             extra: Optional[torch.Tensor] = None) -> FactorReduction:
        """Start averaging every factor of ``factors`` (``which`` buffer set, default the pending
        one just updated) over the ranks: ONE flat all-reduce of the upper triangles of the
        symmetric factors and all of the others (:meth:`RunningFactors.pack_flat`). ``extra``,
        a 1-D tensor, rides along in the same buffer (cast to the factor dtype): its rank mean
        is what ``wait()`` returns (e.g. failure flags, so a rank's failure is every rank's)."""
        n = factors.flat_numel()
        n_extra = 0 if extra is None else extra.numel()
        buf = torch.empty(n + n_extra, dtype=factors.dtype, device=_factor_device(factors))
        factors.pack_flat(which, out=buf[:n])
        if extra is not None:
            buf[n:].copy_(extra.reshape(-1))
        self._count("factors", "all_reduce", buf)
        work = self._dist.all_reduce(buf, group=self.group, async_op=True)
        return FactorReduction(factors, which, buf, work, self.world_size, n_extra, extra)

    def reduce_factors(self, factors: RunningFactors, *, which: str = "pending",
                       extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """:meth:`start_reduce_factors` and wait (returns the mean of ``extra``)."""
        return self.start_reduce_factors(factors, which=which, extra=extra).wait()

    # ------------------------------------------------------------------ scalars
    def reduce_scalars(self, vec: torch.Tensor, *, op: str = "sum") -> torch.Tensor:
        """The sum (``op="sum"``, for per-rank sums such as Σ over S₂ of the quadratic terms) or
        mean (``"mean"``, for per-rank means over equal shard sizes) of the packed 1-D vector
        over the ranks, a new tensor. A NaN in any rank's vector makes that entry NaN on all
        ranks (pack finite flags as 0/1 or as the checked values themselves)."""
        _check_op(op)
        out = vec.detach().clone().reshape(-1)
        self._count("scalars", "all_reduce", out)
        self._dist.all_reduce(out, group=self.group)
        if op == "mean":
            out.div_(self.world_size)
        return out.reshape(vec.shape)

    def all_finite(self, ok: Union[bool, torch.Tensor]) -> bool:
        """Whether ``ok`` holds on every rank (a bool, or a tensor: all of it true / finite if
        floating). Same answer on all ranks."""
        bad = torch.tensor([0.0 if _local_ok(ok) else 1.0], dtype=torch.float64, device=self._device())
        return float(self.reduce_scalars(bad)[0]) == 0.0

    def _device(self) -> torch.device:
        if self._dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ sharded refresh
    def broadcast_from_owners(self, tensors_per_block: Sequence[Sequence[torch.Tensor]], owners: Sequence[int],
                              *, symmetric: Optional[Sequence[Symmetric]] = None, kind: str = "inverses") -> None:
        """Give every rank the tensors of every block from its owner, in place.

        Args:
            tensors_per_block: per block a list of tensors: the values on rank ``owners[i]``,
                buffers of the same shapes and dtypes elsewhere (overwritten).
            owners: the owner rank of every block (e.g. from :func:`assign`).
            symmetric: per block, a bool or one bool per tensor: send only the upper triangles
                of those (..., n, n) tensors; every rank, the owner included, then holds the
                mirrored upper triangle (exactly symmetric, identical on all ranks).
            kind: the byte counter's label (``"inverses"``).

        One broadcast per (owner, dtype), all started before any is waited.
        """
        blocks = [list(ts) for ts in tensors_per_block]
        if len(owners) != len(blocks):
            raise ValueError(f"{len(blocks)} blocks but {len(owners)} owners")
        syms = [_sym_list(ts, False if symmetric is None else symmetric[i]) for i, ts in enumerate(blocks)]
        pending = []
        for r in range(self.world_size):
            flat, flags = [], []
            for i, ts in enumerate(blocks):
                if owners[i] == r:
                    flat += ts
                    flags += syms[i]
            for (_dt, _dev), idx in _by_dtype(flat).items():
                ts = [flat[j] for j in idx]
                fs = [flags[j] for j in idx]
                if r == self.rank:
                    buf = pack_tensors(ts, fs)
                else:
                    buf = torch.empty(packed_numel(ts, fs), dtype=ts[0].dtype, device=ts[0].device)
                self._count(kind, "broadcast", buf)
                work = self._dist.broadcast(buf, src=self._global(r), group=self.group, async_op=True)
                pending.append((work, buf, ts, fs))
        for work, buf, ts, fs in pending:
            work.wait()
            unpack_tensors_(buf, ts, fs)

    def all_gather_directions(self, directions: Sequence[torch.Tensor], owners: Sequence[int], *,
                              kind: str = "directions") -> None:
        """Give every rank every block's direction from its owner, in place: ``directions[i]``
        holds the value on rank ``owners[i]`` and a buffer of the same shape and dtype elsewhere.

        Per dtype, each rank's owned directions travel packed in one buffer: one all-gather
        padded to the largest rank's share when the shares are balanced (p·max ≤
        :data:`PAD_LIMIT`·total; the padding is counted), else one broadcast per owning rank
        (no padding: with more ranks than blocks most ranks own nothing). The choice depends
        only on shapes and owners, so every rank makes the same one."""
        directions = list(directions)
        if len(owners) != len(directions):
            raise ValueError(f"{len(directions)} directions but {len(owners)} owners")
        for (dt, dev), idx in _by_dtype(directions).items():
            per_rank = [[i for i in idx if owners[i] == r] for r in range(self.world_size)]
            sizes = [sum(directions[i].numel() for i in ids) for ids in per_rank]
            width, total = max(sizes), sum(sizes)
            if total == 0:
                continue
            if self.world_size * width <= PAD_LIMIT * total:
                mine = torch.zeros(width, dtype=dt, device=dev)
                pack_tensors([directions[i] for i in per_rank[self.rank]], False, out=mine[:sizes[self.rank]])
                chunks = [torch.empty(width, dtype=dt, device=dev) for _ in range(self.world_size)]
                self._count(kind, "all_gather", mine, self.world_size)
                self._dist.all_gather(chunks, mine, group=self.group)
                for r, ids in enumerate(per_rank):
                    if ids:
                        unpack_tensors_(chunks[r][:sizes[r]], [directions[i] for i in ids], False)
            else:
                self.broadcast_from_owners([[directions[i]] for i in idx], [owners[i] for i in idx], kind=kind)

    # ------------------------------------------------------------------ objects (checkpoints)
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; not counted)."""
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (pickled; not counted)."""
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out


def _factor_device(factors: RunningFactors) -> torch.device:
    ts, _ = factors.flat_tensors()
    return ts[0].device if ts else torch.device("cpu")


def common_seed(distributor) -> int:
    """A seed drawn from torch's global RNG on rank 0 and broadcast: the same on every rank (the
    common seed of :func:`rank_generator`'s streams)."""
    return int(distributor.broadcast_object(int(torch.randint(0, 2 ** 62, (1,)).item()), 0))


def default_distributor(process_group=None) -> Union[LocalDistributor, TorchDistributor]:
    """:class:`TorchDistributor` when ``torch.distributed`` is initialised (or a group is given),
    else :class:`LocalDistributor`."""
    import torch.distributed as dist

    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return TorchDistributor(process_group)
    return LocalDistributor()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (unchanged otherwise),
    so the block names carry no ``module.`` prefix and K-FAC's own forward passes do not enter
    DDP's gradient synchronisation."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)} (replicate_inverses: "
                         "broadcast each inverse from its owner; shard_inverses: owners precondition their "
                         "blocks and the directions are all-gathered)")
    return mode


# ---------------------------------------------------------------------------- the sharded refresh
class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated (``with timer("refresh"): ...``). Host
    time: on CUDA the phases that launch kernels are not synchronised (use it on CPU, or
    synchronise yourself)."""

    def __init__(self):
        self.seconds: dict = {}

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def cm():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return cm()

    def reset(self) -> None:
        self.seconds.clear()


def record_kind(record) -> str:
    """How a factor record's inverse is applied: ``"kron"`` (dense Ā, G: U = G⁻¹ V Ā⁻¹),
    ``"kron_diag"`` (a diagonal Ā and/or G: U = G⁻¹ V Ā⁻¹ with the diagonal sides elementwise),
    ``"kron_grouped"`` (per-group factors (groups, a, a), (groups, g, g): U_j = G_j⁻¹ V_j Ā_j⁻¹),
    ``"diag"`` (k scalars) or ``"dense"``
    (k small b×b blocks); a tied pair (:mod:`~kfac_fast.curvature.blocks.tied`): ``"kron_sum"``
    (the head: Appendix B's K₂, s₂, K₁, s₁ of the Kronecker sum) and ``"zero"`` (the embedding)."""
    from .curvature.factors import BlockFisher

    if isinstance(record, BlockFisher):
        return "diag" if record.F.shape[-1] == 1 else "dense"
    if record.tied_partner is not None:
        return "kron_sum"
    if record.tied_owner is not None:
        return "zero"
    if record.grouped:
        return "kron_grouped"
    return "kron" if record.A.dim() == 2 and record.G.dim() == 2 else "kron_diag"


# CPU BLAS runs GEMMs with odd sizes (785, 1001: the bias column) markedly slower than on
# multiples of 16 (measured 1.5x on the autoencoder's sandwich, 1 thread); the replicated Kronecker
# inverses live in zero-padded buffers, as BlockDiagonal keeps its own.
_PAD = 16


def _padded(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(an (n, n) view, the zeroed (p, p) buffer holding it); p = n rounded up to 16 on CPU."""
    p = -(-n // _PAD) * _PAD if like.device.type == "cpu" else n
    base = torch.zeros(p, p, dtype=like.dtype, device=like.device)
    return base[:n, :n], base


def _part_buffers(record, kind: str) -> tuple[list[torch.Tensor], list[bool]]:
    """Buffers shaped like a block's damped inverses, and which are symmetric (the Kronecker
    ones are views into padded buffers, see :func:`_padded`)."""
    if kind == "kron":
        return [_padded(record.G.shape[0], record.G)[0], _padded(record.A.shape[0], record.A)[0]], [True, True]
    if kind == "kron_diag":
        return [torch.empty_like(record.A), torch.empty_like(record.G)], [record.A.dim() == 2, record.G.dim() == 2]
    if kind == "kron_grouped":
        return [torch.empty_like(record.A), torch.empty_like(record.G)], [True, True]
    if kind == "kron_sum":  # K2 (V, V) or (V,) with a diagonal G, s2 (V,), K1 (d, d), s1 (d,)
        V, d, like = record.G.shape[0], record.A.shape[0], record.A
        e = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        return [e(*record.G.shape), e(V), e(d, d), e(d)], [False] * 4
    if kind == "zero":
        return [], []
    if kind == "diag":
        return [torch.empty(record.F.shape[0], dtype=record.F.dtype, device=record.F.device)], [False]
    return [torch.empty_like(record.F)], [True]


def _parts_of(inv, j: int, kind: str) -> list[torch.Tensor]:
    """Block ``j``'s damped inverses from a :class:`~kfac_fast.curvature.block_inverse.BlockInverse`
    (its ``Ginv``/``Ainv`` over the dense Kronecker blocks, its ``other`` entries for the rest)."""
    if kind == "kron":
        q = inv.kron_idx.index(j)
        return [inv.Ginv[q], inv.Ainv[q]]
    entry = inv.other[j]
    if kind == "kron_sum":
        t = entry[1]
        return [t.K2, t.s2, t.K1, t.s1]
    return list(entry[1:])


class ShardedInverse:
    """The inverse refresh sharded over ranks (Sec 8 task 5), applied in one of :data:`MODES`.

    Each block is a work item of cost :func:`record_cost` (Σ n³ of its factors: both factors
    of a Kronecker block go to one owner, which needs both to precondition the block and its π
    couples them); :func:`assign` gives the owners. ``refresh(records)`` builds, on every rank,
    the inverse of the blocks it owns with ``build(own_records, warm_start)`` (e.g.
    :func:`~kfac_fast.curvature.inverses.build_block_inverse`); then

    * ``"replicate_inverses"``: the owners broadcast each block's damped inverses (Ā⁻¹, G⁻¹ as
      upper triangles; 1/Ā; the small blocks' inverses) and ``apply`` preconditions every block
      on every rank: U = G⁻¹ V Ā⁻¹ (Sec 4.2);
    * ``"shard_inverses"``: nothing is sent at the refresh; ``apply`` preconditions the owned
      blocks and all-gathers the directions.

    The block-tridiagonal inverse (Sec 4.3) couples neighbouring blocks through its Ξ passes:
    it is built whole on every rank (replicated work, no communication), whatever the mode.
    The records must be the same on every rank (the reduced running factors).

    Args:
        distributor: the ranks.
        mode: one of :data:`MODES`.
        kind: ``"block_diagonal"`` or ``"block_tridiagonal"``.
        build: ``build(records, warm_start) -> inverse`` with ``inverse.apply(grads)``; for
            ``"replicate_inverses"`` a ``BlockInverse`` (its damped factor inverses are read).
        backend: kernel backend of the replicated apply's grouped products.
        timer: a :class:`PhaseTimer` for ``refresh_compute``/``refresh_comm``/``apply_compute``/
            ``apply_comm`` (optional).
    """

    def __init__(self, distributor, *, mode: str, kind: str, build: Callable[[list, Any], Any],
                 backend: str = "auto", timer: Optional[PhaseTimer] = None, damping: Optional[float] = None):
        self.distributor = distributor
        self.mode = check_mode(mode)
        self.kind = kind
        self.build = build
        self.backend = backend
        self.timer = timer if timer is not None else PhaseTimer()
        self.records: Optional[list] = None
        self.owners: Optional[list[int]] = None
        self.local = None  # this rank's inverse (its owned blocks; all of them when replicated work)
        self.parts: Optional[list] = None  # replicate mode: per block its damped inverses
        self._damping = damping  # γ the blocks are built at (a rank may own none of them)

    @property
    def replicated_work(self) -> bool:
        """Whether every rank builds the whole inverse: the tridiagonal kind, or one rank in
        ``"shard_inverses"`` mode (its own inverse object, exactly as without distribution)."""
        return self.kind == "block_tridiagonal" or (self.distributor.world_size == 1 and self.mode == "shard_inverses")

    def refresh(self, records: Sequence) -> None:
        """Rebuild from ``records`` (per block a ``KroneckerFactors``/``BlockFisher``, the same on
        every rank); a collective in ``"replicate_inverses"`` mode."""
        d = self.distributor
        records = list(records)
        self.records = records
        if self.replicated_work:
            with self.timer("refresh_compute"):
                self.local = self.build(records, self.local)
            self.owners = [d.rank] * len(records)
            return
        costs = [record_cost(r) for r in records]
        owners = assign(costs, d.world_size)
        for i, r in enumerate(records):  # a tied pair's inverse needs both records: one owner
            if getattr(r, "tied_owner", None) is not None:
                owners[i] = owners[r.tied_owner]
        if owners != self.owners:
            self.local = None  # another share: no warm start
        self.owners = owners
        own = [i for i, r in enumerate(owners) if r == d.rank]
        with self.timer("refresh_compute"):
            self.local = self.build(_subset(records, own), self.local) if own else None
        self._own = own
        if self.mode == "replicate_inverses":
            self._share_parts()
            # self.local stays: the next refresh's warm start (eigenbases with factorization="eigh")

    def _share_parts(self) -> None:
        """replicate mode: the owners broadcast every block's damped inverses (a collective)."""
        d, records, owners, own = self.distributor, self.records, self.owners, self._own
        kinds = [record_kind(r) for r in records]
        parts, syms = [], []
        for i, (r, k) in enumerate(zip(records, kinds)):
            b, sy = _part_buffers(r, k)
            if owners[i] == d.rank:
                for buf, src in zip(b, _parts_of(self.local, own.index(i), k)):
                    buf.copy_(src)
            parts.append(b)
            syms.append(sy)
        with self.timer("refresh_comm"):
            d.broadcast_from_owners(parts, owners, symmetric=syms, kind="inverses")
        self.parts = parts
        self._kinds = kinds

    # the attributes KFAC reads from an inverse (its γ, fallbacks, compute_dtype)
    @property
    def damping(self) -> float:
        return float(self._damping if self._damping is not None else getattr(self.local, "damping", 0.0))

    @property
    def fallbacks(self) -> list:
        return list(getattr(self.local, "fallbacks", []) or [])

    @property
    def compute_dtype(self):
        return getattr(self.local, "compute_dtype", None)

    @compute_dtype.setter
    def compute_dtype(self, value) -> None:
        if self.local is not None:
            self.local.compute_dtype = value

    def with_damping(self, damping: float) -> "ShardedInverse":
        """The same blocks at another γ (KFAC's candidates, Sec 6.6): every owner re-damps its
        blocks (``local.with_damping``); replicate mode re-broadcasts them (a collective), shard
        mode sends nothing until ``apply``. ``self`` is left as it was."""
        import copy

        new = copy.copy(self)
        new._damping = float(damping)
        new.local = None if self.local is None else self.local.with_damping(damping)
        if new.local is not None and self.local is not None:
            new.local.compute_dtype = self.local.compute_dtype
        if not self.replicated_work and self.mode == "replicate_inverses":
            new._share_parts()
        return new

    def state_dict(self) -> dict:
        """The records and γ it was built from: a checkpoint rebuilds it with :meth:`refresh`
        (the owners are recomputed for the world size of the run that loads it)."""
        from .curvature.factors import record_to_dict

        return {"sharded": True, "mode": self.mode, "kind": self.kind, "damping": self.damping,
                "records": [record_to_dict(r) for r in self.records]}

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every block's preconditioned direction (g_dim, a_dim), the same on every rank; a
        collective in ``"shard_inverses"`` mode."""
        if self.records is None:
            raise RuntimeError("ShardedInverse.apply before the first refresh(records)")
        grads = list(grads)
        if len(grads) != len(self.records):
            raise ValueError(f"expected {len(self.records)} gradient blocks (one per layer), got {len(grads)}")
        if self.replicated_work:
            with self.timer("apply_compute"):
                return list(self.local.apply(grads))
        if self.mode == "replicate_inverses":
            with self.timer("apply_compute"):
                return self._apply_parts(grads)
        d = self.distributor
        dt = _records_dtype(self.records)
        with self.timer("apply_compute"):
            mine = list(self.local.apply([grads[i] for i in self._own])) if self._own else []
            out = [None] * len(grads)
            for i, u in zip(self._own, mine):
                out[i] = u
            for i in range(len(grads)):
                if out[i] is None:
                    out[i] = torch.empty(grads[i].shape, dtype=dt, device=grads[i].device)
        with self.timer("apply_comm"):
            d.all_gather_directions(out, self.owners, kind="directions")
        return out

    def _apply_parts(self, grads: list) -> list[torch.Tensor]:
        from . import ops

        dt = _records_dtype(self.records)
        out: list = [None] * len(grads)
        kron = [i for i, k in enumerate(self._kinds) if k == "kron"]
        if kron:
            Gb = [_base(self.parts[i][0]) for i in kron]
            Ab = [_base(self.parts[i][1]) for i in kron]
            V = [torch.nn.functional.pad(grads[i].to(dt), (0, a.shape[0] - grads[i].shape[1],
                                                            0, g.shape[0] - grads[i].shape[0]))
                 for i, g, a in zip(kron, Gb, Ab)]
            U = ops.sandwich(Gb, V, Ab, backend=self.backend)
            for i, u in zip(kron, U):
                out[i] = u[: grads[i].shape[0], : grads[i].shape[1]]
        for i, k in enumerate(self._kinds):
            V = grads[i].to(dt)
            if k == "kron_diag":
                ainv, Ginv = self.parts[i]
                out[i] = apply_factored(V, Ginv, ainv)
            elif k == "kron_grouped":
                Ainv, Ginv = self.parts[i]
                out[i] = apply_grouped(V, Ginv, Ainv)
            elif k == "diag":
                out[i] = V * self.parts[i][0].unsqueeze(1)
            elif k == "dense":
                out[i] = torch.einsum("kbc,kc->kb", self.parts[i][0], V)
            elif k == "kron_sum":
                K2, s2, K1, s1 = self.parts[i]
                out[i] = TiedSumInverse(K1=K1, K2=K2, s1=s1, s2=s2, pi=float("nan")).apply(V)
            elif k == "zero":
                out[i] = torch.zeros_like(V)
        return out

    def held_tensors(self) -> list[torch.Tensor]:
        """The inverse tensors this rank keeps (for memory accounting): all blocks' in
        ``"replicate_inverses"`` mode, the owned ones in ``"shard_inverses"``."""
        if self.parts is not None and not self.replicated_work:
            return [_base(t) for ps in self.parts for t in ps]
        if self.local is None or self.kind == "block_tridiagonal":
            return []  # the tridiagonal inverse's tensors are not counted here
        out = []
        for i, r in enumerate(self.records if self.replicated_work else [self.records[j] for j in self._own]):
            out += _parts_of(self.local, i, record_kind(r))
        return out


def _subset(records: Sequence, idx: Sequence[int]) -> list:
    """``records[i] for i in idx``, a tied pair's indices renumbered into the subset (both
    records of a pair are in it: they have one owner)."""
    pos = {i: q for q, i in enumerate(idx)}
    out = []
    for i in idx:
        r = records[i]
        if getattr(r, "tied", False):
            r = dataclasses.replace(r, tied_partner=None if r.tied_partner is None else pos[r.tied_partner],
                                    tied_owner=None if r.tied_owner is None else pos[r.tied_owner])
        out.append(r)
    return out


def _base(view: torch.Tensor) -> torch.Tensor:
    """The padded (p, p) buffer a :func:`_padded` view lives in (the view itself if unpadded)."""
    b = view._base
    return view if b is None else b


def _records_dtype(records: Sequence) -> torch.dtype:
    from .curvature.factors import BlockFisher

    r = records[0]
    return r.F.dtype if isinstance(r, BlockFisher) else r.A.dtype
