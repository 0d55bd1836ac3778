"""K-FAC, Algorithm 2 of Martens & Grosse (2015): orchestration only.

Per iteration k (``KFAC.step``):
  1. forward/backward on the mini-batch S' for h and ∇h (with the ℓ2 term η)          Sec 9
  2. forward + backward with targets sampled from the model on S₁ (|S₁| = τ₁|S'|)    Sec 5
  3. running factors Ā, G (and cross factors) with ε = min(1 − 1/k, ema_max)          Sec 5
  4. inverse refresh when k ≡ 0 (mod T3) or k ≤ 3, with factored Tikhonov damping γ   Sec 4, 6.3, 8
  5. proposal Δ = −F̆⁻¹∇h (or F̂⁻¹), for each γ candidate (every T2: γ, ω₂γ, γ/ω₂)    Sec 6.6
  6. δ = αΔ + µδ₀ minimising the exact-Fisher quadratic model M on S₂ (Appendix C)   Sec 6.4, 7
  7. λ by the Levenberg-Marquardt rule every T1 (one extra forward for ρ)             Sec 6.5
  8. θ ← θ + δ

``step`` runs these as phase methods: ``_gradient`` (1), ``_statistics`` (2-3), ``_refresh_if_due``
(4), ``_proposals`` (5, with ``_rescale`` (6) per γ candidate), ``_commit`` (7-8). The ``profile``
phases follow the task list of Sec 8 instead.

The curvature blocks own their factors and inverses; kernels know nothing of this class.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ._parts import default_factor_dtype, default_generator, model_device
from .checkpoint import READABLE_VERSIONS, STATE_VERSION
from .config import KFACConfig
from .batch import batch_size, buffers_kept, call, call_args, select
from .curvature.blocks import check_kfac_approx, check_unsupported, find_blocks
from .curvature.capture import capture, forward_order
from .curvature.inverses import build_block_inverse, inverse_state, load_inverse, resolve_factorization
from .curvature.losses import check_output, get_loss
from .curvature.running import RunningFactors, ema_decay, snapshot
from .curvature.statistics import NonFiniteOutputs, first_non_finite, sampled_statistics
from .quadratic import fisher_gram, inner, solve_alpha_mu
from .rules import NU_INIT, accept, gamma_candidates, levenberg_marquardt, rejection_increase

__all__ = ["KFAC", "StepRejected", "levenberg_marquardt"]


def _tensors_in(obj, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor reachable from obj through lists, tuples, dicts and attributes (depth ≤ 4)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 4 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for it in items for t in _tensors_in(it, depth + 1)]


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


class _Proposal(NamedTuple):
    """One γ candidate's outcome (Sec 6.6): M(δ) − M(0), γ, its inverse, Δ, α, µ and ‖δ‖²."""

    M: float
    gamma: float
    inv: Any
    Delta: list
    alpha: float
    mu: float
    norm2: float


class StepRejected(RuntimeError):
    """Raised after ``max_rejections`` consecutive rejected steps (non-finite loss or update, or
    ρ below ``rho_min``)."""


class KFAC:
    """The K-FAC optimizer (Algorithm 2) with re-scaling, momentum, λ and γ adaptation.

    Example::

        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", inverse="block_tridiagonal")
        for x, y in loader:
            stats = opt.step(x, y)   # does the forward/backward passes itself

    Args:
        model: any network: Linear (on (m, d) or (m, ..., d) inputs), Conv2d and Embedding layers
            get Kronecker blocks, BatchNorm/LayerNorm/GroupNorm/RMSNorm affine parameters
            per-channel 2×2 blocks, every other trainable parameter the ``unsupported`` policy.
            It returns the outputs z (m, ..., k) of one tensor.
        loss: ``"softmax_cross_entropy"`` (targets: class indices of z's shape without its last
            dim), ``"sigmoid_cross_entropy"`` (targets in [0, 1] of z's shape) or
            ``"squared_error"`` (targets of z's shape); the objective is the mean over the loss
            terms (every position but the last dim; non-ignored ones for softmax) of the
            negative log-likelihood plus η/2‖θ‖².
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for layers applied at R positions per
            example (sequences, convolutions; Eschenhagen et al. 2023).
        unsupported: ``"diagonal"`` (default: a diagonal Fisher block for every trainable
            parameter no Kronecker/norm block models, so no model is refused), ``"skip"`` (those
            parameters are not updated: train them with another optimizer) or ``"error"``.
        ignore_index: softmax targets equal to it are excluded from the objective, the factors,
            the sampled targets and the quadratic forms (default −100, as ``F.cross_entropy``).
        ignore_nan_targets: for ``sigmoid_cross_entropy``/``squared_error``: a loss term whose
            targets are all NaN is excluded the same way (padding of a sequence regression);
            off by default, so NaN targets stay an error.
        backend: ``"auto"|"torch"|"triton"|"native"`` for the kernels and eigendecompositions.
        generator: RNG for the subsets S₁, S₂ and the sampled targets (default: seeded from torch's
            global RNG, so ``torch.manual_seed`` makes runs reproducible).
        factor_dtype: dtype of factors and inverses (default float32, float64 for float64 models).
        config: a :class:`KFACConfig`; or pass its fields as keywords (``inverse=``, ``lambda_init=``,
            ``weight_decay=``, ``momentum=``, ``rescale=``, ``T1=``, ``T2=``, ``T3=``, ``tau1=``,
            ``tau2=``, ``ema_max=``, ...). ``KFACConfig.paper()`` gives the paper's values.
        profile: time the paper's tasks 1-8 (Sec 8) of every step into ``stats["phases"]``
            (synchronising CUDA around each phase: for benchmarks, not for training).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: str,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        factor_dtype: Optional[torch.dtype] = None,
        inverse_dtype: Optional[torch.dtype] = None,
        config: Optional[KFACConfig] = None,
        profile: bool = False,
        kfac_approx: str = "expand",
        unsupported: str = "diagonal",
        ignore_index: Optional[int] = -100,
        ignore_nan_targets: bool = False,
        **kwargs: Any,
    ):
        if config is not None and kwargs:
            raise TypeError("pass either config= or keyword hyper-parameters, not both")
        unknown = set(kwargs) - KFACConfig.field_names()
        if unknown:
            raise TypeError(f"unknown KFAC option(s): {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(sorted(KFACConfig.field_names()))}")
        self.config = config if config is not None else KFACConfig(**kwargs)
        if self.config.momentum and not self.config.rescale:
            raise ValueError("momentum=True needs rescale=True: α and µ come from the exact-Fisher model (Sec 7)")
        self.model = model
        self.loss = get_loss(loss, ignore_index=ignore_index, ignore_nan_targets=ignore_nan_targets)
        self.backend = backend
        self.kfac_approx = check_kfac_approx(kfac_approx)
        self.unsupported = check_unsupported(unsupported)
        self.layers = find_blocks(model, kfac_approx=kfac_approx, unsupported=unsupported)
        self.device = model_device(self.layers)
        self.factor_dtype = factor_dtype or default_factor_dtype(self.layers)
        self.inverse_dtype = inverse_dtype or self.factor_dtype
        for name, dt in (("factor_dtype", self.factor_dtype), ("inverse_dtype", self.inverse_dtype)):
            if dt not in (torch.float32, torch.float64):
                raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dt}")
        self.generator = generator if generator is not None else default_generator(self.device)
        cfg = self.config
        self.lambda_ = float(cfg.lambda_init)
        self.gamma = float(cfg.gamma_init) if cfg.gamma_init is not None else math.sqrt(cfg.lambda_init + cfg.weight_decay)
        self.k = 1
        self._terms_per_example = 1  # loss terms per example (P), updated by every gradient pass
        self._ordered = False
        self.factors: Optional[RunningFactors] = None
        self.inverse = None
        self.delta0: Optional[list[torch.Tensor]] = None
        self.rejections = 0
        self.total_rejections = 0
        self.nu = NU_INIT  # Nielsen's growth factor for λ after consecutive rejections (rules.py)
        # rho_batch="next": the last step, to be checked on the next batch (θ_k, M(δ_k), whether the LM rule is due)
        self._pending: Optional[dict] = None
        self.profile = profile
        self._phases: dict[str, float] = {}
        self.inverse_fallbacks = 0
        self._warned_fallback = False

    # ------------------------------------------------------------------ profiling
    # Phase names follow the paper's task list of Sec 8.
    PHASES = ("1-2 gradient", "3 sampled backward", "4 factor update", "5 inverse refresh", "6 precondition",
              "7 fisher quadratic", "8 rho forward")

    @contextlib.contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[nn.Parameter]:
        return [p for l in self.layers for p in l.params()]

    def _check_batch(self, inputs, targets: torch.Tensor) -> None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"KFAC.step(batch, targets): targets must be a tensor, got {type(targets).__name__}")
        m = batch_size(inputs, self.device)
        if m == 0:
            raise ValueError("empty batch: inputs has 0 rows")
        if targets.dim() == 0 or targets.shape[0] != m:
            raise ValueError(f"inputs has {m} rows but targets {tuple(targets.shape)[:1] or 'none (0-d)'}")
        if targets.device != self.device:
            raise ValueError(f"targets are on {targets.device} but the model is on {self.device}; move them with .to()")
        for tau_name in ("tau1", "tau2"):
            tau = getattr(self.config, tau_name)
            if int(round(tau * m)) < 1:
                raise ValueError(f"a batch of {m} rows leaves the {tau_name} subset empty ({tau_name}={tau:g}); "
                                 f"use at least {math.ceil(0.5 / tau)} rows or raise {tau_name}")
        for l in self.layers:
            for p in l.params():
                if not p.requires_grad:
                    raise ValueError(f"a parameter of {l.name} was frozen after KFAC was built; build a new KFAC "
                                     "for the new set of trainable parameters")

    def _ensure_state(self) -> None:
        if self.factors is None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.config.inverse == "block_tridiagonal")

    def _examples_for(self, terms: int) -> int:
        """Examples holding at least ``terms`` loss terms (P per example, from the last gradient pass)."""
        return -(-terms // self._terms_per_example) if terms > 0 else 0

    def _subset(self, m: int, frac: float, min_rows: int = 0) -> torch.Tensor:
        size = min(m, max(int(round(frac * m)), min_rows))
        return torch.randperm(m, generator=self.generator, device=self.device)[:size]

    def _objective(self, inputs, targets: torch.Tensor,
                   params: Optional[list[list[torch.Tensor]]] = None) -> float:
        """h = mean loss + ½η‖θ‖² at the model's θ, or at ``params`` (per-layer lists like
        :meth:`_params`) through ``torch.func.functional_call`` without touching the model.
        Module buffers are left as they were (an extra pass)."""
        with torch.no_grad(), buffers_kept(self.model):
            if params is None:
                z = call(self.model, inputs)
            else:
                flat = [t for ps in params for t in ps]
                names = self._param_names()
                args, kwargs = call_args(inputs)
                z = torch.func.functional_call(self.model, dict(zip(names, flat)), args, kwargs, strict=False)
            h = self.loss.mean(z, targets)
            h_val, l2 = torch.stack([h.detach().double(), self._l2(None if params is None else flat)]).tolist()
        return h_val + l2

    def _param_names(self) -> list[str]:
        ids = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        return [ids[id(p)] for p in self._params()]

    def _l2(self, params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """½η‖θ‖² as a 0-d float64 tensor on the device (no host sync, no float64 copy of θ)."""
        eta = self.config.weight_decay
        if eta == 0:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        sq = []
        for p in (self._params() if params is None else params):
            q = p.detach().reshape(-1)
            if q.dtype not in (torch.float32, torch.float64):
                q = q.float()
            sq.append(torch.dot(q, q).double())
        return 0.5 * eta * torch.stack(sq).sum()

    def _add(self, direction: list[torch.Tensor], scale: float = 1.0) -> None:
        with torch.no_grad():
            for layer, D in zip(self.layers, direction):
                for p, part in zip(layer.params(), layer.from_matrix(D)):
                    p.add_(part.to(p.dtype).reshape(p.shape), alpha=scale)
        # Under torch.autocast the low-precision copies of the weights are cached for the whole
        # autocast region; in-place updates do not invalidate them, so drop the cache.
        torch.clear_autocast_cache()

    def _restore(self, saved: list[list[torch.Tensor]]) -> None:
        with torch.no_grad():
            for layer, ps in zip(self.layers, saved):
                for p, s in zip(layer.params(), ps):
                    p.copy_(s)
        torch.clear_autocast_cache()

    def _raise_damping(self) -> None:
        """After a rejected step: λ (or γ without re-scaling) by Nielsen's rule (rules.py)."""
        cfg = self.config
        if cfg.rescale:
            self.lambda_, self.nu = rejection_increase(self.lambda_, self.nu, omega1=cfg.omega1, hi=cfg.lambda_max)
        else:
            g2, self.nu = rejection_increase(self.gamma ** 2, self.nu, omega1=cfg.omega1, hi=cfg.gamma_max ** 2)
            self.gamma = math.sqrt(g2)

    def _adapt(self, rho: float) -> None:
        """The Levenberg-Marquardt rule of Sec 6.5 on λ; without re-scaling there is no exact-Fisher
        model for λ to damp, so the same rule adapts γ² (ρ then compares with K-FAC's own model)."""
        cfg = self.config
        if cfg.rescale:
            self.lambda_ = levenberg_marquardt(self.lambda_, rho, cfg.omega1, lo=cfg.lambda_min, hi=cfg.lambda_max)
        else:
            g2 = levenberg_marquardt(self.gamma ** 2, rho, cfg.omega1, lo=cfg.gamma_min ** 2, hi=cfg.gamma_max ** 2)
            self.gamma = math.sqrt(g2)

    def _count_rejection(self, what: str, stats: dict) -> dict:
        self._raise_damping()
        self.rejections += 1
        self.total_rejections += 1
        stats.update(rejected=True, reason=what, lambda_=self.lambda_, gamma=self.gamma)
        if self.rejections >= self.config.max_rejections:
            raise StepRejected(f"{self.rejections} consecutive K-FAC steps rejected; last cause: {what}. "
                               "Check the data and the model for overflow, lower the learning problem's scale, or "
                               "raise lambda_init")
        return stats

    def _reject(self, what: str, stats: dict, saved: Optional[list[list[torch.Tensor]]] = None) -> dict:
        """A step that produced non-finite numbers: θ, statistics and k stay as they were."""
        if saved is not None:
            self._restore(saved)
        self._count_rejection(what, stats)
        warnings.warn(f"K-FAC step {self.k} rejected ({what}); λ raised to {self.lambda_:.3g}", RuntimeWarning)
        return stats

    # ------------------------------------------------------------------ Algorithm 2
    def step(self, inputs, targets: torch.Tensor) -> dict:
        """One iteration of Algorithm 2 on the mini-batch.

        Args:
            inputs: the batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or
                a dict (``model(**inputs)``); dim 0 of every tensor in it indexes the m examples
                (the subsets S₁, S₂ index it).
            targets: (m, ...) per the loss (see the class docstring).

        Returns:
            dict with ``loss`` (batch mean data loss at θ_k), ``objective`` (h incl. η/2‖θ‖²),
            ``lambda_``, ``gamma``, ``alpha``, ``mu``, ``M`` (M(δ) − M(0)), ``rho`` (every iteration
            with ``reject_steps``, else on λ-update iterations; None where not measured),
            ``refreshed``, ``rejected`` (with ``reason``), ``k``. A step rejected by ρ leaves θ
            as it was, keeps the new statistics (they were measured at θ) and drops δ₀.
        """
        self._check_batch(inputs, targets)
        self._ensure_state()
        stats: dict = {"k": self.k, "rho": None, "rejected": False, "refreshed": False}
        self._phases = {}
        # each phase returns None where the step ended early (a rejection already written to stats)
        grad = self._gradient(inputs, targets, stats)
        if grad is None:
            return stats
        V, h, rho_rows = grad
        if self._pending is not None:
            verdict = self._check_pending(inputs, targets, h, stats)
            if verdict is not None:
                return verdict
        if not self._statistics(inputs, targets, stats):
            return stats
        base = self._refresh_if_due(stats)
        best = self._proposals(inputs, targets, base, V)
        return self._commit(inputs, targets, h, best, stats, rho_rows)

    def _gradient(self, inputs, targets: torch.Tensor, stats: dict):
        """Step 1: h and ∇h on S' (with the ℓ2 term η, Sec 9) as per-layer blocks V_i.

        Orders the layers by the first forward pass. Returns (V, h, ρ rows), or None
        after rejecting a non-finite loss. ρ rows is None (ρ on the whole batch) or (indices of
        ``rho_rows`` rows, h on them at θ_k): their loss at θ_k comes from this pass for free.
        """
        params = self._params()
        with self._phase("1-2 gradient"), torch.enable_grad():
            if not self._ordered:
                with capture(self.layers, need_outputs=False) as rec:
                    z = call(self.model, inputs)
                self.layers = [self.layers[i] for i in forward_order(self.layers, rec)]
                params = self._params()
                self._ordered = True
                self.factors = None
                self._ensure_state()
            else:
                z = call(self.model, inputs)
            check_output(z, self.loss)
            self.loss.check_targets(z, targets)
            h_data = self.loss.mean(z, targets)
            grads = torch.autograd.grad(h_data, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            m = z.shape[0]
            # loss terms per example (P): the row minimums of S₂ and the ρ subset count terms
            self._terms_per_example = max(1, math.prod(z.shape[1:-1]))
            r = self._examples_for(self.config.rho_rows)
            idx_r = self._subset(m, 0.0, r) if 0 < r < m and self.config.rho_batch == "same" else None
            parts = [h_data.detach().double(), self._l2()]
            if idx_r is not None:
                zr = z.detach().index_select(0, idx_r)
                parts.append(self.loss.mean(zr, targets.index_select(0, idx_r)).double())
            # h, ½η‖θ‖² (and h on the ρ rows) reach the host together: the step's first sync
            vals = torch.stack(parts).tolist()
            h_val, l2_val = vals[0], vals[1]
        stats["loss"] = h_val
        if not math.isfinite(h_val):
            if self._pending is not None:  # the previous, unchecked step led here: undo it
                saved, self._pending, self.delta0 = self._pending["theta"], None, None
                self._reject("non-finite loss after the previous step (undone)", stats, saved=saved)
                return None
            self._reject("non-finite loss", stats)
            return None
        eta = self.config.weight_decay
        V, pos = [], 0
        for layer in self.layers:
            n = len(layer.params())
            Vi = layer.to_matrix(*grads[pos: pos + n]).to(self.inverse_dtype)
            if eta:
                Vi = Vi + eta * layer.param_matrix().detach().to(self.inverse_dtype)
            V.append(Vi)
            pos += n
        h = h_val + l2_val
        stats["objective"] = h
        rho_rows = None if idx_r is None else (idx_r, vals[2] + l2_val)
        return V, h, rho_rows

    def _statistics(self, inputs, targets: torch.Tensor, stats: dict) -> bool:
        """Steps 2-3: a backward pass on S₁ with targets sampled from the model (Sec 5; ignored
        terms stay ignored), then every block's running statistics with ε = min(1 − 1/k, ema_max)
        into the pending buffers. Returns False after rejecting non-finite statistics."""
        cfg = self.config
        idx1 = self._subset(batch_size(inputs), cfg.tau1)
        x1 = select(inputs, idx1)
        with self._phase("3 sampled backward"):
            try:
                batch_stats, _ = sampled_statistics(self.model, self.layers, x1, self.loss, fisher="mc",
                                                    targets=targets.index_select(0, idx1), generator=self.generator)
            except NonFiniteOutputs:
                self._reject("non-finite model outputs in the sampled-target pass", stats)
                return False
        bad = first_non_finite(self.layers, batch_stats)
        if bad is not None:
            self._reject(f"non-finite {bad} in the sampled-target pass", stats)
            return False
        eps = ema_decay(self.k, cfg.ema_max)
        with self._phase("4 factor update"):
            self.factors.update(batch_stats, eps=eps, backend=self.backend)
        return True

    def _refresh_if_due(self, stats: dict):
        """Step 4: a new inverse at the current γ when k ≡ 0 (mod T3) or k ≤ 3 (Sec 8), else the
        last one (at the current γ). Returns the inverse the γ candidates start from."""
        cfg, k = self.config, self.k
        refresh = (k % cfg.T3 == 0) or k <= 3 or self.inverse is None
        with self._phase("5 inverse refresh"):
            if refresh:
                base = self._refresh(self.gamma)
                stats["refreshed"] = base is not self.inverse
            else:
                base = self.inverse
                if abs(base.damping - self.gamma) > 0:
                    base = base.with_damping(self.gamma)
        return base

    def _proposals(self, inputs, targets: torch.Tensor, base, V: list[torch.Tensor]) -> "_Proposal":
        """Steps 5-6 per γ candidate (Sec 6.6: every T2 iterations γ, ω₂γ, γ/ω₂): the proposal
        Δ = −F̆⁻¹∇h (or F̂⁻¹∇h) and its re-scaling; returns the candidate with the lowest M."""
        cfg = self.config
        candidates = [self.gamma]
        # greedy γ (Sec 6.6) compares candidates by the exact-Fisher M; without re-scaling the only
        # model is K-FAC's own, whose predicted decrease always favours the smallest γ: off.
        if cfg.adapt_gamma and cfg.rescale and self.k % cfg.T2 == 0:
            candidates = gamma_candidates(self.gamma, cfg.omega2, lo=cfg.gamma_min, hi=cfg.gamma_max)
        idx2 = self._subset(batch_size(inputs), cfg.tau2, self._examples_for(cfg.tau2_min_rows))
        x2 = (select(inputs, idx2), targets.index_select(0, idx2))
        use_mom = cfg.momentum and self.delta0 is not None
        best = None
        for gamma in candidates:
            with self._phase("5 inverse refresh"):
                try:
                    inv = base if gamma == base.damping else base.with_damping(gamma)
                except ValueError:  # e.g. the tridiagonal Σ not positive definite at this γ: skip it
                    continue
            with self._phase("6 precondition"):
                Delta = [-u for u in inv.apply(V)]
            alpha, mu, M, norm2 = self._rescale(V, Delta, x2, use_mom)
            if best is None or (math.isfinite(M) and M < best[0]):
                best = _Proposal(M, gamma, inv, Delta, alpha, mu, norm2)
        return best

    def _rescale(self, V: list[torch.Tensor], Delta: list[torch.Tensor], x2: tuple,
                 use_mom: bool) -> tuple[float, float, float, float]:
        """Step 6: α (and µ with momentum, Sec 7) minimising the exact-Fisher model M on S₂
        (Sec 6.4, Appendix C). Returns (α, µ, M(δ) − M(0), ‖δ‖²) with δ = αΔ + µδ₀."""
        cfg = self.config
        dirs = [Delta] + ([self.delta0] if use_mom else [])
        n = len(dirs)
        if cfg.rescale:
            with self._phase("7 fisher quadratic"):
                gram = fisher_gram(self.model, self.layers, x2[0], self.loss, dirs, targets=x2[1])
                dots = [[None] * n for _ in range(n)]
                for a in range(n):
                    for c in range(a, n):
                        dots[a][c] = dots[c][a] = inner(dirs[a], dirs[c])
                dots = torch.stack([torch.stack(row) for row in dots])
                b = torch.stack([inner(V, d) for d in dirs])
                # Γ, the Euclidean products and ∇hᵀd reach the host in one transfer (one sync)
                host = torch.cat([gram.reshape(-1), dots.reshape(-1), b]).cpu()
            gram, dots, b = host[: n * n].view(n, n), host[n * n: 2 * n * n].view(n, n), host[2 * n * n:]
            sol = solve_alpha_mu(gram, dots, b, self.lambda_ + cfg.weight_decay, mu_max=cfg.mu_max)
            alpha, mu, M = sol.alpha, sol.mu, sol.M
            coef = torch.tensor([alpha, mu][:n], dtype=torch.float64)
            norm2 = float(coef @ dots @ coef)  # ‖αΔ + µδ₀‖², from the same numbers
        else:
            # no exact-Fisher model: δ = Δ and M is K-FAC's own prediction, ½∇hᵀΔ (exact for
            # the damped approximate model, as Δ minimises it)
            alpha, mu = 1.0, 0.0
            norm2, bD = torch.stack([inner(Delta, Delta), inner(V, Delta)]).tolist()
            M = 0.5 * bD
        return alpha, mu, M, norm2

    def _commit(self, inputs, targets: torch.Tensor, h: float,
                best: "_Proposal", stats: dict, rho_rows=None) -> dict:
        """Steps 7-8: θ ← θ + δ; ρ every iteration with reject_steps (else every T1,
        Sec 6.5) decides whether the step stays; the factors, the inverse and γ are committed
        either way (they were computed at θ_k, which a rejected step keeps)."""
        cfg, k = self.config, self.k
        M, gamma, inv, Delta, alpha, mu, norm2 = best
        delta = [alpha * d for d in Delta]
        if mu != 0.0:
            delta = [d + mu * d0 for d, d0 in zip(delta, self.delta0)]
        # ‖δ‖² is finite iff δ is (an overflowing square is rejected too: conservative)
        if not math.isfinite(norm2):
            bad = next((l.name for l, d in zip(self.layers, delta) if not bool(torch.isfinite(d).all())), "?")
            return self._reject(f"non-finite update δ in layer {bad}", stats)

        # 7-8. θ ← θ + δ; ρ every iteration with reject_steps (else every T1); λ by LM every T1
        lm_due = cfg.adapt_lambda and k % cfg.T1 == 0
        wants_rho = (cfg.reject_steps or lm_due) and math.isfinite(M) and M < 0
        held_out = wants_rho and cfg.rho_batch == "next"
        measure = wants_rho and not held_out
        # θ is saved only where the ρ forward (now or on the next batch) may reject the step
        theta = [[p.detach().clone() for p in l.params()] for l in self.layers] if wants_rho else None
        self._add(delta)
        self.gamma = gamma  # before the rules: without re-scaling the LM rule adapts γ itself
        rejected = None
        if measure:
            with self._phase("8 rho forward"):
                if rho_rows is None:
                    h_new = self._objective(inputs, targets)
                else:  # ρ on a random subset of rho_rows rows (an unbiased estimate of the batch's)
                    idx_r, h = rho_rows
                    h_new = self._objective(select(inputs, idx_r), targets.index_select(0, idx_r))
            rho = (h_new - h) / M if math.isfinite(h_new) else float("nan")
            stats["rho"] = rho
            if cfg.reject_steps and not accept(rho, rho_min=cfg.rho_min):
                rejected = f"ρ = {rho:.3g} < {cfg.rho_min:g} (objective {h:.6g} -> {h_new:.6g})"
            elif not math.isfinite(h_new):
                return self._reject("non-finite loss after the update", stats, saved=theta)
            elif lm_due:
                self._adapt(rho)
        # the statistics, the inverse and γ were computed at θ_k, which a rejected step keeps
        self.factors.commit()
        self.inverse = inv
        self.k += 1
        if rejected is not None:
            self._restore(theta)
            self.delta0 = None  # momentum restarts from the kept θ (Sec 7's δ₀ led to the bad step)
            self._count_rejection(rejected, stats)
        else:
            self.delta0 = [d.detach() for d in delta]
            if held_out:
                self._pending = {"theta": theta, "M": M, "lm_due": lm_due}
            else:
                self.rejections = 0
                self.nu = NU_INIT
        stats.update(lambda_=self.lambda_, gamma=self.gamma, alpha=alpha, mu=mu, M=M,
                     inverse_fallbacks=self.inverse_fallbacks)
        if self.profile:
            stats["phases"] = dict(self._phases)
        return stats

    def _check_pending(self, inputs, targets: torch.Tensor, h_new: float, stats: dict):
        """rho_batch="next": ρ of the previous step δ_k on this batch, a sample the step was not
        fitted to: (h_B(θ_k + δ_k) − h_B(θ_k)) / M(δ_k). h_B(θ_k + δ_k) is this step's objective;
        h_B(θ_k) costs one forward pass with the saved θ_k (``torch.func.functional_call``).
        Returns the stats of a rejection (θ ← θ_k, nothing else done this call) or None."""
        cfg, pend = self.config, self._pending
        self._pending = None
        with self._phase("8 rho forward"):
            h_old = self._objective(inputs, targets, params=pend["theta"])
        rho = (h_new - h_old) / pend["M"] if math.isfinite(h_old) else float("nan")
        stats["rho"] = rho
        if cfg.reject_steps and not accept(rho, rho_min=cfg.rho_min):
            self._restore(pend["theta"])
            self.delta0 = None
            return self._count_rejection(f"the previous step: held-out ρ = {rho:.3g} < {cfg.rho_min:g} "
                                         f"(objective on this batch {h_old:.6g} -> {h_new:.6g}); θ restored", stats)
        self.rejections = 0
        self.nu = NU_INIT
        if pend["lm_due"]:
            self._adapt(rho)
        return None

    def _refresh(self, gamma: float):
        """New approximate inverse from the pending factors (Sec 4 + 6.3), with fallbacks.

        Factors whose eigendecomposition fails even in float64 keep the last good one; an
        inverse that cannot be built at all (e.g. Σ_(i|i+1) not positive definite) is replaced by
        the previous inverse. Both are counted in ``stats["inverse_fallbacks"]`` and warned once.
        """
        facs = snapshot(self.factors.pending, dtype=self.inverse_dtype)
        try:
            inv = build_block_inverse(self.config.inverse, facs, damping=gamma, backend=self.backend,
                                warm_start=self.inverse,
                                factorization=resolve_factorization(self.config.factorization, self.config.inverse,
                                                                    self.backend))
            failures = list(inv.fallbacks)
        except ValueError as exc:
            if self.inverse is None:
                raise
            inv, failures = self.inverse, [f"whole inverse ({exc})"]
        if failures:
            self.inverse_fallbacks += len(failures)
            if not self._warned_fallback:
                warnings.warn(f"K-FAC kept the last good inverse for: {'; '.join(failures)} (iteration {self.k}); "
                              "further fallbacks are counted in stats['inverse_fallbacks']", RuntimeWarning)
                self._warned_fallback = True
        return inv

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, int]:
        """Bytes of K-FAC state by kind, each storage counted once (views share storage).

        ``factors``: the running Ā, G (and cross factors) in two buffers (current and pending,
        so a rejected step leaves the current ones untouched); ``inverse``: the damped inverses,
        eigenbases or Appendix B matrices plus the factor snapshot they were built from;
        ``delta0``: the previous update δ₀ (Sec 7); ``params``: the model's K-FAC parameters,
        for scale. Nothing else persists between steps.
        """
        return {
            "factors": _storage_bytes([] if self.factors is None else self.factors.tensors()),
            "inverse": _storage_bytes(_tensors_in(self.inverse)),
            "delta0": _storage_bytes(self.delta0 or []),
            "params": _storage_bytes(self._params()),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the same trajectory (with the model's own state_dict)."""
        return {
            "version": STATE_VERSION,
            "kind": "KFAC",
            "config": self.config.to_dict(),
            "layers": [l.name for l in self.layers],
            "shapes": [(l.g_dim, l.a_dim) for l in self.layers],
            "ordered": self._ordered,
            "k": self.k,
            "lambda_": self.lambda_,
            "gamma": self.gamma,
            "delta0": None if self.delta0 is None else [d.clone() for d in self.delta0],
            "factors": None if self.factors is None else self.factors.state(),
            "inverse": inverse_state(self.inverse),
            "generator": self.generator.get_state(),
            "rejections": self.rejections,
            "total_rejections": self.total_rejections,
            "nu": self.nu,
            "pending": None if self._pending is None else {
                "theta": [[t.clone() for t in ps] for ps in self._pending["theta"]],
                "M": self._pending["M"], "lm_due": self._pending["lm_due"]},
            "inverse_fallbacks": self.inverse_fallbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. Raises ValueError for another model or format."""
        if state.get("kind") != "KFAC" or state.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a KFAC state_dict of a readable version {READABLE_VERSIONS} "
                             f"(got kind={state.get('kind')!r}, version={state.get('version')!r})")
        by_name = {l.name: l for l in self.layers}
        if sorted(by_name) != sorted(state["layers"]):
            raise ValueError(f"state_dict is from a different model: layers {state['layers']} vs {sorted(by_name)}")
        layers = [by_name[n] for n in state["layers"]]
        for l, shp in zip(layers, state["shapes"]):
            if (l.g_dim, l.a_dim) != tuple(shp):
                raise ValueError(f"state_dict is from a different model: layer {l.name} has shape {tuple(shp)} "
                                 f"there, ({l.g_dim}, {l.a_dim}) here")
        cfg = dict(state["config"])
        if state["version"] < 3:  # written before step rejection existed: resume as it ran
            cfg.setdefault("reject_steps", False)
        self.config = KFACConfig(**cfg)
        self.layers = layers
        self._ordered = state["ordered"]
        self.factors = None
        self._ensure_state()
        if state["factors"] is not None:
            self.factors.load(state["factors"])
        self.inverse = load_inverse(self.config.inverse, state["inverse"], self.factors.current, self.backend)
        self.k = int(state["k"])
        self.lambda_ = float(state["lambda_"])
        self.gamma = float(state["gamma"])
        self.delta0 = None if state["delta0"] is None else [d.to(self.device, self.inverse_dtype)
                                                            for d in state["delta0"]]
        self.generator.set_state(state["generator"])
        self.rejections = int(state["rejections"])
        self.total_rejections = int(state["total_rejections"])
        self.nu = float(state.get("nu", NU_INIT))
        pend = state.get("pending")
        self._pending = None if pend is None else {
            "theta": [[t.to(self.device) for t in ps] for ps in pend["theta"]], "M": float(pend["M"]),
            "lm_due": bool(pend["lm_due"])}
        self.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
