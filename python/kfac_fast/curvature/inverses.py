"""The inverse kinds (paper Sec 4.2 block-diagonal, Sec 4.3 block-tridiagonal): a registry of
names to classes, the refresh entry point and checkpoint (de)serialisation of a built inverse."""
from __future__ import annotations

from typing import Optional, Sequence

from .block_diagonal import BlockDiagonal
from .block_tridiagonal import BlockTridiagonal

# name -> class; ``config.INVERSES`` (the valid ``inverse=`` choices) is read from here
INVERSE_KINDS = {"block_diagonal": BlockDiagonal, "block_tridiagonal": BlockTridiagonal}


def build_inverse(kind: str, factors, *, damping: float, backend: str, warm_start=None, eig=None,
                  pi="trace", factorization: str = "eigh"):
    if kind == "block_diagonal":
        return BlockDiagonal(factors, damping=damping, pi=pi, backend=backend, warm_start=warm_start, _eig=eig,
                             factorization=factorization)
    return BlockTridiagonal(factors, damping=damping, pi=pi, backend=backend, warm_start=warm_start, _eig=eig)


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
    from .block_inverse import BlockInverse

    return BlockInverse(records, kind=kind, damping=damping, backend=backend, warm_start=warm_start,
                        factorization=factorization)


def load_inverse(kind: str, state: Optional[dict], template: Sequence, backend: str):
    """The inverse from :func:`inverse_state` (a :class:`~.block_inverse.BlockInverse`; states of
    format ≤ 3 hold a bare Kronecker inverse and are wrapped), on the devices of ``template``."""
    from .block_inverse import BlockInverse

    return None if state is None else BlockInverse.from_state(state, template, backend=backend, kind=kind)
