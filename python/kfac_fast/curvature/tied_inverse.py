"""The inverse of a tied weight's Kronecker-sum Fisher block (paper Appendix B; the pair of
blocks: :mod:`kfac_fast.curvature.blocks.tied`).

In the head's layout X (V, d) (V-side rows, d-side columns) the damped block is

    F̆ vec(X) = vec( (G_out + (γ/π) I) X (Ā_out + πγ I)  +  C X G_emb )

* G_out (V, V), or its diagonal (V,) (a factor stored as a diagonal), from the head's logits;
  Ā_out (d, d) from the head's input; C (V,) the embedding's token frequencies; G_emb (d, d)
  from the embedding's output.
* Damping: the factored Tikhonov damping of Sec 6.3 on the head's term, π by its trace rule
  π = sqrt((tr Ā_out / d) / (tr G_out / V)). Nothing more is needed: the damped head term is
  positive definite (γ > 0), and Appendix B needs only that of the pair it whitens with; the
  embedding term C ⊗ G_emb is positive semi-definite and enters undamped (a token never seen,
  C_v = 0, or a singular G_emb costs nothing).

Appendix B with A = Ā_out + πγ I, B = G_out + (γ/π) I (the positive definite pair) and
C' = G_emb, D' = diag(C): with A^{-1/2} G_emb A^{-1/2} = E₁S₁E₁ᵀ, B^{-1/2} diag(C) B^{-1/2} = E₂S₂E₂ᵀ,
K₁ = A^{-1/2}E₁, K₂ = B^{-1/2}E₂,

    F̆⁻¹ vec(X) = vec( K₂ ((K₂ᵀ X K₁) ⊘ (11ᵀ + s₂s₁ᵀ)) K₁ᵀ ).

With a diagonal G_out the V-side problem is elementwise: K₂ = diag((G_out + γ/π)^{-1/2}),
s₂ = C / (G_out + γ/π), so the V-side costs O(V) (no V×V matrix is ever formed) and one apply
is two (V, d)×(d, d) products and elementwise work. A diagonal Ā_out or G_emb (1-D) is taken
the same way on the d side (both diagonal: K₁ is a diagonal too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .damping import _pi_from_traces
from ..linalg import eigh


def _side(S: torch.Tensor, P: torch.Tensor, what: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, s) of one side of Appendix B: S^{-1/2} P S^{-1/2} = E diag(s) Eᵀ, K = S^{-1/2} E.

    S: symmetric positive definite, (n, n) or its diagonal (n,); P: symmetric PSD, (n, n) or
    (n,). K is (n,) (a diagonal) when both are diagonals, else (n, n)."""
    if S.dim() == 1:
        if not bool((S > 0).all()):
            raise ValueError(f"{what} must be positive definite for the tied-weight inverse (smallest entry "
                             f"{float(S.min()):.3e}); use damping > 0")
        Sis = S.rsqrt()
        if P.dim() == 1:
            return Sis, (P * Sis * Sis)
        M = Sis.unsqueeze(1) * P * Sis.unsqueeze(0)
        r = eigh(0.5 * (M + M.t()), backend=backend)
        return Sis.unsqueeze(1) * r.eigenvectors, r.eigenvalues
    r = eigh(0.5 * (S + S.t()), backend=backend)
    w, Q = r.eigenvalues, r.eigenvectors
    if S.numel() and not float(w.min()) > 1e-14 * max(float(w.abs().max()), 1e-300):
        raise ValueError(f"{what} must be positive definite for the tied-weight inverse (smallest eigenvalue "
                         f"{float(w.min()):.3e}); use damping > 0")
    Sis = (Q * w.rsqrt()) @ Q.t()
    Pm = torch.diag(P) if P.dim() == 1 else P
    M = Sis @ Pm @ Sis
    r = eigh(0.5 * (M + M.t()), backend=backend)
    return Sis @ r.eigenvectors, r.eigenvalues


@dataclass
class TiedSumInverse:
    """Applies F̆⁻¹ of a tied weight (see the module docstring) to (V, d) matrices.

    K1: (d, d), or (d,) when Ā_out and G_emb are diagonals; K2: (V, V), or (V,) when G_out is a
    diagonal; s1: (d,); s2: (V,); pi: the head term's π."""

    K1: torch.Tensor
    K2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    pi: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.K2.shape[0], self.K1.shape[0])

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """X: (V, d) in the head's layout -> F̆⁻¹X, same shape, in the inverse's dtype."""
        if tuple(X.shape) != self.shape:
            raise ValueError(f"X must have shape {self.shape} (V, d: the head's weight), got {tuple(X.shape)}")
        X = X.to(self.K1.dtype)
        left = lambda K, M: K.unsqueeze(1) * M if K.dim() == 1 else K @ M  # noqa: E731
        right = lambda M, K: M * K.unsqueeze(0) if K.dim() == 1 else M @ K  # noqa: E731
        Y = right(left(self.K2.t() if self.K2.dim() == 2 else self.K2, X), self.K1)
        Y = Y / (1.0 + torch.outer(self.s2, self.s1))
        return left(self.K2, right(Y, self.K1.t() if self.K1.dim() == 2 else self.K1))


def tied_pi(A_out: torch.Tensor, G_out: torch.Tensor) -> float:
    """The trace-rule π of the head's term (Sec 6.3); each factor square or its diagonal (1-D)."""
    tr = lambda M: M.sum() if M.dim() == 1 else torch.diagonal(M).sum()  # noqa: E731
    ta, tg = torch.stack([tr(A_out).double() / A_out.shape[0], tr(G_out).double() / G_out.shape[0]]).tolist()
    return _pi_from_traces(ta, tg)


def tied_sum_inverse(A_out: torch.Tensor, G_out: torch.Tensor, counts: torch.Tensor, G_emb: torch.Tensor, *,
                     damping: float, pi="trace", backend: str = "auto") -> TiedSumInverse:
    """Set up F̆⁻¹ for a tied weight W (V, d) (module docstring: the damped Kronecker sum).

    Args:
        A_out: (d, d) the head's Ā; G_out: (V, V) the head's G; counts: (V,) the embedding's Ā
            (token frequencies); G_emb: (d, d) the embedding's G. A factor stored as its
            diagonal (1-D: (V,) for G_out, (d,) for A_out or G_emb) is taken as that diagonal.
        damping: γ ≥ 0 (γ = 0 needs positive definite A_out and G_out).
        pi: ``"trace"`` (the head's trace rule, :func:`tied_pi`) or a positive float.
        backend: eigendecomposition backend (:func:`kfac_fast.linalg.eigh`).

    Raises:
        ValueError: shapes that do not fit, non-finite factors, or a head term that is not
            positive definite (γ = 0 and singular factors).
    """
    d, V = A_out.shape[0], counts.shape[0]
    if (tuple(A_out.shape) not in ((d, d), (d,)) or tuple(G_emb.shape) not in ((d, d), (d,)) or counts.dim() != 1
            or tuple(G_out.shape) not in ((V, V), (V,))):
        raise ValueError(f"tied weight factors must be A_out (d, d), G_out (V, V), counts (V,), G_emb (d, d), "
                         "each square one possibly its diagonal (1-D);"
                         f" got A_out {tuple(A_out.shape)}, G_out {tuple(G_out.shape)}, counts {tuple(counts.shape)}, "
                         f"G_emb {tuple(G_emb.shape)}")
    for name, M in (("A_out", A_out), ("G_out", G_out), ("counts", counts), ("G_emb", G_emb)):
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"tied weight factor {name} contains NaN or inf")
    gamma = float(damping)
    p = tied_pi(A_out, G_out) if isinstance(pi, str) else float(pi)
    eye = lambda n: torch.eye(n, dtype=A_out.dtype, device=A_out.device)  # noqa: E731
    A = A_out + p * gamma if A_out.dim() == 1 else A_out + (p * gamma) * eye(d)
    B = G_out + gamma / p if G_out.dim() == 1 else G_out + (gamma / p) * eye(V)
    K1, s1 = _side(A, G_emb, "Ā_out + πγ I", backend)
    K2, s2 = _side(B, counts.clamp_min(0).to(B.dtype), "G_out + (γ/π) I", backend)
    return TiedSumInverse(K1=K1, K2=K2, s1=s1.clamp_min(0), s2=s2.clamp_min(0), pi=p)
