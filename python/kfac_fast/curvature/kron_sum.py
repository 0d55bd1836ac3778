"""Inverses of sums of Kronecker products by eigendecomposition (paper Appendix B).

(A ⊗ B ± C ⊗ D)⁻¹ vec(V) = vec( K₂ ((K₂ᵀ V K₁) ⊘ (11ᵀ ± s₂s₁ᵀ)) K₁ᵀ )
with K₁ = A^{-1/2}E₁, K₂ = B^{-1/2}E₂, A^{-1/2}CA^{-1/2} = E₁S₁E₁ᵀ, B^{-1/2}DB^{-1/2} = E₂S₂E₂ᵀ.

Convention: vec stacks columns and (A ⊗ B) vec(V) = vec(B V Aᵀ), so V has shape
(dim B, dim A) — for a layer, B is the G-side (d_out) and A the Ā-side (d_in + 1).
Set-up (two eigendecompositions per side) happens once; each ``apply`` is four matrix products
and an element-wise division.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..linalg import eigh


@dataclass
class KronSumInverse:
    """Applies vec⁻¹[(ξ·P ± C ⊗ D)⁻¹ vec(V)] = K₂((K₂ᵀVK₁) ⊘ (c₀·11ᵀ ± s₂s₁ᵀ))K₁ᵀ.

    K1: (a, a), K2: (b, b), s1: (a,), s2: (b,), c0 = 1 (Appendix B general form) or ξ
    (the ξI⊗I ± C⊗D form, where K are plain eigenvectors).
    """

    K1: torch.Tensor
    K2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    sign: int = 1
    c0: float = 1.0

    @property
    def denominator(self) -> torch.Tensor:
        """(b, a) matrix c₀·11ᵀ ± s₂s₁ᵀ."""
        return self.c0 + self.sign * torch.outer(self.s2, self.s1)

    def apply(self, V: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """V: (dim B, dim A) -> same shape."""
        if V.shape != (self.K2.shape[0], self.K1.shape[0]):
            raise ValueError(f"V must have shape ({self.K2.shape[0]}, {self.K1.shape[0]}) = (dim B, dim A), "
                             f"got {tuple(V.shape)}")
        from ..ops import eigen_precondition

        return eigen_precondition(
            [V], [self.K2], [self.s2], [self.K1], [self.s1], c0=self.c0, sigma=self.sign, backend=backend
        )[0]


def _check_sign(sign: int) -> int:
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    return sign


def _inv_sqrt(M: torch.Tensor, name: str, backend: str, warm: Optional[torch.Tensor] = None) -> torch.Tensor:
    r = eigh(M, backend=backend, warm_start=warm)
    s, Q = r.eigenvalues, r.eigenvectors
    smax = float(s.abs().max()) if s.numel() else 0.0
    if s.numel() and float(s.min()) <= 1e-14 * max(smax, 1e-300):
        raise ValueError(f"{name} must be symmetric positive definite for Appendix B "
                         f"(smallest eigenvalue {float(s.min()):.3e}); add damping")
    return (Q * s.rsqrt()) @ Q.t()


def kron_sum_inverse(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, *, sign: int = 1, backend: str = "auto"
) -> KronSumInverse:
    """Set up (A ⊗ B ± C ⊗ D)⁻¹ (Appendix B).

    Args:
        A: (a, a) SPD, B: (b, b) SPD, C: (a, a) symmetric PSD, D: (b, b) symmetric PSD.
        sign: +1 or -1. For -1 the caller guarantees A⊗B − C⊗D is positive definite
            (as Σ_{i|i+1} of Sec 4.3 is); the check below raises otherwise.
        backend: eigendecomposition/apply backend.

    Returns:
        :class:`KronSumInverse`; ``.apply(V)`` with V of shape (b, a).
    """
    sign = _check_sign(sign)
    for name, M in (("A", A), ("B", B), ("C", C), ("D", D)):
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"{name} must be square, got shape {tuple(M.shape)}")
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if C.shape != A.shape or D.shape != B.shape:
        raise ValueError(f"C must match A {tuple(A.shape)} and D must match B {tuple(B.shape)}; "
                         f"got C {tuple(C.shape)}, D {tuple(D.shape)}")
    Ais = _inv_sqrt(A, "A", backend)
    Bis = _inv_sqrt(B, "B", backend)
    M1 = Ais @ C @ Ais
    M2 = Bis @ D @ Bis
    r = eigh([0.5 * (M1 + M1.t()), 0.5 * (M2 + M2.t())], backend=backend)
    (s1, s2), (E1, E2) = r.eigenvalues, r.eigenvectors
    inv = KronSumInverse(K1=Ais @ E1, K2=Bis @ E2, s1=s1, s2=s2, sign=sign, c0=1.0)
    den = inv.denominator
    if sign < 0 and den.numel() and float(den.min()) <= 0:
        raise ValueError("A⊗B − C⊗D is not positive definite (1 − s₂s₁ᵀ has a non-positive entry); "
                         "increase the damping of A and B")
    return inv


def kron_sum_inverse_identity(
    xi: float, C: torch.Tensor, D: torch.Tensor, *, sign: int = 1, backend: str = "auto"
) -> KronSumInverse:
    """Set up (ξ I ⊗ I ± C ⊗ D)⁻¹ (the simpler case of Appendix B): C (a, a), D (b, b) symmetric.

    Used for exact Tikhonov damping (eqn 6): (Ā ⊗ G + (λ+η) I)⁻¹ with ξ = λ+η, sign = +1.
    """
    sign = _check_sign(sign)
    r = eigh([C, D], backend=backend)
    (s1, s2), (E1, E2) = r.eigenvalues, r.eigenvectors
    inv = KronSumInverse(K1=E1, K2=E2, s1=s1, s2=s2, sign=sign, c0=float(xi))
    den = inv.denominator
    if den.numel() and float(den.abs().min()) == 0:
        raise ValueError("ξI⊗I ± C⊗D is singular; use ξ > 0 (damping)")
    return inv
