"""Checkpoint (de)serialisation shared by the inverse kinds (``state_dict`` / ``from_state``)."""
from __future__ import annotations

from typing import Optional, Sequence

from ._eigen import FactorEig
from .factors import KroneckerFactors, factors_to_dict


def inverse_state(inv) -> dict:
    """γ, π, the factor snapshot the inverse was built from and its eigenbases (None for a
    Cholesky-built inverse, which is rebuilt deterministically from the factors on load)."""
    return {
        "damping": inv.damping,
        "pi": inv.pi_spec,
        "factors": [factors_to_dict(f) for f in inv.factors],
        "eig": None if inv.eig is None else [{"sA": e.sA.clone(), "QA": e.QA.clone(), "sG": e.sG.clone(),
                                              "QG": e.QG.clone()} for e in inv.eig],
    }


def inverse_parts(state: dict, template: Sequence[KroneckerFactors]
                  ) -> tuple[list[KroneckerFactors], Optional[list[FactorEig]]]:
    """(factors, eigenbases or None) from :func:`inverse_state`, on the devices of ``template``
    (the current running factors, which also give the names)."""
    facs = []
    for t, d in zip(template, state["factors"]):
        dev = t.A.device
        facs.append(KroneckerFactors(A=d["A"].to(dev), G=d["G"].to(dev),
                                     A_next=None if d["A_next"] is None else d["A_next"].to(dev),
                                     G_next=None if d["G_next"] is None else d["G_next"].to(dev),
                                     name=t.name, homogeneous=t.homogeneous))
    if state["eig"] is None:
        return facs, None
    eig = [FactorEig(sA=e["sA"].to(f.A.device), QA=e["QA"].to(f.A.device), sG=e["sG"].to(f.G.device),
                     QG=e["QG"].to(f.G.device)) for e, f in zip(state["eig"], facs)]
    return facs, eig
