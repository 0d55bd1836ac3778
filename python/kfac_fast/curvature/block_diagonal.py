"""Block-diagonal approximate inverse F̆⁻¹ (paper Sec 4.2) with factored Tikhonov damping (Sec 6.3).

F̆ = diag(Ā₀,₀ ⊗ G₁,₁, …, Ā_{ℓ-1,ℓ-1} ⊗ G_{ℓ,ℓ}), so F̆⁻¹v is, per layer,
U_i = (G_i + (γ/π_i) I)⁻¹ V_i (Ā_{i-1} + π_i γ I)⁻¹ with V_i the (d_out, d_in+1) gradient block.
With ``exact_damping=True`` the block is (Ā ⊗ G + γ² I)⁻¹ instead (eqn 6, via Appendix B).

The damped factor inverses come from eigendecompositions (``factorization="eigh"``: one per
refresh, after which every γ costs one product per factor) or from Cholesky factorisations of
Ā + πγI and G + (γ/π)I (``"cholesky"``: about n³ flops per factor and γ, several times cheaper
than an eigendecomposition, but recomputed for every γ candidate).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ._eigen import FactorEig, damped_spectrum, factor_eigs, inverse_from_eig
from .compute_dtype import ComputeDtypeOperands, operand_dtype, precision
from .damping import PiSpec, check_damping, resolve_pis
from ._inverse_state import inverse_parts, inverse_state
from .factors import KroneckerFactors, check_factors

FACTORIZATIONS = ("eigh", "cholesky")
# CPU BLAS runs GEMMs with odd sizes (785, 1001, 501: the bias column) at ~2/3 of its speed on
# multiples of 16 (measured on the project's CPU, see README); padded inverses fix that.
_PAD = 16


def _in_padded_buffer(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (n, n) view, the zero-padded (p, p) buffer holding it), p = n rounded up to 16."""
    n = M.shape[0]
    p = -(-n // _PAD) * _PAD
    if p == n:
        return M, M
    buf = M.new_zeros(p, p)
    buf[:n, :n] = M
    return buf[:n, :n], buf


def check_grads(grads: Sequence[torch.Tensor], shapes: Sequence[tuple]) -> None:
    if len(grads) != len(shapes):
        raise ValueError(f"expected {len(shapes)} gradient blocks (one per layer), got {len(grads)}")
    for i, (g, s) in enumerate(zip(grads, shapes)):
        if tuple(g.shape) != tuple(s):
            raise ValueError(f"gradient block {i} must have shape {tuple(s)} = (d_out, d_in + 1), got {tuple(g.shape)}")


class BlockDiagonal(ComputeDtypeOperands):
    """F̆⁻¹ with factored Tikhonov damping γ (Sec 4.2, 6.3, 6.6).

    Args:
        factors: per-layer :class:`KroneckerFactors` (A: (a_i, a_i), G: (g_i, g_i)).
        damping: γ ≥ 0. Ā ← Ā + π·γ·I and G ← G + (γ/π)·I; γ = 0 gives the undamped inverse
            (which must exist).
        pi: ``"trace"`` (Sec 6.3 trace-norm rule) or a positive float.
        exact_damping: use (Ā ⊗ G + γ²I)⁻¹ (eqn 6, Appendix B) instead of the factored form.
        backend: ``"auto"|"torch"|"triton"|"native"`` for eigendecompositions and products.
        factorization: ``"eigh"`` or ``"cholesky"`` (factored damping with γ > 0 only; a factor
            that is not positive definite or not finite sends the whole inverse down the
            ``"eigh"`` path and its fallbacks).
        warm_start: a previous :class:`BlockDiagonal` (or its ``eig``) whose eigenbases start
            the iterative eigensolver (native engine).
        keep: positions of ``factors`` whose damped inverses (and eigenbases) are taken from
            ``warm_start`` instead of being rebuilt (the warm-up rule of
            :func:`~kfac_fast.curvature.inverses.warmup_rebuild`); ``warm_start`` must be a
            :class:`BlockDiagonal` over the same blocks at the same γ, and its factors at those
            positions are the ones given.
    """

    def __init__(
        self,
        factors: Sequence[KroneckerFactors],
        *,
        damping: float,
        pi: PiSpec = "trace",
        exact_damping: bool = False,
        backend: str = "auto",
        warm_start=None,
        factorization: str = "eigh",
        _eig: Optional[list[FactorEig]] = None,
        _pis: Optional[list[float]] = None,
        keep: Sequence[int] = (),
    ):
        check_factors(factors)
        if factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown factorization {factorization!r}; choose one of {', '.join(FACTORIZATIONS)}")
        if factorization == "cholesky" and exact_damping:
            raise ValueError("exact_damping=True needs eigendecompositions (Appendix B): use factorization='eigh'")
        self.factors = list(factors)
        self.damping = check_damping(damping)
        self.pi_spec = pi
        self.exact_damping = bool(exact_damping)
        self.backend = backend
        self.pis = list(_pis) if _pis is not None else resolve_pis(pi, self.factors)
        self.factorization = factorization
        prev = warm_start if keep else None
        if prev is not None and (not isinstance(prev, BlockDiagonal) or prev.exact_damping or self.exact_damping
                                 or prev.damping != self.damping or len(prev.factors) != len(self.factors)):
            prev = None  # nothing reusable: every block is rebuilt
        keep = set(keep) if prev is not None else set()
        if factorization == "cholesky" and _eig is None and self.damping > 0 and \
                self._build_cholesky({j: (prev.Ainv[j], prev.Ginv[j]) for j in keep}):
            self.eig, self.fallbacks = None, []
            return
        self.factorization = "eigh"
        if keep and _eig is None and prev.eig is not None:
            todo = [j for j in range(len(self.factors)) if j not in keep]
            new, self.fallbacks = factor_eigs([self.factors[j] for j in todo], backend=backend,
                                              warm_start=[prev.eig[j] for j in todo])
            _eig = list(prev.eig)
            for j, e in zip(todo, new):
                _eig[j] = e
            self.eig = _eig
        else:
            self.eig, self.fallbacks = factor_eigs(self.factors, backend=backend, warm_start=warm_start, eig=_eig)
        self._build()

    def _build_cholesky(self, given: Optional[dict] = None) -> bool:
        """Ainv, Ginv from Cholesky factors (``given``: position -> (Ainv, Ginv) reused as they
        are); False (nothing set) when any damped factor is not positive definite or not finite.
        One host sync for the whole check."""
        g = self.damping
        given = given or {}
        Ls, ok = [], []
        for j, (f, pi) in enumerate(zip(self.factors, self.pis)):
            if j in given:
                Ls += [None, None]
                continue
            for M, c in ((f.A, pi * g), (f.G, g / pi)):
                S = 0.5 * (M + M.t())
                S.diagonal().add_(c)
                L, info = torch.linalg.cholesky_ex(S)
                Ls.append(L)
                ok.append((info == 0) & torch.isfinite(L).all())
        if ok and not bool(torch.stack(ok).all()):
            return False
        inv = [None if L is None else torch.cholesky_inverse(L) for L in Ls]
        for j, (Ai, Gi) in given.items():
            inv[2 * j], inv[2 * j + 1] = Ai, Gi
        self.Ainv, self.Ginv, self.kron_sum = inv[0::2], inv[1::2], []
        self._pad_inverses()
        return True

    def _pad_inverses(self) -> None:
        """On CPU keep Ā⁻¹ and G⁻¹ inside zero-padded buffers (``Ainv``/``Ginv`` become views):
        ``apply`` then multiplies padded blocks, same result, faster BLAS, no second copy."""
        self._Apad = self._Gpad = None
        if not self.Ainv or self.Ainv[0].device.type != "cpu":
            return
        A = [_in_padded_buffer(M) for M in self.Ainv]
        G = [_in_padded_buffer(M) for M in self.Ginv]
        self.Ainv, self._Apad = [a for a, _ in A], [b for _, b in A]
        self.Ginv, self._Gpad = [g for g, _ in G], [b for _, b in G]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(f.G.shape[0], f.A.shape[0]) for f in self.factors]

    def _build(self) -> None:
        g = self.damping
        self.Ainv, self.Ginv, self.kron_sum = [], [], []
        for i, (f, e, pi) in enumerate(zip(self.factors, self.eig, self.pis)):
            label = f"layer {i}" + (f" ({f.name})" if f.name else "")
            if self.exact_damping:
                from .kron_sum import KronSumInverse

                xi = g * g
                sA = e.sA.clamp_min(0) if xi > 0 else e.sA
                sG = e.sG.clamp_min(0) if xi > 0 else e.sG
                inv = KronSumInverse(K1=e.QA, K2=e.QG, s1=sA, s2=sG, sign=1, c0=xi)
                den = inv.denominator
                if den.numel() and float(den.min()) <= 1e-12 * float(den.abs().max()):
                    raise ValueError(f"{label}: Ā⊗G is singular and damping is 0; use damping > 0")
                self.kron_sum.append(inv)
            else:
                dA = damped_spectrum(e.sA, pi * g, label=f"{label}: factor A (Ā)")
                dG = damped_spectrum(e.sG, g / pi, label=f"{label}: factor G")
                self.Ainv.append(inverse_from_eig(e.QA, dA))
                self.Ginv.append(inverse_from_eig(e.QG, dG))
        self._pad_inverses()

    def state_dict(self) -> dict:
        """For checkpoints: γ, π, the factors and the eigenbases (None when Cholesky-built)."""
        return inverse_state(self)

    @classmethod
    def from_state(cls, state: dict, template: Sequence[KroneckerFactors], *, backend: str) -> "BlockDiagonal":
        """The inverse :meth:`state_dict` describes, on the devices of ``template``; a Cholesky-built
        one is rebuilt from its factors (deterministic)."""
        facs, eig = inverse_parts(state, template)
        if eig is None:
            return cls(facs, damping=state["damping"], pi=state["pi"], backend=backend, factorization="cholesky")
        return cls(facs, damping=state["damping"], pi=state["pi"], backend=backend, _eig=eig, factorization="eigh")

    def with_damping(self, damping: float) -> "BlockDiagonal":
        """Same factors, another γ: cheap with ``"eigh"`` (no new eigendecomposition); with
        ``"cholesky"`` new factorisations."""
        return BlockDiagonal(self.factors, damping=damping, pi=self.pi_spec, exact_damping=self.exact_damping,
                             backend=self.backend, factorization=self.factorization, _eig=self.eig, _pis=self.pis)

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """F̆⁻¹v. grads: list of (d_out, d_in + 1) blocks -> list of the same shapes."""
        check_grads(grads, self.shapes)
        dt = self.factors[0].A.dtype
        cd = operand_dtype(self.compute_dtype) or dt  # compute_dtype: operands rounded, fp32 accumulation
        grads = [g.to(cd) for g in grads]
        c = self._operands
        with precision(self.compute_dtype):
            if self.exact_damping:
                ks = self.kron_sum
                return ops.eigen_precondition(
                    grads, c([k.K2 for k in ks]), [k.s2 for k in ks], c([k.K1 for k in ks]), [k.s1 for k in ks],
                    c0=[k.c0 for k in ks], sigma=1, backend=self.backend, out_dtype=dt)
            if self._Apad is not None:
                padded = [torch.nn.functional.pad(g, (0, a.shape[0] - g.shape[1], 0, gi.shape[0] - g.shape[0]))
                          for g, a, gi in zip(grads, self._Apad, self._Gpad)]
                U = ops.sandwich(c(self._Gpad), padded, c(self._Apad), backend=self.backend, out_dtype=dt)
                return [u[: g.shape[0], : g.shape[1]] for u, g in zip(U, grads)]
            return ops.sandwich(c(self.Ginv), grads, c(self.Ainv), backend=self.backend, out_dtype=dt)

    def apply_per_example(
        self, X: Sequence[torch.Tensor], Gm: Sequence[torch.Tensor], *, scale: float, rank_m: Optional[bool] = None
    ) -> list[torch.Tensor]:
        """F̆⁻¹ applied to the mini-batch gradient V_i = scale·Gmᵢᵀ X̄ᵢ, from per-example quantities.

        The rank-m trick (end of Sec 8): U_i = scale·(G⁻¹Gmᵢᵀ)(X̄ᵢ Ā⁻¹) costs O(m d²) instead of
        O(d³); chosen per layer when cheaper (``rank_m=None``) or forced on/off.
        Not compatible with weight decay (whose gradient ηW is not low-rank; Sec 8).

        Args:
            X: per layer (m, d_in) inputs. Gm: per layer (m, d_out) per-example derivatives.
            scale: 1/m for a mean loss with unscaled per-example g.
        """
        if self.exact_damping:
            raise ValueError("the rank-m trick needs the factored damping (exact_damping=False)")
        if len(X) != len(self.factors) or len(Gm) != len(self.factors):
            raise ValueError(f"expected {len(self.factors)} per-layer inputs and derivatives")
        out: list[Optional[torch.Tensor]] = [None] * len(self.factors)
        low, direct = [], []
        for i, (f, x, g) in enumerate(zip(self.factors, X, Gm)):
            if x.shape[0] != g.shape[0]:
                raise ValueError(f"layer {i}: inputs have {x.shape[0]} rows but derivatives {g.shape[0]}")
            if x.shape[1] + int(f.homogeneous) != f.A.shape[0] or g.shape[1] != f.G.shape[0]:
                raise ValueError(f"layer {i}: per-example shapes {tuple(x.shape)}, {tuple(g.shape)} do not match "
                                 f"factors A {tuple(f.A.shape)}, G {tuple(f.G.shape)}")
            use = rank_m if rank_m is not None else ops.rank_m_is_cheaper(x.shape[0], f.G.shape[0], f.A.shape[0])
            (low if use else direct).append(i)
        dt = self.factors[0].A.dtype
        if low:
            res = ops.rank_m_precondition(
                [X[i].to(dt) for i in low], [Gm[i].to(dt) for i in low], [self.Ainv[i] for i in low],
                [self.Ginv[i] for i in low], homogeneous=[self.factors[i].homogeneous for i in low],
                scale=scale, backend=self.backend)
            for i, u in zip(low, res):
                out[i] = u
        if direct:
            V = []
            for i in direct:
                x = X[i].to(dt)
                if self.factors[i].homogeneous:
                    x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
                V.append(scale * (Gm[i].to(dt).t() @ x))
            res = ops.sandwich([self.Ginv[i] for i in direct], V, [self.Ainv[i] for i in direct],
                               backend=self.backend)
            for i, u in zip(direct, res):
                out[i] = u
        return out  # type: ignore[return-value]
