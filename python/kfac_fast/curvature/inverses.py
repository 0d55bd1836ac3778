"""The inverse kinds (paper Sec 4.2 block-diagonal, Sec 4.3 block-tridiagonal): a registry of
names to classes, the refresh entry point and checkpoint (de)serialisation of a built inverse."""
from __future__ import annotations

from typing import Optional, Sequence

from ._eigen import FactorEig
from .block_diagonal import BlockDiagonal
from .block_tridiagonal import BlockTridiagonal
from .factors import KroneckerFactors, factors_to_dict

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
    if inv is None:
        return None
    return {
        "damping": inv.damping,
        "pi": inv.pi_spec,
        "factors": [factors_to_dict(f) for f in inv.factors],
        # a Cholesky-built inverse is rebuilt (deterministically) from these factors on load
        "eig": None if inv.eig is None else [{"sA": e.sA.clone(), "QA": e.QA.clone(), "sG": e.sG.clone(),
                                              "QG": e.QG.clone()} for e in inv.eig],
    }


def load_inverse(kind: str, state: Optional[dict], template: Sequence[KroneckerFactors], backend: str):
    if state is None:
        return None
    facs = []
    for t, d in zip(template, state["factors"]):
        dev = t.A.device
        facs.append(KroneckerFactors(A=d["A"].to(dev), G=d["G"].to(dev),
                                     A_next=None if d["A_next"] is None else d["A_next"].to(dev),
                                     G_next=None if d["G_next"] is None else d["G_next"].to(dev),
                                     name=t.name, homogeneous=t.homogeneous))
    if state["eig"] is None:
        return build_inverse(kind, facs, damping=state["damping"], backend=backend, pi=state["pi"],
                             factorization="cholesky")
    eig = [FactorEig(sA=e["sA"].to(f.A.device), QA=e["QA"].to(f.A.device), sG=e["sG"].to(f.G.device),
                     QG=e["QG"].to(f.G.device)) for e, f in zip(state["eig"], facs)]
    return build_inverse(kind, facs, damping=state["damping"], backend=backend, eig=eig, pi=state["pi"])
