"""The approximate inverse over blocks of every kind (paper Sec 4 + 6.3).

* Dense Kronecker blocks (Linear, Conv2d) go to the chosen inverse kind, block-diagonal
  (Sec 4.2) or block-tridiagonal (Sec 4.3, coupling consecutive Kronecker blocks:
  :class:`~kfac_fast.curvature.running.RunningFactors` says which pairs).
* Kronecker blocks with a diagonal Ā (Embedding) are block-diagonal entries:
  U = (G + (γ/π) I)⁻¹ V diag(1/(Ā + πγ)), π by the trace rule with tr Ā = Σ Ā.
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
from .factors import BlockFisher, KroneckerFactors, factors_to_dict, record_to_dict
from .inverse_kinds import INVERSE_KINDS, build_inverse
from .tied_inverse import tied_sum_inverse


def _is_dense_kron(f) -> bool:
    """A dense Kronecker block of the chosen inverse kind (a tied pair's are not: Kronecker sum)."""
    return isinstance(f, KroneckerFactors) and f.A.dim() == 2 and not f.tied


def _spd_inverse(M: torch.Tensor, c: float) -> tuple[torch.Tensor, bool]:
    """(M + cI)⁻¹ for a symmetric PSD M by Cholesky, with an eigenvalue-clamped fallback."""
    S = 0.5 * (M + M.transpose(-1, -2))
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(S + c * eye)
    if bool((info == 0).all()) and bool(torch.isfinite(L).all()):
        return torch.cholesky_inverse(L), True
    if not bool(torch.isfinite(S).all()):
        return torch.zeros_like(S), False
    w, Q = torch.linalg.eigh(S.double())
    w = (w.clamp_min(0) + c).clamp_min(torch.finfo(torch.float64).tiny)
    return ((Q / w.unsqueeze(-2)) @ Q.transpose(-1, -2)).to(S.dtype), False


def records_from_dicts(dicts: Sequence[dict], template: Sequence) -> list:
    """Factor records from their checkpoint dicts (``record_to_dict``), with the names, kinds and
    devices of ``template`` (the running factors)."""
    records = []
    for t, d in zip(template, dicts):
        if isinstance(t, BlockFisher):
            records.append(BlockFisher(F=d["F"].to(t.F.device), name=t.name, kind=t.kind))
        else:
            dev = t.A.device
            records.append(KroneckerFactors(
                A=d["A"].to(dev), G=d["G"].to(dev), A_next=None if d.get("A_next") is None else d["A_next"].to(dev),
                G_next=None if d.get("G_next") is None else d["G_next"].to(dev), name=t.name,
                homogeneous=t.homogeneous, tied_partner=t.tied_partner, tied_owner=t.tied_owner))
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
    """

    def __init__(self, records: Sequence, *, kind: str = "block_diagonal", damping: float, pi="trace",
                 backend: str = "auto", warm_start=None, factorization: str = "eigh", _kron=None):
        self.records = list(records)
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
                if kind == "block_diagonal":
                    # cross factors (if any) are not needed here
                    facs = [KroneckerFactors(A=f.A, G=f.G, name=f.name, homogeneous=f.homogeneous) for f in facs]
                self.kron = build_inverse(kind, facs, damping=self.damping, backend=backend, warm_start=ws, pi=pi,
                                          factorization=factorization)
            else:
                self.kron = None
            self.fallbacks = list(self.kron.fallbacks) if self.kron is not None else []
            self._build_others()

    # ------------------------------------------------------------------ the other kinds
    def _pi(self, f: KroneckerFactors) -> float:
        if not isinstance(self.pi_spec, str):
            return float(self.pi_spec)
        ta, tg = torch.stack([f.A.sum().double() / f.A.shape[0],
                              torch.diagonal(f.G).sum().double() / f.G.shape[0]]).tolist()
        return _pi_from_traces(ta, tg)

    def _pi_small(self, f: BlockFisher) -> float:
        """π for F ⊗ [1]: sqrt(mean diagonal of F / 1) (the trace rule with a 1×1 G)."""
        if not isinstance(self.pi_spec, str):
            return float(self.pi_spec)
        ta = float(torch.diagonal(f.F, dim1=-2, dim2=-1).double().mean())
        return _pi_from_traces(ta, 1.0)

    def _build_others(self) -> None:
        g = self.damping
        self.other: dict[int, tuple] = {}
        for i in self.other_idx:
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
            elif isinstance(f, KroneckerFactors):  # diagonal Ā
                pi = self._pi(f)
                a = f.A.clamp_min(0) + pi * g
                if g == 0 and bool((a <= 0).any()):
                    raise ValueError(f"layer {f.name}: a token never seen makes Ā singular and damping is 0; "
                                     "use damping > 0")
                Ginv, ok = _spd_inverse(f.G, g / pi)
                if not ok:
                    self.fallbacks.append(f"{f.name}: G (clamped eigenvalues)")
                self.other[i] = ("diag_a", 1.0 / a, Ginv)
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
        out = []
        for f in self.records:
            if isinstance(f, BlockFisher):
                out.append((f.F.shape[0], f.F.shape[1]))
            else:
                out.append((f.G.shape[0], f.A.shape[0]))
        return out

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
            elif entry[0] == "diag_a":
                _, ainv, Ginv = entry
                V = V.to(Ginv.dtype)
                out[i] = (Ginv @ V) * ainv.unsqueeze(0)
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
        kron = None
        if state["kron"] is not None:
            kron = INVERSE_KINDS[state["kind"]].from_state(state["kron"], [template[i] for i in kron_idx],
                                                           backend=backend)
        fact = state.get("factorization") or (getattr(kron, "factorization", "eigh") if kron is not None else "eigh")
        return cls(records, kind=state["kind"], damping=state["damping"], pi=state["pi"], backend=backend,
                   factorization=fact, _kron=kron)

