"""Keyword-only, validated configuration of the K-FAC optimizer (paper Sec 6-9, 13)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .curvature.factors import DEFAULT_MAX_BLOCK_DIM, check_max_block_dim
from .curvature.inverse_kinds import INVERSE_KINDS

RHO_LOW_BOUND = 0.25  # rho_min < 1/4, the LM rule's lower threshold (Sec 6.5)
RHO_BATCHES = ("same", "next")
INVERSES = tuple(INVERSE_KINDS)
FACTORIZATIONS = ("auto", "eigh", "cholesky")


def check_factorization(factorization: str, inverse: str) -> None:
    """Validate a ``factorization`` choice for an ``inverse`` kind (KFAC and KFACPreconditioner)."""
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"unknown factorization {factorization!r}; choose one of {', '.join(FACTORIZATIONS)}")
    if factorization == "cholesky" and inverse == "block_tridiagonal":
        raise ValueError("the block-tridiagonal inverse needs eigendecompositions (Appendix B): use "
                         "factorization='auto' or 'eigh'")


@dataclass(frozen=True, kw_only=True)
class KFACConfig:
    """Hyper-parameters of Algorithm 2. Names and defaults follow the paper except ``lambda_init``.

    Attributes:
        inverse: ``"block_diagonal"`` (Sec 4.2) or ``"block_tridiagonal"`` (Sec 4.3).
        factorization: how the block-diagonal inverse gets its damped factor inverses:
            ``"cholesky"`` (one Cholesky factorisation per factor and γ), ``"eigh"`` (one
            eigendecomposition per factor and refresh, needed by the native eigensolver) or
            ``"auto"``: Cholesky for ``block_diagonal`` unless ``backend="native"``. The
            tridiagonal inverse always uses eigendecompositions (Appendix B).
        max_block_dim: the largest Kronecker factor (Ā or G) kept dense; a larger one is kept
            as its diagonal, the block staying a Kronecker product (diag ⊗ dense) and a
            block-diagonal entry also with ``inverse="block_tridiagonal"``. Default
            :data:`~kfac_fast.curvature.factors.DEFAULT_MAX_BLOCK_DIM` (4096: an LM head's
            vocabulary-sized G, a 3×3×512-input convolution's Ā); None: no bound (every
            factor dense, O(n²) memory and O(n³) refresh per factor).
        lambda_init: initial λ (Sec 6.5). The paper used 150 on its autoencoders; with our
            measured default budget 1.0 leaves the initial plateau far sooner (see README).
            ``KFACConfig.paper()`` restores 150.
        weight_decay: η, the ℓ2 coefficient added to the objective (h + η/2‖θ‖²).
        momentum: joint α, µ re-scaling with the previous update δ₀ (Sec 7).
        mu_max: bound on |µ| in the joint (α, µ) solve (Sec 7): the constrained minimiser of M
            (µ clipped, α re-solved). Default 1, the heavy-ball stability range (Polyak 1964):
            on small batches the 2×2 solve returned µ from −11 to +29 and such steps blew up
            (docs/robust-adaptation.md). ``math.inf`` is the paper's unconstrained solve.
        rescale: re-scale Δ by the exact-Fisher quadratic model (Sec 6.4); off means δ = −Δ·1.
        T1: λ update period (Sec 6.5); ω₁ = (19/20)^T1. Default 1 (the paper: 5): with
            ``reject_steps`` ρ is measured every iteration anyway, so the rule uses every ρ at
            the same per-iteration rate (19/20).
        T2: γ update period (Sec 6.6); must be a multiple of T3; ω₂ = sqrt(19/20)^T2.
        T3: inverse refresh period (Sec 8); also refreshed at k ≤ 3.
        Tq: exact-Fisher check period. On iterations k ≡ 0 (mod Tq), on γ-candidate iterations
            (every T2) and on the first step (and the first with δ₀), the quadratic forms
            Γ = [Δ, δ₀]ᵀF[Δ, δ₀] of M are measured on S₂ (Sec 6.4, 7, Appendix C: linearized
            passes costing about a forward and a backward on S₂). On the iterations between,
            Γ is predicted from the last check's curvature quotients, Γ_ab ≈
            q_ab‖d_a‖‖d_b‖ with q_ab = Γ_ab/(‖d_a‖‖d_b‖) then: the same 2×2 solve for α, µ
            and the same M for ρ and the λ rule, on inner products only (so a λ raised by a
            rejection still shortens the next step). 1 is the paper (every iteration).
        tau1: fraction of the batch for the factor statistics (Sec 8); at least one example
            (a batch of 1-7 examples at τ₁ = 1/8 uses one).
        tau2: fraction of the batch for the exact-Fisher quadratic forms (Sec 8); at least one
            example and ``tau2_min_rows``.
        tau2_min_rows: S₂ has at least this many rows (or the whole batch). The quadratic
            model's curvature ΔᵀFΔ is estimated from S₂; on a few rows it misses most of the
            curvature the step meets and α, µ come out far too large (measured in
            benchmarks/suite.py; docs/robust-adaptation.md). The paper has no minimum (0).
            Counted in loss terms: with P terms per example (a sequence model's tokens) S₂
            needs ceil(tau2_min_rows / P) examples.
        ema_max: ε = min(1 − 1/k, ema_max) for the factor running averages (Sec 5).
        gamma_init: initial γ; None means sqrt(λ + η) (Algorithm 2).
        adapt_lambda, adapt_gamma: turn the λ / γ rules off (for ablations).
        lambda_min, lambda_max, gamma_min, gamma_max: clamps keeping the rules finite.
        max_rejections: consecutive rejected steps (non-finite loss/update, or ρ below
            ``rho_min``) before raising :class:`~kfac_fast.optimizer.StepRejected`.
        reject_steps: measure ρ every iteration (one forward pass on the batch) and reject a
            step with ρ < ``rho_min``: θ and the running statistics stay as before the step,
            δ₀ (momentum) is dropped and λ grows by Nielsen's rule (see :mod:`kfac_fast.rules`).
            Not in the paper (``paper()`` turns it off); kfac-jax has an optional rejection.
        rho_rows: the ρ forward pass (``rho_batch="same"``) runs on a random subset of this many
            rows of the batch (the whole batch when it has no more; 0: always the whole batch,
            the paper). The change of h on the subset, over M(δ) of the batch, estimates the
            batch's ρ without bias at a fraction of the cost (1/4 on the demo's batch of 1000).
            Counted in loss terms, as ``tau2_min_rows``.
        rho_batch: where ρ is measured. ``"same"`` (the paper, Sec 6.5): on the mini-batch the
            step was fitted to, one extra forward pass right after the step. ``"next"``: on the
            next call's batch, which the step was not fitted to (an unbiased sample of the
            full-data change): one forward pass at the saved θ_k; a rejected step is undone
            at the start of the next call, so the latest step is provisional until then.
        rho_min: the acceptance threshold on ρ (≥ 0: a step that raised the objective is never
            kept).
    """

    inverse: str = "block_diagonal"
    factorization: str = "auto"
    max_block_dim: Optional[int] = DEFAULT_MAX_BLOCK_DIM
    lambda_init: float = 1.0
    weight_decay: float = 1e-5
    momentum: bool = True
    mu_max: float = 1.0
    rescale: bool = True
    T1: int = 1
    T2: int = 20
    T3: int = 20
    Tq: int = 1
    tau1: float = 1.0 / 8
    tau2: float = 1.0 / 4
    tau2_min_rows: int = 256
    ema_max: float = 0.95
    gamma_init: Optional[float] = None
    adapt_lambda: bool = True
    adapt_gamma: bool = True
    lambda_min: float = 1e-8
    lambda_max: float = 1e8
    gamma_min: float = 1e-8
    gamma_max: float = 1e8
    max_rejections: int = 10
    reject_steps: bool = True
    rho_min: float = 0.0
    rho_batch: str = "same"
    rho_rows: int = 256

    def __post_init__(self):
        if self.inverse not in INVERSES:
            raise ValueError(f"unknown inverse {self.inverse!r}; choose one of {', '.join(INVERSES)}")
        check_factorization(self.factorization, self.inverse)
        check_max_block_dim(self.max_block_dim)
        for name in ("lambda_init", "lambda_min", "lambda_max", "gamma_min", "gamma_max"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.rho_rows, int) or self.rho_rows < 0:
            raise ValueError(f"rho_rows must be a non-negative integer, got {self.rho_rows!r}")
        if not isinstance(self.tau2_min_rows, int) or self.tau2_min_rows < 0:
            raise ValueError(f"tau2_min_rows must be a non-negative integer, got {self.tau2_min_rows!r}")
        for name in ("T1", "T2", "T3", "Tq", "max_rejections"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.T2 % self.T3 != 0:
            raise ValueError(f"T2 ({self.T2}) must be a multiple of T3 ({self.T3}) (Sec 6.6): γ candidates need "
                             "a fresh inverse")
        for name in ("tau1", "tau2"):
            v = getattr(self, name)
            if not (0 < v <= 1):
                raise ValueError(f"{name} must lie in (0, 1], got {v}")
        if not (0 <= self.ema_max < 1):
            raise ValueError(f"ema_max must lie in [0, 1), got {self.ema_max}")
        if self.rho_batch not in RHO_BATCHES:
            raise ValueError(f"unknown rho_batch {self.rho_batch!r}; choose one of {', '.join(RHO_BATCHES)}")
        if not (self.mu_max > 0):
            raise ValueError(f"mu_max must be > 0 (math.inf for the paper's unconstrained solve), got {self.mu_max}")
        if not (0 <= self.rho_min < RHO_LOW_BOUND):
            raise ValueError(f"rho_min must lie in [0, 1/4), got {self.rho_min}")
        if self.gamma_init is not None and not (self.gamma_init > 0 and math.isfinite(self.gamma_init)):
            raise ValueError(f"gamma_init must be a positive finite number, got {self.gamma_init}")

    @property
    def omega1(self) -> float:
        return (19.0 / 20.0) ** self.T1

    @property
    def omega2(self) -> float:
        return math.sqrt(19.0 / 20.0) ** self.T2

    @classmethod
    def paper(cls, **overrides) -> "KFACConfig":
        """The paper's settings for its autoencoder experiments (Sec 6.5, 6.6, 8, 13)."""
        base = dict(lambda_init=150.0, weight_decay=1e-5, T1=5, T2=20, T3=20, tau1=1 / 8, tau2=1 / 4, ema_max=0.95,
                    reject_steps=False, tau2_min_rows=0, Tq=1, mu_max=math.inf, rho_batch="same", rho_rows=0,
                    lambda_min=1e-8, gamma_min=1e-8, max_block_dim=None)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}
