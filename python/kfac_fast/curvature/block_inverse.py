"""The approximate inverse over blocks of every kind (paper Sec 4 + 6.3).

* Dense Kronecker blocks (Linear, Conv2d) go to the chosen inverse kind, block-diagonal
  (Sec 4.2) or block-tridiagonal (Sec 4.3, coupling consecutive Kronecker blocks:
  :class:`~kfac_fast.curvature.running.RunningFactors` says which pairs).
* Kronecker blocks with a diagonal factor (the Embedding's Ā; any Ā or G larger than
  ``max_block_dim``, :mod:`.factors`) are block-diagonal entries, also with the
  block-tridiagonal kind: U = (G + (γ/π) I)⁻¹ V (Ā + πγ I)⁻¹ with a diagonal side applied
  elementwise (1/(Ā + πγ) per column, 1/(G + γ/π) per row), π by the trace rule with the
  trace of a diagonal factor its sum (tr/size = its mean, Sec 6.3).
* A grouped convolution (batched per-group factors Ā (groups, a, a), G (groups, g, g)) is a
  block-diagonal entry in both kinds: one Kronecker product per group, damped by the factored
  Tikhonov rule with its own π_j by the trace rule (Sec 6.3), U_j = (G_j + (γ/π_j) I)⁻¹ V_j
  (Ā_j + π_j γ I)⁻¹ as batched products (V_j: group j's rows of the block matrix).
* A tied weight (an embedding shared with a bias-free output layer, two records: the head's
  with ``tied_partner``, the embedding's with ``tied_owner``) is a block-diagonal entry in both
  kinds: the head's is the inverse of the Kronecker sum over both records
  (:mod:`~kfac_fast.curvature.tied_inverse`), the embedding's gives zeros (it owns no parameter).
* Small dense / diagonal blocks (norm scale-and-shift, any other parameter) are
  block-diagonal entries, damped as the Kronecker product F ⊗ [1] they are (a 1×1 G): the
  factored Tikhonov damping of Sec 6.3 gives (F_c + πγ I)⁻¹ / (1 + γ/π) per small block, with
  π = sqrt(mean diagonal of the block's F) by the trace rule (one π per block). So every block
  gets damping on the scale of its own curvature (≈ γ·sqrt(F) + γ², as the Kronecker blocks'
  πγG + (γ/π)Ā + γ²), never a bare γ² that tiny curvature would turn into huge steps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .compute_dtype import autocast_off
from .damping import _pi_from_traces, check_damping
from .factors import (BlockFisher, KroneckerFactors, block_shape, cross_factor_like, factor_like, factors_to_dict,
                      record_to_dict)
from .block_diagonal import BlockDiagonal
from .inverse_kinds import INVERSE_KINDS, build_inverse
from .tied_inverse import tied_sum_inverse


def _is_dense_kron(f) -> bool:
    """A dense Kronecker block of the chosen inverse kind (not a tied pair's: Kronecker sum; not one
    with a diagonal factor)."""
    return isinstance(f, KroneckerFactors) and f.dense and not f.tied


def apply_factored(V: torch.Tensor, g_side: torch.Tensor, a_side: torch.Tensor) -> torch.Tensor:
    """U = G⁻¹ V Ā⁻¹ for a Kronecker block whose damped factor inverses are dense (n, n) or
    diagonal (n,) (their diagonals, applied elementwise). V: (g, a) -> (g, a)."""
    V = V.to(g_side.dtype)
    U = g_side @ V if g_side.dim() == 2 else V * g_side.unsqueeze(1)
    return U @ a_side if a_side.dim() == 2 else U * a_side.unsqueeze(0)


def apply_grouped(V: torch.Tensor, g_side: torch.Tensor, a_side: torch.Tensor) -> torch.Tensor:
    """U_j = G_j⁻¹ V_j Ā_j⁻¹ for every group j: damped inverses (groups, g, g) and (groups, a, a),
    V (groups·g, a) with group j's rows j·g … (j+1)·g − 1 -> (groups·g, a)."""
    G, g = g_side.shape[0], g_side.shape[1]
    Vg = V.to(g_side.dtype).reshape(G, g, -1)
    return torch.bmm(torch.bmm(g_side, Vg), a_side).reshape(V.shape)


def grouped_pi(A: torch.Tensor, G: torch.Tensor, pi) -> torch.Tensor:
    """π_j per group (float64, (groups,)): the trace rule sqrt((tr Ā_j / a) / (tr G_j / g)), 1 where
    either trace is not positive (as :func:`~.damping._pi_from_traces`), or the given float."""
    if not isinstance(pi, str):
        return torch.full((A.shape[0],), float(pi), dtype=torch.float64, device=A.device)
    ta = torch.diagonal(A, dim1=-2, dim2=-1).double().mean(-1)
    tg = torch.diagonal(G, dim1=-2, dim2=-1).double().mean(-1)
    r = ta / tg
    ok = (ta > 0) & (tg > 0) & torch.isfinite(r)
    return torch.where(ok, r.clamp_min(0).sqrt(), torch.ones_like(r))


def _spd_inverse(M: torch.Tensor, c) -> tuple[torch.Tensor, bool]:
    """(M + cI)⁻¹ for a symmetric PSD M (or a batch (k, n, n)) by Cholesky, with an
    eigenvalue-clamped fallback; ``c`` a float or one value per matrix of the batch (k,)."""
    S = 0.5 * (M + M.transpose(-1, -2))
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    per = isinstance(c, torch.Tensor)
    L, info = torch.linalg.cholesky_ex(S + (c.to(S.dtype)[..., None, None] if per else c) * eye)
    if bool((info == 0).all()) and bool(torch.isfinite(L).all()):
        return torch.cholesky_inverse(L), True
    if not bool(torch.isfinite(S).all()):
        return torch.zeros_like(S), False
    w, Q = torch.linalg.eigh(S.double())
    w = (w.clamp_min(0) + (c.double()[..., None] if per else c)).clamp_min(torch.finfo(torch.float64).tiny)
    return ((Q / w.unsqueeze(-2)) @ Q.transpose(-1, -2)).to(S.dtype), False


def _shape(f) -> tuple[int, int]:
    """The (g_dim, a_dim) block matrix shape of a record."""
    return block_shape(f)


def largest_dense_factor(f) -> int:
    """The size of a record's largest dense factor (the n of its n³ refresh): max over its dense
    Ā, G; b for small b×b blocks; the largest per-group factor of a grouped block; 1 for a block
    whose factors are all diagonal."""
    if isinstance(f, BlockFisher):
        return f.F.shape[-1]
    if f.grouped:
        return max(f.A.shape[-1], f.G.shape[-1])
    return max([M.shape[0] for M in (f.A, f.G) if M.dim() == 2] or [1])


def records_from_dicts(dicts: Sequence[dict], template: Sequence) -> list:
    """Factor records from their checkpoint dicts (``record_to_dict``), with the names, kinds and
    devices of ``template`` (the running factors). A dense factor where the template keeps a
    diagonal (a checkpoint written without the ``max_block_dim`` bound) becomes its diagonal."""
    records = []
    for t, d in zip(template, dicts):
        if isinstance(t, BlockFisher):
            records.append(BlockFisher(F=d["F"].to(t.F.device), name=t.name, kind=t.kind))
        else:
            dev = t.A.device
            records.append(KroneckerFactors(
                A=factor_like(d["A"], t.A).to(dev), G=factor_like(d["G"], t.G).to(dev),
                A_next=cross_factor_like(d.get("A_next"), t.A_next), G_next=cross_factor_like(d.get("G_next"), t.G_next), name=t.name,
                homogeneous=t.homogeneous, tied_partner=t.tied_partner,
                tied_owner=t.tied_owner))
    return records


class BlockInverse:
    """F̆⁻¹ (or F̂⁻¹ on the Kronecker chain) over a list of factor records of any kind.

    Args:
        records: per block, :class:`KroneckerFactors` (dense Ā, or a vector Ā for a diagonal
            Ā) or :class:`BlockFisher` (k, b, b), in the blocks' order.
        kind: ``"block_diagonal"`` or ``"block_tridiagonal"`` (applies to the dense Kronecker
            blocks; records carry ``A_next``/``G_next`` between consecutive ones).
        damping: γ ≥ 0; pi: ``"trace"`` or a positive float; backend, warm_start,
            factorization: as :class:`~kfac_fast.curvature.BlockDiagonal`.
        rebuild: the record indices to build (None: all). The others keep their record and
            damped inverses from ``warm_start`` (a :class:`BlockInverse` over the same blocks, at
            the same γ and kind; otherwise every block is built): the warm-up rule of
            :func:`~kfac_fast.curvature.inverses.warmup_rebuild`. The block-tridiagonal kind
            couples its blocks: it is kept whole whenever a block of it is not in ``rebuild``.
    """

    def __init__(self, records: Sequence, *, kind: str = "block_diagonal", damping: float, pi="trace",
                 backend: str = "auto", warm_start=None, factorization: str = "eigh", _kron=None,
                 rebuild: Optional[Sequence[int]] = None):
        records = list(records)
        prev = warm_start if rebuild is not None and _kron is None else None
        if prev is not None and not (isinstance(prev, BlockInverse) and prev.kind == kind
                                     and prev.damping == check_damping(damping) and prev.pi_spec == pi
                                     and prev.shapes == [_shape(f) for f in records]
                                     and prev.kron_idx == [i for i, f in enumerate(records) if _is_dense_kron(f)]):
            prev = None  # nothing reusable: every block is built
        keep = set() if prev is None else set(range(len(records))) - set(rebuild)
        if keep and kind != "block_diagonal" and any(i in keep for i in prev.kron_idx):
            keep |= set(prev.kron_idx)  # the tridiagonal inverse couples its blocks: kept whole
        records = [prev.records[i] if i in keep else f for i, f in enumerate(records)]
        self.records = records
        self.kind = kind
        self.damping = check_damping(damping)
        self.pi_spec = pi
        self.backend = backend
        self._factorization = factorization
        self.kron_idx = [i for i, f in enumerate(self.records) if _is_dense_kron(f)]
        self.other_idx = [i for i in range(len(self.records)) if i not in set(self.kron_idx)]
        for i in self.other_idx:
            f = self.records[i]
            if not isinstance(f, (KroneckerFactors, BlockFisher)):
                raise TypeError(f"record {i}: expected KroneckerFactors or BlockFisher, got {type(f).__name__}")
        with autocast_off():  # the inverse in the factors' dtype whatever the caller's autocast
            if _kron is not None:
                self.kron = _kron
            elif self.kron_idx:
                ws = warm_start.kron if isinstance(warm_start, BlockInverse) else warm_start
                facs = [self.records[i] for i in self.kron_idx]
                kept = [j for j, i in enumerate(self.kron_idx) if i in keep]
                if kind == "block_diagonal":
                    # cross factors (if any) are not needed here
                    facs = [KroneckerFactors(A=f.A, G=f.G, name=f.name, homogeneous=f.homogeneous) for f in facs]
                    if kept:
                        self.kron = BlockDiagonal(facs, damping=self.damping, pi=pi, backend=backend, warm_start=ws,
                                                  factorization=factorization, keep=kept)
                if not kept:
                    self.kron = build_inverse(kind, facs, damping=self.damping, backend=backend, warm_start=ws,
                                              pi=pi, factorization=factorization)
                elif kind != "block_diagonal":
                    self.kron = ws
            else:
                self.kron = None
            self.fallbacks = list(self.kron.fallbacks) if self.kron is not None else []
            self._build_others({} if prev is None else {i: prev.other[i] for i in keep if i in prev.other})

    # ------------------------------------------------------------------ the other kinds
    def _pi(self, f: KroneckerFactors) -> float:
        if not isinstance(self.pi_spec, str):
            return float(self.pi_spec)
        tr = lambda M: M.sum() if M.dim() == 1 else torch.diagonal(M).sum()  # noqa: E731
        ta, tg = torch.stack([tr(f.A).double() / f.A.shape[0], tr(f.G).double() / f.G.shape[0]]).tolist()
        return _pi_from_traces(ta, tg)

    def _pi_small(self, f: BlockFisher) -> float:
        """π for F ⊗ [1]: sqrt(mean diagonal of F / 1) (the trace rule with a 1×1 G)."""
        if not isinstance(self.pi_spec, str):
            return float(self.pi_spec)
        ta = float(torch.diagonal(f.F, dim1=-2, dim2=-1).double().mean())
        return _pi_from_traces(ta, 1.0)

    def _build_others(self, given: Optional[dict] = None) -> None:
        g = self.damping
        self.other: dict[int, tuple] = dict(given or {})
        for i in self.other_idx:
            if i in self.other:
                continue
            f = self.records[i]
            if isinstance(f, KroneckerFactors) and f.tied_owner is not None:
                self.other[i] = ("zero",)
            elif isinstance(f, KroneckerFactors) and f.tied_partner is not None:
                e = self.records[f.tied_partner]
                if not (isinstance(e, KroneckerFactors) and e.tied_owner == i):
                    raise ValueError(f"record {i} ({f.name}) is a tied head whose partner record {f.tied_partner} "
                                     "is not its embedding; pass the records of both blocks of the pair")
                self.other[i] = ("kron_sum", tied_sum_inverse(
                    f.A, f.G, e.A, e.G, damping=g, pi=self.pi_spec, backend=self.backend))
            elif isinstance(f, KroneckerFactors) and f.grouped:  # one Kronecker product per group
                pi = grouped_pi(f.A, f.G, self.pi_spec)
                tiny = torch.finfo(f.A.dtype).tiny
                Ainv, ok_a = _spd_inverse(f.A, (pi * g).clamp_min(tiny))
                Ginv, ok_g = _spd_inverse(f.G, (g / pi).clamp_min(tiny))
                for key, ok in (("A", ok_a), ("G", ok_g)):
                    if not ok:
                        self.fallbacks.append(f"{f.name}: per-group {key} (clamped eigenvalues)")
                self.other[i] = ("kron_grouped", Ainv, Ginv)
            elif isinstance(f, KroneckerFactors):  # a diagonal Ā and/or G
                pi = self._pi(f)
                sides = []
                for key, M, c in (("A", f.A, pi * g), ("G", f.G, g / pi)):
                    if M.dim() == 1:
                        d = M.clamp_min(0) + c
                        if g == 0 and bool((d <= 0).any()):
                            raise ValueError(f"layer {f.name}: a zero entry of the diagonal factor {key} (e.g. a "
                                             "token never seen) makes it singular and damping is 0; use damping > 0")
                        sides.append(1.0 / d)
                    else:
                        Minv, ok = _spd_inverse(M, c)
                        if not ok:
                            self.fallbacks.append(f"{f.name}: {key} (clamped eigenvalues)")
                        sides.append(Minv)
                self.other[i] = ("kron_diag", sides[0], sides[1])
            else:
                pi = self._pi_small(f)
                c = max(pi * g, torch.finfo(f.F.dtype).tiny)
                outer = 1.0 / (1.0 + g / pi)
                if f.F.shape[-1] == 1:
                    self.other[i] = ("diag", outer / (f.F.reshape(-1).clamp_min(0) + c))
                else:
                    Finv, ok = _spd_inverse(f.F, c)
                    if not ok:
                        self.fallbacks.append(f"{f.name}: small blocks (clamped eigenvalues)")
                    self.other[i] = ("dense", Finv * outer)

    def _dtype(self, i: int) -> torch.dtype:
        return self.records[i].A.dtype

    # ------------------------------------------------------------------ interface
    @property
    def factors(self) -> list:
        return self.records

    @property
    def factorization(self) -> str:
        """How the Kronecker part was built (``"cholesky"`` falls back to ``"eigh"`` there)."""
        return self.kron.factorization if self.kron is not None and hasattr(self.kron, "factorization") \
            else self._factorization

    # the Kronecker part's eigenbases and damped factor inverses (over the dense Kronecker
    # blocks, in their order), for inspection
    @property
    def eig(self):
        return None if self.kron is None else self.kron.eig

    @property
    def Ainv(self):
        return getattr(self.kron, "Ainv", [])

    @property
    def Ginv(self):
        return getattr(self.kron, "Ginv", [])

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [block_shape(f) for f in self.records]

    @property
    def compute_dtype(self):
        """The dtype the Kronecker products read their operands in (:mod:`.compute_dtype`); the
        small blocks (elementwise and (k, b, b) products) stay in the factor dtype."""
        return getattr(self, "_compute_dtype", None)

    @compute_dtype.setter
    def compute_dtype(self, value) -> None:
        self._compute_dtype = value
        if self.kron is not None:
            self.kron.compute_dtype = value

    def with_damping(self, damping: float) -> "BlockInverse":
        """Same factors, another γ (the Kronecker part reuses its eigendecompositions)."""
        with autocast_off():
            kron = None if self.kron is None else self.kron.with_damping(damping)
        inv = BlockInverse(self.records, kind=self.kind, damping=damping, pi=self.pi_spec, backend=self.backend,
                           factorization=self._factorization, _kron=kron)
        inv.compute_dtype = self.compute_dtype
        return inv

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The preconditioned blocks, one (g_dim, a_dim) matrix per record (in the inverse's
        dtype whatever the caller's autocast)."""
        with autocast_off():
            return self._apply(grads)

    def _apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(grads) != len(self.records):
            raise ValueError(f"expected {len(self.records)} gradient blocks (one per layer), got {len(grads)}")
        for i, (gr, s) in enumerate(zip(grads, self.shapes)):
            if tuple(gr.shape) != tuple(s):
                raise ValueError(f"gradient block {i} ({self.records[i].name}) must have shape {tuple(s)}, "
                                 f"got {tuple(gr.shape)}")
        out: list[Optional[torch.Tensor]] = [None] * len(grads)
        if self.kron is not None:
            for i, u in zip(self.kron_idx, self.kron.apply([grads[i] for i in self.kron_idx])):
                out[i] = u
        for i in self.other_idx:
            entry = self.other[i]
            V = grads[i]
            if entry[0] == "kron_sum":
                out[i] = entry[1].apply(V)
            elif entry[0] == "zero":
                out[i] = torch.zeros(V.shape, dtype=self._dtype(i), device=V.device)
            elif entry[0] == "kron_diag":
                _, ainv, Ginv = entry
                out[i] = apply_factored(V, Ginv, ainv)
            elif entry[0] == "kron_grouped":
                _, Ainv, Ginv = entry
                out[i] = apply_grouped(V, Ginv, Ainv)
            elif entry[0] == "diag":
                out[i] = V.to(entry[1].dtype) * entry[1].unsqueeze(1)
            else:
                Finv = entry[1]
                out[i] = torch.einsum("kbc,kc->kb", Finv, V.to(Finv.dtype))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"composite": True, "kind": self.kind, "damping": self.damping, "pi": self.pi_spec,
                "factorization": self._factorization,
                "kron": None if self.kron is None else self.kron.state_dict(),
                "records": [record_to_dict(f) for f in self.records]}

    @classmethod
    def from_state(cls, state: dict, template: Sequence, *, backend: str, kind: str) -> "BlockInverse":
        """From :meth:`state_dict` (or a checkpoint of format ≤ 3: a bare block-diagonal or
        tridiagonal state over Kronecker blocks), on the devices of ``template`` (the running
        factors, which give the names)."""
        if not state.get("composite"):
            state = {"kind": kind, "damping": state["damping"], "pi": state["pi"], "factorization": None,
                     "kron": state, "records": [factors_to_dict(t) for t in template]}
        records = records_from_dicts(state["records"], template)
        kron_idx = [i for i, f in enumerate(records) if _is_dense_kron(f)]
        saved = [r for r in state["records"] if "A" in r]
        if sum(1 for r in saved if r["A"].dim() == 2 and r["G"].dim() == 2) != len(kron_idx):
            # saved without the max_block_dim bound: rebuilt from the (diagonalised) records
            return cls(records, kind=state["kind"], damping=state["damping"], pi=state["pi"], backend=backend,
                       factorization=state.get("factorization") or "eigh")
        kron = None
        if state["kron"] is not None:
            kron = INVERSE_KINDS[state["kind"]].from_state(state["kron"], [template[i] for i in kron_idx],
                                                           backend=backend)
        fact = state.get("factorization") or (getattr(kron, "factorization", "eigh") if kron is not None else "eigh")
        return cls(records, kind=state["kind"], damping=state["damping"], pi=state["pi"], backend=backend,
                   factorization=fact, _kron=kron)

