"""Shared pieces of the optimizer and the preconditioner: running factor estimates (Sec 5)
and the approximate-inverse refresh (Sec 4.2/4.3 with 6.3), checkpoint helpers."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .curvature import BlockDiagonal, BlockTridiagonal, KroneckerFactors
from .curvature import _dispatch
from .curvature._eigen import FactorEig
from .curvature.layers import LinearLayer

STATE_VERSION = 3  # 2: a Cholesky-built inverse is stored without eigenbases; 3: step rejection (ν)
READABLE_VERSIONS = (1, 2, 3)


class RunningFactors:
    """Exponentially decayed averages of Ā_{i-1,i-1}, G_{i,i} (and the tridiagonal cross factors).

    Double-buffered: ``update`` writes into the spare buffers, ``commit`` makes them current, so a
    rejected step leaves the committed factors untouched (no lost state).
    """

    def __init__(self, layers: Sequence[LinearLayer], *, dtype: torch.dtype, device, tridiagonal: bool):
        self.layers = list(layers)
        self.tridiagonal = tridiagonal
        self.dtype = dtype
        self._sets = [self._alloc(device), self._alloc(device)]
        self._cur = 0
        self.initialized = False

    def _alloc(self, device) -> list[KroneckerFactors]:
        out = []
        L = len(self.layers)
        for i, l in enumerate(self.layers):
            f = KroneckerFactors(
                A=torch.zeros(l.a_dim, l.a_dim, dtype=self.dtype, device=device),
                G=torch.zeros(l.g_dim, l.g_dim, dtype=self.dtype, device=device),
                name=l.name, homogeneous=l.has_bias)
            if self.tridiagonal and i + 1 < L:
                nxt = self.layers[i + 1]
                f.A_next = torch.zeros(l.a_dim, nxt.a_dim, dtype=self.dtype, device=device)
                f.G_next = torch.zeros(l.g_dim, nxt.g_dim, dtype=self.dtype, device=device)
            out.append(f)
        return out

    @property
    def current(self) -> list[KroneckerFactors]:
        return self._sets[self._cur]

    @property
    def pending(self) -> list[KroneckerFactors]:
        return self._sets[1 - self._cur]

    def tensors(self) -> list[torch.Tensor]:
        """Every factor tensor of both buffers (for memory accounting)."""
        return [t for fs in self._sets for f in fs for t in (f.A, f.G, f.A_next, f.G_next) if t is not None]

    def update(self, acts: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], *, eps: float, backend: str) -> None:
        """pending ← eps·current + (1−eps)·(batch estimate). acts: (m, d_in), gs: (m, d_out) per layer."""
        m = acts[0].shape[0]
        scale = (1.0 - eps) / m
        cur, pen = self.current, self.pending
        for c, p in zip(cur, pen):
            p.A.copy_(c.A)
            p.G.copy_(c.G)
            if p.A_next is not None:
                p.A_next.copy_(c.A_next)
                p.G_next.copy_(c.G_next)
        hom = [l.has_bias for l in self.layers]
        _dispatch.factor_update([p.A for p in pen], list(acts), eps=eps, scale=scale, homogeneous=hom, backend=backend)
        _dispatch.factor_update([p.G for p in pen], list(gs), eps=eps, scale=scale,
                                homogeneous=[False] * len(gs), backend=backend)
        if self.tridiagonal and len(pen) > 1:
            _dispatch.cross_factor_update([p.A_next for p in pen[:-1]], list(acts[:-1]), list(acts[1:]), eps=eps,
                                          scale=scale, homogeneous_x=hom[:-1], homogeneous_y=hom[1:], backend=backend)
            n = len(gs) - 1
            _dispatch.cross_factor_update([p.G_next for p in pen[:-1]], list(gs[:-1]), list(gs[1:]), eps=eps,
                                          scale=scale, homogeneous_x=[False] * n, homogeneous_y=[False] * n,
                                          backend=backend)

    def commit(self) -> None:
        self._cur = 1 - self._cur
        self.initialized = True

    def state(self) -> dict:
        return {"factors": [_factors_to_dict(f) for f in self.current], "initialized": self.initialized}

    def load(self, state: dict) -> None:
        for f, d in zip(self.current, state["factors"]):
            for k in ("A", "G", "A_next", "G_next"):
                t = getattr(f, k)
                if t is None:
                    if d.get(k) is not None:
                        raise ValueError(f"checkpoint has {k} for layer {f.name} but this optimizer does not use it")
                    continue
                src = d[k]
                if src is None or tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"checkpoint factor {k} of layer {f.name} has shape "
                                     f"{None if src is None else tuple(src.shape)}, expected {tuple(t.shape)}")
                t.copy_(src)
        self.initialized = bool(state["initialized"])


def _factors_to_dict(f: KroneckerFactors) -> dict:
    return {k: (None if getattr(f, k) is None else getattr(f, k).detach().clone())
            for k in ("A", "G", "A_next", "G_next")}


def snapshot(factors: Sequence[KroneckerFactors], dtype: Optional[torch.dtype] = None) -> list[KroneckerFactors]:
    """Independent copies, optionally cast (the inverse must not alias the double-buffered factors)."""
    def cp(t):
        return None if t is None else t.to(dtype=dtype or t.dtype, copy=True)

    return [KroneckerFactors(A=cp(f.A), G=cp(f.G), A_next=cp(f.A_next), G_next=cp(f.G_next),
                             name=f.name, homogeneous=f.homogeneous) for f in factors]


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
        "factors": [_factors_to_dict(f) for f in inv.factors],
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


def ema_decay(k: int, ema_max: float) -> float:
    """ε = min(1 − 1/k, ema_max) (Sec 5)."""
    return min(1.0 - 1.0 / k, ema_max)


def finite(x: float) -> bool:
    return math.isfinite(x)
