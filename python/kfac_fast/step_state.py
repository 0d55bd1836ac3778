"""The adaptive state of Algorithm 2 on the device, and step statistics that read it lazily.

The sync-free step (:class:`kfac_fast.KFAC`) keeps every scalar it decides on as a 0-d tensor on
the model's device: λ (Sec 6.5), Nielsen's ν (:mod:`kfac_fast.rules`), the consecutive and
total rejection counts and whether δ₀ (Sec 7) is live. Decisions are ``torch.where`` selections,
so an ordinary iteration never waits for the device. The host keeps only the integer schedule
(k mod T1, T2, T3) and γ, which changes only on refresh iterations (Sec 6.6).

:class:`StepStats` is what ``KFAC.step`` returns: a mapping whose device values are moved to the
host together, in one transfer, the first time any of them is read (and not at all when nobody
reads them).
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Callable, Iterator

import torch


class AdaptState:
    """λ, ν, the rejection counters and the δ₀ flag as 0-d tensors on ``device``.

    Attributes:
        lam: λ (float64).
        nu: Nielsen's growth factor ν for λ after consecutive rejections (float64).
        rejections: consecutive rejected steps (int64).
        total_rejections: all rejected steps (int64).
        unreported: rejections for non-finite numbers not yet warned about (int64).
        has_delta0: whether δ₀ holds the last accepted update (bool; False after a rejection).
    """

    def __init__(self, *, lam: float, nu: float, device):
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.lam = torch.tensor(float(lam), **f64)
        self.nu = torch.tensor(float(nu), **f64)
        self.rejections = torch.zeros((), **i64)
        self.total_rejections = torch.zeros((), **i64)
        self.unreported = torch.zeros((), **i64)
        self.has_delta0 = torch.zeros((), dtype=torch.bool, device=device)

    def host(self) -> dict:
        """Every value on the host (one transfer)."""
        vals = torch.stack([self.lam, self.nu, self.rejections.double(), self.total_rejections.double(),
                            self.unreported.double(), self.has_delta0.double()]).tolist()
        return {"lambda_": vals[0], "nu": vals[1], "rejections": int(vals[2]), "total_rejections": int(vals[3]),
                "unreported": int(vals[4]), "has_delta0": bool(vals[5])}

    def set(self, name: str, value) -> None:
        t = getattr(self, name)
        t.fill_(value)


class StepStats(MutableMapping):
    """The dict-like result of one ``KFAC.step``.

    Values may be 0-d device tensors (λ, α, µ, M, ρ, ``rejected``, ...) or callables of the host
    values (``reason``). The first read of any key moves every tensor value to the host in one
    transfer (floats; bool tensors become bools, integer tensors ints) and evaluates the
    callables; later reads cost nothing. Nothing is read when nobody reads the stats.
    """

    def __init__(self, **values: Any):
        self._data: dict = dict(values)
        self._resolved = False

    def _resolve(self) -> None:
        if self._resolved:
            return
        keys = [k for k, v in self._data.items() if isinstance(v, torch.Tensor)]
        if keys:
            vals = torch.stack([self._data[k].detach().reshape(()).double() for k in keys]).tolist()
            for k, v in zip(keys, vals):
                t = self._data[k]
                self._data[k] = bool(v) if t.dtype == torch.bool else (int(v) if not t.is_floating_point() else v)
        lazy = [k for k, v in self._data.items() if isinstance(v, _Lazy)]
        for k in lazy:
            self._data[k] = self._data[k].fn(self._data)
        self._resolved = True

    def set_lazy(self, key: str, fn: Callable[[dict], Any]) -> None:
        """``key`` computed from the host values when first read (e.g. a rejection's reason)."""
        self._data[key] = _Lazy(fn)
        self._resolved = False

    def __getitem__(self, key):
        self._resolve()
        return self._data[key]

    def __setitem__(self, key, value) -> None:
        self._data[key] = value
        if isinstance(value, (torch.Tensor, _Lazy)):
            self._resolved = False

    def __delitem__(self, key) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        self._resolve()
        return f"StepStats({self._data!r})"

    def copy(self) -> dict:
        self._resolve()
        return dict(self._data)


class _Lazy:
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn
