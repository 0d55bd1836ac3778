"""Block-tridiagonal approximate inverse F̂⁻¹ (paper Sec 4.3, Appendix B).

F̂ agrees with F̃ on the tridiagonal blocks and F̂⁻¹ = ΞᵀΛΞ is block-tridiagonal (a directed
Gaussian graphical model from the top layer down):

    Ψ^Ā_{i-1,i} = Ā_{i-1,i} Ā_{i,i}⁻¹,   Ψ^G_{i,i+1} = G_{i,i+1} G_{i+1,i+1}⁻¹
    Σ_{i|i+1}  = Ā_{i-1,i-1} ⊗ G_{i,i} − Ψ^Ā Ā_{i,i} Ψ^Āᵀ ⊗ Ψ^G G_{i+1,i+1} Ψ^Gᵀ,   Σ_ℓ = Ā_{ℓ-1,ℓ-1} ⊗ G_{ℓ,ℓ}
    Ξv:  U_i = V_i − Ψ^G_{i,i+1} V_{i+1} Ψ^Āᵀ_{i-1,i}      (U_ℓ = V_ℓ)
    Ξᵀv: U_i = V_i − Ψ^Gᵀ_{i-1,i} V_{i-1} Ψ^Ā_{i-2,i-1}    (U_1 = V_1)

Damping (Sec 6.3): the damped diagonal factors Ā + πγI, G + (γ/π)I are used everywhere;
the cross factors are not damped. Σ⁻¹_{i|i+1} is applied by the Appendix B method.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..linalg import eigh
from ._eigen import damped_spectrum, factor_eigs, inverse_from_eig
from ._inverse_state import inverse_parts, inverse_state
from .block_diagonal import check_grads
from .compute_dtype import ComputeDtypeOperands, operand_dtype, precision
from .damping import PiSpec, check_damping, resolve_pis
from .factors import KroneckerFactors, check_factors
from .kron_sum import KronSumInverse


class BlockTridiagonal(ComputeDtypeOperands):
    """F̂⁻¹ with factored Tikhonov damping γ (Sec 4.3, 6.3).

    Args: as :class:`BlockDiagonal` (``factors`` must carry ``A_next``/``G_next``, i.e. come
    from ``kronecker_factors(..., tridiagonal=True)``).
    """

    def __init__(
        self,
        factors: Sequence[KroneckerFactors],
        *,
        damping: float,
        pi: PiSpec = "trace",
        backend: str = "auto",
        warm_start=None,
        _eig=None,
        _pis=None,
    ):
        check_factors(factors, tridiagonal=True)
        self.factors = list(factors)
        self.damping = check_damping(damping)
        self.pi_spec = pi
        self.backend = backend
        self.eig, self.fallbacks = factor_eigs(self.factors, backend=backend, warm_start=warm_start, eig=_eig)
        self.pis = list(_pis) if _pis is not None else resolve_pis(pi, self.factors)
        self._build()

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(f.G.shape[0], f.A.shape[0]) for f in self.factors]

    def state_dict(self) -> dict:
        """For checkpoints: γ, π, the factors (with the cross factors) and the eigenbases."""
        return inverse_state(self)

    @classmethod
    def from_state(cls, state: dict, template: Sequence, *, backend: str) -> "BlockTridiagonal":
        """The inverse :meth:`state_dict` describes, on the devices of ``template`` (eigenbases
        recomputed if the state has none)."""
        facs, eig = inverse_parts(state, template)
        return cls(facs, damping=state["damping"], pi=state["pi"], backend=backend, _eig=eig)

    def with_damping(self, damping: float) -> "BlockTridiagonal":
        """Same factors, another γ (reuses the factors' eigendecompositions)."""
        return BlockTridiagonal(self.factors, damping=damping, pi=self.pi_spec, backend=self.backend, _eig=self.eig,
                                _pis=self.pis)

    def _build(self) -> None:
        g = self.damping
        L = len(self.factors)
        dA, dG = [], []
        for i, (f, e, pi) in enumerate(zip(self.factors, self.eig, self.pis)):
            label = f"layer {i}" + (f" ({f.name})" if f.name else "")
            dA.append(damped_spectrum(e.sA, pi * g, label=f"{label}: factor A (Ā)"))
            dG.append(damped_spectrum(e.sG, g / pi, label=f"{label}: factor G"))
        # Ψ's from the damped diagonal factors of the layer above.
        self.PsiA, self.PsiG = [], []
        M1s, M2s, Ais, Gis = [], [], [], []
        for i in range(L - 1):
            f, e_next = self.factors[i], self.eig[i + 1]
            PsiA = f.A_next @ inverse_from_eig(e_next.QA, dA[i + 1])
            PsiG = f.G_next @ inverse_from_eig(e_next.QG, dG[i + 1])
            self.PsiA.append(PsiA)
            self.PsiG.append(PsiG)
            CA = PsiA @ f.A_next.t()  # Ψ^Ā Ā_{i,i} Ψ^Āᵀ = Ā_{i-1,i} Ā_{i,i}⁻¹ Ā_{i-1,i}ᵀ
            CG = PsiG @ f.G_next.t()
            Ai = inverse_from_eig(self.eig[i].QA, dA[i], -0.5)
            Gi = inverse_from_eig(self.eig[i].QG, dG[i], -0.5)
            M1 = Ai @ CA @ Ai
            M2 = Gi @ CG @ Gi
            M1s.append(0.5 * (M1 + M1.t()))
            M2s.append(0.5 * (M2 + M2.t()))
            Ais.append(Ai)
            Gis.append(Gi)
        self.sigma_inv: list[KronSumInverse] = []
        if L > 1:
            r = eigh(M1s + M2s, backend=self.backend)
            for i in range(L - 1):
                s1, E1 = r.eigenvalues[i], r.eigenvectors[i]
                s2, E2 = r.eigenvalues[L - 1 + i], r.eigenvectors[L - 1 + i]
                inv = KronSumInverse(K1=Ais[i] @ E1, K2=Gis[i] @ E2, s1=s1, s2=s2, sign=-1, c0=1.0)
                den = inv.denominator
                if den.numel() and float(den.min()) <= 1e-10:
                    label = f"layer {i}" + (f" ({self.factors[i].name})" if self.factors[i].name else "")
                    raise ValueError(
                        f"{label}: the conditional covariance Σ_(i|i+1) is not positive definite "
                        f"(min of 1 − s₂s₁ᵀ = {float(den.min()):.3e}); the cross factors are inconsistent with "
                        "the diagonal ones (e.g. estimated from different batches) or damping is too small")
                self.sigma_inv.append(inv)
        e = self.eig[L - 1]
        zeroA = torch.zeros_like(dA[L - 1])
        zeroG = torch.zeros_like(dG[L - 1])
        # Σ_ℓ⁻¹ = (Ā ⊗ G)⁻¹ in the same eigenbasis form: K = Q diag(d^{-1/2}), s = 0.
        self.sigma_inv.append(KronSumInverse(K1=e.QA * dA[L - 1].rsqrt(), K2=e.QG * dG[L - 1].rsqrt(),
                                             s1=zeroA, s2=zeroG, sign=-1, c0=1.0))

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """F̂⁻¹v = Ξᵀ Λ Ξ v. grads: list of (d_out, d_in + 1) blocks -> same shapes."""
        check_grads(grads, self.shapes)
        dt = self.factors[0].A.dtype
        cd = operand_dtype(self.compute_dtype) or dt  # compute_dtype: operands rounded, fp32 accumulation
        c = self._operands
        V = [g.to(cd) for g in grads]
        L = len(V)
        with precision(self.compute_dtype):
            # Ξ v
            if L > 1:
                U = ops.sandwich(c(self.PsiG), V[1:], c(self.PsiA), alpha=-1.0, V=V[:-1], beta=1.0,
                                 transpose_R=True, backend=self.backend, out_dtype=cd) + [V[-1]]
            else:
                U = list(V)
            # Λ (Appendix B for each Σ⁻¹_{i|i+1}; plain Kronecker inverse for Σ_ℓ)
            si = self.sigma_inv
            W = ops.eigen_precondition(
                U, c([s.K2 for s in si]), [s.s2 for s in si], c([s.K1 for s in si]), [s.s1 for s in si], c0=1.0,
                sigma=-1, backend=self.backend, out_dtype=dt)
            # Ξᵀ
            if L > 1:
                W = [W[0]] + ops.sandwich(c(self.PsiG), [w.to(cd) for w in W[:-1]], c(self.PsiA), alpha=-1.0,
                                          V=W[1:], beta=1.0, transpose_L=True, backend=self.backend, out_dtype=dt)
        return W
