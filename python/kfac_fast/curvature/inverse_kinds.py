"""The inverse kinds over the dense Kronecker blocks (paper Sec 4.2 block-diagonal, Sec 4.3
block-tridiagonal): a registry of names to classes and the constructor by name."""
from __future__ import annotations

from .block_diagonal import BlockDiagonal
from .block_tridiagonal import BlockTridiagonal

# name -> class; ``config.INVERSES`` (the valid ``inverse=`` choices) is read from here
INVERSE_KINDS = {"block_diagonal": BlockDiagonal, "block_tridiagonal": BlockTridiagonal}


def build_inverse(kind: str, factors, *, damping: float, backend: str, warm_start=None, eig=None,
                  pi="trace", factorization: str = "eigh"):
    """The ``kind`` inverse of the Kronecker ``factors`` (arguments as :class:`BlockDiagonal`)."""
    if kind == "block_diagonal":
        return BlockDiagonal(factors, damping=damping, pi=pi, backend=backend, warm_start=warm_start, _eig=eig,
                             factorization=factorization)
    return BlockTridiagonal(factors, damping=damping, pi=pi, backend=backend, warm_start=warm_start, _eig=eig)
