"""The refresh entry points of the inverse over every block (:class:`~.block_inverse.BlockInverse`),
the factorization rule and checkpoint (de)serialisation of a built inverse (paper Sec 4.2, 4.3)."""
from __future__ import annotations

from typing import Optional, Sequence

from .block_inverse import BlockInverse, largest_dense_factor
from .inverse_kinds import INVERSE_KINDS, build_inverse  # noqa: F401  (the registry, read by config)


def resolve_factorization(requested: str, kind: str, backend: str) -> str:
    """``"auto"``: Cholesky for the block-diagonal inverse (several times cheaper than an
    eigendecomposition per refresh), eigendecompositions where they are needed (the tridiagonal
    inverse) or asked for (``backend="native"``, the native eigensolver)."""
    if requested != "auto":
        return requested
    return "cholesky" if kind == "block_diagonal" and backend != "native" else "eigh"


#: On the warm-up refreshes (iterations 2 and 3, Sec 8) only blocks whose largest dense factor
#: is at most this size are rebuilt; larger ones keep their first inverse until the T3 schedule.
#: A refresh costs ~n³ per factor: a damped Cholesky inverse at n = 1024 took 0.07 s on one CPU
#: core (float32), at 2304 0.43 s and at 4608 3.4 s, against 1.5 s for a resnet18 SGD step
#: (batch 8, 224²): the small blocks' warm-up is cheap, the large ones' is not
#: (docs/measurements.md, benchmarks/bench_large_factors.py).
WARMUP_REBUILD_MAX_DIM = 1024


def warmup_rebuild(records: Sequence, k: int, *, scheduled: bool) -> Optional[list[int]]:
    """Which blocks a refresh at iteration ``k`` rebuilds: None (all of them) on a scheduled
    refresh (k ≡ 0 mod T3, or no inverse yet: ``scheduled``) and whenever every block is small;
    on a warm-up refresh (k = 2, 3 of Sec 8's k ≤ 3 rule) the indices of the records whose
    largest dense factor is at most :data:`WARMUP_REBUILD_MAX_DIM` (the others keep their
    inverse from iteration 1)."""
    if scheduled or k > 3:
        return None
    small = [i for i, f in enumerate(records) if largest_dense_factor(f) <= WARMUP_REBUILD_MAX_DIM]
    return None if len(small) == len(records) else small


def inverse_state(inv) -> Optional[dict]:
    """The checkpoint dict of an inverse (``inv.state_dict()``), None for no inverse yet."""
    return None if inv is None else inv.state_dict()


def build_block_inverse(kind: str, records, *, damping: float, backend: str, warm_start=None,
                        factorization: str = "eigh", rebuild: Optional[Sequence[int]] = None):
    """The inverse over blocks of every kind (:class:`~.block_inverse.BlockInverse`): ``kind``
    for the dense Kronecker blocks, block-diagonal entries for the others; ``rebuild``: only
    these blocks (:func:`warmup_rebuild`), the others from ``warm_start``."""
    return BlockInverse(records, kind=kind, damping=damping, backend=backend, warm_start=warm_start,
                        factorization=factorization, rebuild=rebuild)


def load_inverse(kind: str, state: Optional[dict], template: Sequence, backend: str):
    """The inverse from :func:`inverse_state` (a :class:`~.block_inverse.BlockInverse`; states of
    format ≤ 3 hold a bare Kronecker inverse and are wrapped), on the devices of ``template``."""
    return None if state is None else BlockInverse.from_state(state, template, backend=backend, kind=kind)
