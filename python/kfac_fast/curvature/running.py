"""Running estimates of the Kronecker factors (paper Sec 5): ε-decayed averages, double-buffered.

The curvature side owns these tensors; the optimizer only asks for an update, a commit and
a snapshot for the inverse.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from .factors import KroneckerFactors, factors_to_dict
from .blocks import KRONECKER, CurvatureBlock


class RunningFactors:
    """Exponentially decayed averages of Ā_{i-1,i-1}, G_{i,i} (and the tridiagonal cross factors).

    Double-buffered: ``update`` writes into the spare buffers, ``commit`` makes them current, so a
    rejected step leaves the committed factors untouched (no lost state).
    """

    def __init__(self, layers: Sequence[CurvatureBlock], *, dtype: torch.dtype, device, tridiagonal: bool):
        self.layers = list(layers)
        for l in self.layers:
            if l.factor_spec.kind != KRONECKER:
                raise NotImplementedError(f"layer {l.name}: factor kind {l.factor_spec.kind!r} has no running factors "
                                          f"or inverse yet; only {KRONECKER!r} blocks are supported")
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
                name=l.name, homogeneous=l.factor_spec.homogeneous)
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
        hom = [l.factor_spec.homogeneous for l in self.layers]
        ops.factor_update([p.A for p in pen], list(acts), eps=eps, scale=scale, homogeneous=hom, backend=backend)
        ops.factor_update([p.G for p in pen], list(gs), eps=eps, scale=scale,
                          homogeneous=[False] * len(gs), backend=backend)
        if self.tridiagonal and len(pen) > 1:
            ops.cross_factor_update([p.A_next for p in pen[:-1]], list(acts[:-1]), list(acts[1:]), eps=eps,
                                    scale=scale, homogeneous_x=hom[:-1], homogeneous_y=hom[1:], backend=backend)
            n = len(gs) - 1
            ops.cross_factor_update([p.G_next for p in pen[:-1]], list(gs[:-1]), list(gs[1:]), eps=eps,
                                    scale=scale, homogeneous_x=[False] * n, homogeneous_y=[False] * n,
                                    backend=backend)

    def commit(self) -> None:
        self._cur = 1 - self._cur
        self.initialized = True

    def state(self) -> dict:
        return {"factors": [factors_to_dict(f) for f in self.current], "initialized": self.initialized}

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


def snapshot(factors: Sequence[KroneckerFactors], dtype: Optional[torch.dtype] = None) -> list[KroneckerFactors]:
    """Independent copies, optionally cast (the inverse must not alias the double-buffered factors)."""
    def cp(t):
        return None if t is None else t.to(dtype=dtype or t.dtype, copy=True)

    return [KroneckerFactors(A=cp(f.A), G=cp(f.G), A_next=cp(f.A_next), G_next=cp(f.G_next),
                             name=f.name, homogeneous=f.homogeneous) for f in factors]


def ema_decay(k: int, ema_max: float) -> float:
    """ε = min(1 − 1/k, ema_max) (Sec 5)."""
    return min(1.0 - 1.0 / k, ema_max)
