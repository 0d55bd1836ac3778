"""The refresh entry points of the inverse over every block (:class:`~.block_inverse.BlockInverse`),
the factorization rule and checkpoint (de)serialisation of a built inverse (paper Sec 4.2, 4.3)."""
from __future__ import annotations

from typing import Optional, Sequence

from .block_inverse import BlockInverse
from .inverse_kinds import INVERSE_KINDS, build_inverse  # noqa: F401  (the registry, read by config)


def resolve_factorization(requested: str, kind: str, backend: str) -> str:
    """``"auto"``: Cholesky for the block-diagonal inverse (several times cheaper than an
    eigendecomposition per refresh), eigendecompositions where they are needed (the tridiagonal
    inverse) or asked for (``backend="native"``, the native eigensolver)."""
    if requested != "auto":
        return requested
    return "cholesky" if kind == "block_diagonal" and backend != "native" else "eigh"


def inverse_state(inv) -> Optional[dict]:
    """The checkpoint dict of an inverse (``inv.state_dict()``), None for no inverse yet."""
    return None if inv is None else inv.state_dict()


def build_block_inverse(kind: str, records, *, damping: float, backend: str, warm_start=None,
                        factorization: str = "eigh"):
    """The inverse over blocks of every kind (:class:`~.block_inverse.BlockInverse`): ``kind``
    for the dense Kronecker blocks, block-diagonal entries for the others."""
    return BlockInverse(records, kind=kind, damping=damping, backend=backend, warm_start=warm_start,
                        factorization=factorization)


def load_inverse(kind: str, state: Optional[dict], template: Sequence, backend: str):
    """The inverse from :func:`inverse_state` (a :class:`~.block_inverse.BlockInverse`; states of
    format ≤ 3 hold a bare Kronecker inverse and are wrapped), on the devices of ``template``."""
    return None if state is None else BlockInverse.from_state(state, template, backend=backend, kind=kind)
