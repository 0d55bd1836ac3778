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
import functools
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
from .curvature.statistics import finite_flags, sampled_statistics
from .quadratic import fisher_gram, inner, solve_alpha_mu_t
from .rules import (NU_INIT, accept, gamma_candidates, levenberg_marquardt, levenberg_marquardt_t, rejection_increase,
                    rejection_increase_t, REJECT_CODES, step_decision)
from .curvature.compute_dtype import ComputeDtype, resolve_compute_dtype
from .distributed import MODES, ShardedInverse, common_seed, default_distributor, rank_generator, unwrap_model
from .step_state import AdaptState, StepStats

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


DISTRIBUTED_MODES = MODES + ("replicated_work",)


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
        compute_dtype: the dtype the curvature products read their operands in (factor
            accumulation, preconditioning, the tridiagonal and Appendix B products), always
            accumulating in fp32: ``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or
            ``"tf32"`` (CUDA). Default: the factor dtype. Factors and inverses stay in
            ``factor_dtype``; the exact-Fisher tangents stay in the model's dtype. See
            :mod:`kfac_fast.curvature.compute_dtype` and README "Precision" for the measured error.
        compile: run the step's scalar decisions (:func:`kfac_fast.rules.step_decision`) under
            ``torch.compile(fullgraph=True)``, one variant per schedule case. The model passes
            (gradient, sampled backward, linearized forward) stay eager: see README "Fast step".
        process_group, distributor: data parallelism (issue 15). When ``torch.distributed`` is
            initialised every rank steps on its own shard of the batch; the gradient, the pending
            factors (one flat all-reduce of upper triangles), the Fisher Gram matrix on S₂ and the
            objectives are averaged over the ranks (``process_group``, default the whole world),
            so every rank takes the same decisions and the parameters stay identical. A model
            wrapped in ``DistributedDataParallel`` is unwrapped (K-FAC reduces the gradient
            itself). ``distributor``: a :class:`kfac_fast.distributed.Distributor` instead.
            The default generator is then one stream per rank from a common seed.
        distributed_mode: how the inverse refresh is shared out over the ranks:
            ``"replicate_inverses"`` (default: each block built by its owner, greedy LPT on n³,
            and broadcast; every rank preconditions every block), ``"shard_inverses"`` (owners
            keep their blocks and precondition them, the directions are all-gathered every
            iteration: least memory) or ``"replicated_work"`` (every rank builds everything:
            no inverse traffic). The γ candidates of Sec 6.6 are re-damped by the owners. The
            block-tridiagonal inverse is built whole on every rank in every mode.
        validate: check the targets (range, classes, NaN policy) on every step. Off by default:
            they are checked on refresh iterations (k ≤ 3 and every T3), where the step reads the
            device anyway, so ordinary iterations stay free of host syncs.

    Host syncs: an ordinary iteration (not a refresh, default ``rho_batch="same"`` and
    ``rescale=True``) reads nothing from the device: λ, ν, α, µ, ρ, the finite checks, the
    rejection and the LM rule are device tensors and ``torch.where`` selections (a rejected step
    selects the old θ, factors and δ₀). The host reads the device on refresh iterations (the
    inverse, the γ candidates of Sec 6.6, the target checks), once every ``max_rejections``
    iterations at most to count consecutive rejections, every iteration with
    ``rho_batch="next"`` or ``rescale=False`` (γ is then adapted on the host), with
    ``profile=True``, and when you read the returned stats (one transfer for all of them).
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
        validate: bool = False,
        compute_dtype: ComputeDtype = None,
        compile: bool = False,
        distributor=None,
        process_group=None,
        distributed_mode: str = "replicate_inverses",
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
        # data parallelism (issue 15): a DistributedDataParallel wrapper is bypassed (K-FAC takes
        # its gradient with autograd.grad, which DDP's hooks do not see, and averages it itself)
        self.dist = distributor if distributor is not None else default_distributor(process_group)
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"unknown distributed_mode {distributed_mode!r}; choose one of "
                             f"{', '.join(DISTRIBUTED_MODES)}")
        self.distributed_mode = distributed_mode
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before each forward; K-FAC does
        # the same before its gradient pass when the model came wrapped with broadcast_buffers
        self._broadcast_buffers = isinstance(model, DistributedDataParallel) and bool(
            getattr(model, "broadcast_buffers", True))
        model = unwrap_model(model)
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
        if generator is None and self.dist.world_size > 1:
            # one stream per rank from a seed rank 0 draws (S₁, S₂ and the sampled targets differ)
            generator = rank_generator(common_seed(self.dist), self.dist.rank, self.device)
        elif generator is None:
            generator = default_generator(self.device)
        self.generator = generator
        self.compute_dtype = resolve_compute_dtype(compute_dtype, factor_dtype=self.factor_dtype, device=self.device)
        cfg = self.config
        # λ, ν, the rejection counters and the δ₀ flag live on the device (step_state.py); γ on
        # the host: it changes only on refresh iterations (Sec 6.6), or by the LM rule without
        # re-scaling, where the inverse is rebuilt anyway
        self._st = AdaptState(lam=cfg.lambda_init, nu=NU_INIT, device=self.device)
        self.gamma = float(cfg.gamma_init) if cfg.gamma_init is not None else math.sqrt(cfg.lambda_init + cfg.weight_decay)
        self.validate = bool(validate)
        self.compile = bool(compile)
        self._decisions: dict = {}
        self.k = 1
        self._terms_per_example = 1  # loss terms per example (P), updated by every gradient pass
        self._ordered = False
        self.factors: Optional[RunningFactors] = None
        self.inverse = None
        self._delta0: Optional[list[torch.Tensor]] = None  # δ₀ (zeros after a rejection: see has_delta0)
        # an upper bound on the consecutive rejections the host has not read: the device count is
        # read (one transfer) only when the bound reaches max_rejections, or on refresh iterations
        self._unread_bound = 0
        self._last_stats: Optional[StepStats] = None
        self._reuse = None  # (outputs, recording) of a gradient pass whose graph the statistics reuse
        # rho_batch="next": the last step, to be checked on the next batch (θ_k, M(δ_k), whether the LM rule is due)
        self._pending: Optional[dict] = None
        self.profile = profile
        self._phases: dict[str, float] = {}
        self.inverse_fallbacks = 0
        self._warned_fallback = False

    # ------------------------------------------------------------------ device state, host view
    # Reading these waits for the device (one transfer); the step itself never does.
    @property
    def lambda_(self) -> float:
        """λ (Sec 6.5)."""
        return float(self._st.lam)

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        self._st.set("lam", float(value))

    @property
    def nu(self) -> float:
        """Nielsen's growth factor for λ after consecutive rejections (:mod:`kfac_fast.rules`)."""
        return float(self._st.nu)

    @nu.setter
    def nu(self, value: float) -> None:
        self._st.set("nu", float(value))

    @property
    def rejections(self) -> int:
        """Consecutive rejected steps."""
        return int(self._st.rejections)

    @rejections.setter
    def rejections(self, value: int) -> None:
        self._st.set("rejections", int(value))
        self._unread_bound = int(value)

    @property
    def total_rejections(self) -> int:
        return int(self._st.total_rejections)

    @property
    def delta0(self) -> Optional[list[torch.Tensor]]:
        """δ₀, the previous update (Sec 7), or None before the first step and after a rejection."""
        if self._delta0 is None or not bool(self._st.has_delta0):
            return None
        return self._delta0

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
                                          tridiagonal=self.config.inverse == "block_tridiagonal",
                                          compute_dtype=self.compute_dtype)

    def _examples_for(self, terms: int) -> int:
        """Examples holding at least ``terms`` loss terms (P per example, from the last gradient pass)."""
        return -(-terms // self._terms_per_example) if terms > 0 else 0

    def _subset(self, m: int, frac: float, min_rows: int = 0) -> torch.Tensor:
        size = min(m, max(int(round(frac * m)), min_rows))
        return torch.randperm(m, generator=self.generator, device=self.device)[:size]

    def _objective(self, inputs, targets: torch.Tensor,
                   params: Optional[list[list[torch.Tensor]]] = None) -> torch.Tensor:
        """h = mean loss + ½η‖θ‖² at the model's θ, or at ``params`` (per-layer lists like
        :meth:`_params`) through ``torch.func.functional_call`` without touching the model, as a
        0-d float64 device tensor (no host sync). Module buffers are left as they were."""
        with torch.no_grad(), buffers_kept(self.model):
            if params is None:
                z = call(self.model, inputs)
            else:
                flat = [t for ps in params for t in ps]
                names = self._param_names()
                args, kwargs = call_args(inputs)
                z = torch.func.functional_call(self.model, dict(zip(names, flat)), args, kwargs, strict=False)
            h = self.loss.mean(z, targets)
            return h.detach().double() + self._l2(None if params is None else flat)

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

    # ------------------------------------------------------------------ rejections

    def _host_rejection(self, what: str, stats: StepStats, saved: Optional[list[list[torch.Tensor]]] = None,
                        warn: bool = True) -> StepStats:
        """A rejection the host decided (``rho_batch="next"``, ``rescale=False``): θ restored from
        ``saved`` where given, δ₀ dropped, λ (or γ without re-scaling) raised by Nielsen's rule."""
        if saved is not None:
            self._restore(saved)
        cfg, st = self.config, self._st
        if cfg.rescale:
            st.lam, st.nu = rejection_increase_t(st.lam, st.nu, omega1=cfg.omega1, hi=cfg.lambda_max)
        else:
            self._host_rules_after_reject(stats)
        st.rejections += 1
        st.total_rejections += 1
        st.has_delta0.fill_(False)
        stats.update(rejected=True, reason=what, lambda_=st.lam.clone(), gamma=self.gamma)
        if warn:
            warnings.warn(f"K-FAC step {stats['k']} rejected ({what}); λ raised to {self.lambda_:.3g}", RuntimeWarning)
        self._check_rejections(what, force=True)
        return stats

    def _check_rejections(self, last: Optional[str] = None, *, force: bool = False) -> None:
        """Read the consecutive rejections (one transfer) when they could have reached
        ``max_rejections``, or with ``force``; warn about unreported non-finite rejections and
        raise :class:`StepRejected` at the limit."""
        self._unread_bound += 0 if force else 1
        if not force and self._unread_bound < self.config.max_rejections:
            return
        st = self._st
        rej, unrep = torch.stack([st.rejections, st.unreported]).tolist()
        self._unread_bound = rej
        if last is None and self._last_stats is not None and rej:
            last = self._last_stats.get("reason")
        if unrep:
            st.unreported.zero_()
            if not force:
                warnings.warn(f"K-FAC rejected {unrep} step(s) for non-finite numbers up to iteration {self.k - 1} "
                              f"(last cause: {last}); λ is now {self.lambda_:.3g}", RuntimeWarning)
        if rej >= self.config.max_rejections:
            raise StepRejected(f"{rej} consecutive K-FAC steps rejected; last cause: {last}. "
                               "Check the data and the model for overflow, lower the learning problem's scale, or "
                               "raise lambda_init")

    # ------------------------------------------------------------------ Algorithm 2
    def step(self, inputs, targets: torch.Tensor) -> StepStats:
        """One iteration of Algorithm 2 on the mini-batch.

        Args:
            inputs: the batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or
                a dict (``model(**inputs)``); dim 0 of every tensor in it indexes the m examples
                (the subsets S₁, S₂ index it).
            targets: (m, ...) per the loss (see the class docstring).

        Returns:
            a :class:`~kfac_fast.step_state.StepStats` mapping (read like a dict; its device
            values reach the host together on the first read) with ``loss`` (batch mean data
            loss at θ_k), ``objective`` (h incl. η/2‖θ‖²), ``lambda_``, ``gamma``, ``alpha``,
            ``mu``, ``M`` (M(δ) − M(0)), ``rho`` (every iteration with ``reject_steps``, else on
            λ-update iterations; None where not measured, NaN where M(δ) ≥ 0 left it undefined),
            ``refreshed``, ``rejected`` (with ``reason``), ``k``. A step rejected by ρ leaves θ
            as it was, keeps the new statistics (they were measured at θ) and drops δ₀; a step
            with non-finite loss or statistics keeps neither. k counts every call that got past
            the input checks.
        """
        self._check_batch(inputs, targets)
        self._ensure_state()
        k = self.k
        cfg = self.config
        refresh = (k % cfg.T3 == 0) or k <= 3 or self.inverse is None
        stats = StepStats(k=k, rho=None, rejected=False, refreshed=False)
        self._phases = {}
        V, h, h_data, rho_rows = self._gradient(inputs, targets, validate=self.validate or refresh)
        stats.update(loss=h_data, objective=h)
        if self._pending is not None:  # rho_batch="next": the previous step, judged on this batch
            verdict = self._check_pending(inputs, targets, h, stats)
            if verdict is not None:
                self._reuse = None  # release the gradient pass's graph
                return verdict
        batch_stats, valid, flags, names = self._statistics(inputs, targets, h)
        if refresh:  # the new inverse is built from the pending factors, so they come first
            self._update_factors(batch_stats, valid)
        base = self._refresh_if_due(stats, refresh)
        best = self._proposals(inputs, targets, base, V)
        return self._commit(inputs, targets, h, best, stats, rho_rows, valid, (flags, names), refresh,
                            None if refresh else batch_stats)

    def _gradient(self, inputs, targets: torch.Tensor, *, validate: bool):
        """Step 1: h and ∇h on S' (with the ℓ2 term η, Sec 9) as per-layer blocks V_i.

        Orders the layers by the first forward pass. Returns (V, h, data loss, ρ rows), h as
        0-d float64 device tensors (no host sync; a non-finite h is caught in ``_commit``).
        ρ rows is None (ρ on the whole batch) or (indices of ``rho_rows`` rows, h on them at
        θ_k): their loss at θ_k comes from this pass for free.
        """
        params = self._params()
        if self._broadcast_buffers and self.dist.world_size > 1:
            bufs = list(self.model.buffers())
            if bufs:
                self.dist.broadcast_from_owners([bufs], [0], kind="buffers")
        with self._phase("1-2 gradient"), torch.enable_grad():
            if not self._ordered:
                with capture(self.layers, need_outputs=False) as rec:
                    z = call(self.model, inputs)
                self.layers = [self.layers[i] for i in forward_order(self.layers, rec)]
                params = self._params()
                self._ordered = True
                self.factors = None
                self._ensure_state()
            elif self._reuse_forward():
                # τ₁ = 1: the statistics come from this forward's graph (one forward fewer)
                with capture(self.layers) as rec:
                    z = call(self.model, inputs)
                self._reuse = (z, rec)
            else:
                z = call(self.model, inputs)
            check_output(z, self.loss)
            if validate:
                self.loss.check_targets(z, targets)
            h_data = self.loss.mean(z, targets)
            grads = torch.autograd.grad(h_data, params, allow_unused=True, retain_graph=self._reuse is not None)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            m = z.shape[0]
            # loss terms per example (P): the row minimums of S₂ and the ρ subset count terms
            self._terms_per_example = max(1, math.prod(z.shape[1:-1]))
            r = self._examples_for(self.config.rho_rows)
            idx_r = self._subset(m, 0.0, r) if 0 < r < m and self.config.rho_batch == "same" else None
            l2 = self._l2()
            h_data = h_data.detach().double()
            rho_rows = None
            if idx_r is not None:
                zr = z.detach().index_select(0, idx_r)
                rho_rows = (idx_r, self.loss.mean(zr, targets.index_select(0, idx_r)).double() + l2)
        eta = self.config.weight_decay
        V, pos = [], 0
        for layer in self.layers:
            n = len(layer.params())
            Vi = layer.to_matrix(*grads[pos: pos + n]).to(self.inverse_dtype)
            if eta:
                Vi = Vi + eta * layer.param_matrix().detach().to(self.inverse_dtype)
            V.append(Vi)
            pos += n
        if self.dist.world_size > 1:  # one flat all-reduce of ∇h (and the objectives) over the ranks
            scal = torch.stack([h_data] + ([rho_rows[1]] if rho_rows is not None else []))
            self.dist.all_reduce_mean_(V)
            scal = self.dist.reduce_scalars(scal, op="mean")  # ½η‖θ‖² is the same on every rank
            h_data = scal[0]
            if rho_rows is not None:
                rho_rows = (rho_rows[0], scal[1])
        return V, h_data + l2, h_data, rho_rows

    def _statistics(self, inputs, targets: torch.Tensor, h: torch.Tensor):
        """Step 2: a backward pass on S₁ with targets sampled from the model (Sec 5; ignored
        terms stay ignored). Returns (statistics, valid, flags, names): ``valid`` is a 0-d bool
        device tensor, False when h or any statistic is non-finite; ``flags`` says which."""
        cfg = self.config
        if self._reuse is not None:
            with self._phase("3 sampled backward"):
                batch_stats = self._statistics_from_gradient_pass(targets)
        else:
            idx1 = self._subset(batch_size(inputs), cfg.tau1)
            x1 = select(inputs, idx1)
            with self._phase("3 sampled backward"):
                batch_stats, _ = sampled_statistics(self.model, self.layers, x1, self.loss, fisher="mc",
                                                    targets=targets.index_select(0, idx1), generator=self.generator,
                                                    check_finite=False)
        flags, names = finite_flags(self.layers, batch_stats)
        if self.dist.world_size > 1:  # a non-finite statistic on one rank is every rank's
            flags = self.dist.reduce_scalars((~flags).double(), op="sum") == 0
        valid = torch.isfinite(h) & flags.to(h.device).all()
        return batch_stats, valid, flags, names

    def _reuse_forward(self) -> bool:
        """Whether the statistics backward reuses the gradient forward's graph: with τ₁ = 1 S₁ is
        the whole batch, so a second forward would recompute the same graph. (With τ₁ < 1 a
        backward through the whole batch costs more than a forward and backward on τ₁m rows.)"""
        return self.config.tau1 >= 1.0

    def _statistics_from_gradient_pass(self, targets: torch.Tensor):
        """Step 2 on the gradient pass's retained graph: targets sampled from its outputs (Sec 5;
        ignored terms stay ignored), one backward of their summed loss to the recorded block
        outputs. The graph is released afterwards."""
        from .curvature.losses import sample_targets
        from .curvature.statistics import block_rows, statistics_grads

        z, rec = self._reuse
        self._reuse = None
        y = sample_targets(self.loss, torch.nan_to_num(z.detach(), nan=0.0, posinf=0.0, neginf=0.0),
                           self.generator, like=targets)
        grads = statistics_grads(self.loss.total(z, y), self.layers, rec)
        return block_rows(self.layers, rec, grads, self.loss.count(z, y))

    def _update_factors(self, batch_stats, valid: torch.Tensor) -> None:
        """Step 3: every block's running statistics with ε = min(1 − 1/k, ema_max) into the
        pending buffers; where ``valid`` is False they come out equal to the current ones
        (``RunningFactors.update(valid=)``), without a host read."""
        with self._phase("4 factor update"):
            self.factors.update(batch_stats, eps=ema_decay(self.k, self.config.ema_max), backend=self.backend,
                                valid=valid)
            if self.dist.world_size > 1:  # exact: current is replicated (kfac_fast.distributed)
                self.dist.reduce_factors(self.factors, which="pending")

    def _refresh_if_due(self, stats: StepStats, refresh: bool):
        """Step 4: a new inverse at the current γ when k ≡ 0 (mod T3) or k ≤ 3 (Sec 8), else the
        last one (at the current γ). Returns the inverse the γ candidates start from."""
        with self._phase("5 inverse refresh"):
            if refresh:
                base = self._refresh(self.gamma)
                stats["refreshed"] = base is not self.inverse
            else:
                base = self.inverse
                if base.damping != self.gamma:  # γ changed on the host (rescale=False)
                    base = base.with_damping(self.gamma)
        return base

    def _proposals(self, inputs, targets: torch.Tensor, base, V: list[torch.Tensor]) -> "_Proposal":
        """Steps 5-6 per γ candidate (Sec 6.6: every T2 iterations γ, ω₂γ, γ/ω₂): the proposal
        Δ = −F̆⁻¹∇h (or F̂⁻¹∇h) and its re-scaling; returns the candidate with the lowest M.
        Only the γ choice reads the host (on T2 iterations, which are refresh iterations)."""
        cfg = self.config
        candidates = [self.gamma]
        # greedy γ (Sec 6.6) compares candidates by the exact-Fisher M; without re-scaling the only
        # model is K-FAC's own, whose predicted decrease always favours the smallest γ: off.
        if cfg.adapt_gamma and cfg.rescale and self.k % cfg.T2 == 0:
            candidates = gamma_candidates(self.gamma, cfg.omega2, lo=cfg.gamma_min, hi=cfg.gamma_max)
        idx2 = self._subset(batch_size(inputs), cfg.tau2, self._examples_for(cfg.tau2_min_rows))
        x2 = (select(inputs, idx2), targets.index_select(0, idx2))
        use_mom = cfg.momentum and self._delta0 is not None
        props = []
        for gamma in candidates:
            with self._phase("5 inverse refresh"):
                try:
                    inv = base if gamma == base.damping else base.with_damping(gamma)
                except ValueError:  # e.g. the tridiagonal Σ not positive definite at this γ: skip it
                    continue
            with self._phase("6 precondition"):
                Delta = [-u for u in inv.apply(V)]
            alpha, mu, M, norm2 = self._rescale(V, Delta, x2, use_mom)
            props.append(_Proposal(M, gamma, inv, Delta, alpha, mu, norm2))
        if len(props) == 1:
            return props[0]
        Ms = torch.stack([p.M for p in props]).tolist()  # the γ choice: one read, on T2 iterations only
        best = 0
        for i, M in enumerate(Ms):
            if math.isfinite(M) and (not math.isfinite(Ms[best]) or M < Ms[best]):
                best = i
        return props[best]

    def _rescale(self, V: list[torch.Tensor], Delta: list[torch.Tensor], x2: tuple, use_mom: bool):
        """Step 6: α (and µ with momentum, Sec 7) minimising the exact-Fisher model M on S₂
        (Sec 6.4, Appendix C). Returns (α, µ, M(δ) − M(0), ‖δ‖²) with δ = αΔ + µδ₀, all 0-d
        float64 device tensors (the 2×2 solve is closed-form selections: no host sync)."""
        cfg = self.config
        dirs = [Delta] + ([self._delta0] if use_mom else [])
        n = len(dirs)
        if cfg.rescale:
            with self._phase("7 fisher quadratic"):
                gram = fisher_gram(self.model, self.layers, x2[0], self.loss, dirs, targets=x2[1])
                if self.dist.world_size > 1:  # Γ on the union of the ranks' S₂ (equal sizes)
                    gram = self.dist.reduce_scalars(gram, op="mean")
                dots = [[None] * n for _ in range(n)]
                for a in range(n):
                    for c in range(a, n):
                        dots[a][c] = dots[c][a] = inner(dirs[a], dirs[c])
                dots = torch.stack([torch.stack(row) for row in dots])
                b = torch.stack([inner(V, d) for d in dirs])
                alpha, mu, M = solve_alpha_mu_t(gram, dots, b, self._st.lam + cfg.weight_decay, mu_max=cfg.mu_max)
                coef = torch.stack([alpha, mu][:n])
                norm2 = coef @ dots @ coef  # ‖αΔ + µδ₀‖², from the same numbers
        else:
            # no exact-Fisher model: δ = Δ and M is K-FAC's own prediction, ½∇hᵀΔ (exact for
            # the damped approximate model, as Δ minimises it)
            one = torch.ones((), dtype=torch.float64, device=self.device)
            alpha, mu = one, torch.zeros_like(one)
            norm2, M = inner(Delta, Delta), 0.5 * inner(V, Delta)
        return alpha, mu, M, norm2

    def _commit(self, inputs, targets: torch.Tensor, h: torch.Tensor, best: "_Proposal", stats: StepStats,
                rho_rows, valid: torch.Tensor, flags, refresh: bool, batch_stats=None) -> StepStats:
        """Steps 7-8: θ ← θ + δ; ρ every iteration with reject_steps (else every T1, Sec 6.5)
        decides whether the step stays. Every decision is a device selection: a rejected step
        selects the saved θ (``torch.where``), zero δ₀ and Nielsen's λ; the factors were already
        kept clean by ``valid``. The inverse and γ are committed either way (computed at θ_k).

        On ordinary iterations the factor update happens here (``batch_stats``), after δ, so that
        a non-finite δ keeps the statistics out as well; on refresh iterations it happened before
        the inverse refresh and the host decides whether to keep it."""
        cfg, k, st = self.config, self.k, self._st
        M, gamma, inv, Delta, alpha, mu, norm2 = best
        use_mom = cfg.momentum and self._delta0 is not None and cfg.rescale
        delta = [d * alpha.to(d.dtype) for d in Delta]
        if use_mom:
            delta = [d + d0 * mu.to(d.dtype) for d, d0 in zip(delta, self._delta0)]
        # ‖δ‖² is finite iff δ is (an overflowing square is rejected too: conservative)
        ok_pre = valid & torch.isfinite(norm2)
        zero = torch.zeros((), dtype=delta[0].dtype, device=self.device)
        delta = [torch.where(ok_pre, d, zero) for d in delta]  # a non-finite δ never reaches θ

        lm_due = cfg.adapt_lambda and k % cfg.T1 == 0
        wants_rho = cfg.reject_steps or lm_due
        held_out = wants_rho and cfg.rho_batch == "next"
        measure = wants_rho and not held_out
        # θ is saved only where the ρ forward (now or on the next batch) may reject the step
        theta = [[p.detach().clone() for p in l.params()] for l in self.layers] if wants_rho else None
        self._add(delta)
        self.gamma = gamma  # before the rules: without re-scaling the LM rule adapts γ itself
        h_new = None
        if measure:
            with self._phase("8 rho forward"):
                if rho_rows is None:
                    h_new = self._objective(inputs, targets)
                else:  # ρ on a random subset of rho_rows rows (an unbiased estimate of the batch's)
                    idx_r, h_r = rho_rows
                    h_new = self._objective(select(inputs, idx_r), targets.index_select(0, idx_r))
                    h = h_r
                if self.dist.world_size > 1:  # ½η‖θ‖² is the same on every rank
                    h_new = self.dist.reduce_scalars(h_new, op="mean")
        code, rho, st.lam, st.nu, st.rejections, st.total_rejections, st.unreported = self._decision(
            measure, lm_due, held_out)(h, h if h_new is None else h_new, M, valid, ok_pre, st.lam, st.nu,
                                        st.rejections, st.total_rejections, st.unreported)
        if measure:
            stats["rho"] = rho
        else:
            rho = None
        reject = code != 0
        if theta is not None:
            self._select_params(reject, theta)
        accepted = ~reject
        st.has_delta0 = accepted
        # δ₀ ← δ, or 0 after a rejection: momentum restarts from the kept θ (Sec 7's δ₀ led to the
        # bad step); with δ₀ = 0 the 2×2 solve selects α alone (solve_alpha_mu_t)
        self._delta0 = [torch.where(accepted, d.detach(), zero) for d in delta]

        if batch_stats is not None:
            self._update_factors(batch_stats, ok_pre)
            self.factors.commit()
        elif bool(ok_pre):  # refresh iterations read the host anyway
            self.factors.commit()
        self.inverse = inv
        self.k += 1
        stats.update(rejected=reject, lambda_=st.lam, gamma=self.gamma, alpha=alpha, mu=mu, M=M,
                     inverse_fallbacks=self.inverse_fallbacks)
        fl, names = flags
        stats["reject_code"] = code  # 0 kept; 1 non-finite loss, 2 statistics, 3 update, 4 ρ, 5 loss after
        stats.set_lazy("reason", lambda d, fl=fl, names=names, rho=rho, h=h, h_new=h_new:
                       self._reason(d["reject_code"], fl, names, rho, h, h_new))
        if self.profile:
            stats["phases"] = dict(self._phases)
        self._last_stats = stats

        if not cfg.rescale or held_out:  # γ on the host / ρ on the next batch: decided here
            if bool(reject):
                self._host_rules_after_reject(stats)
            else:
                if not cfg.rescale and measure and lm_due and bool(torch.isfinite(M) & (M < 0)):
                    self._adapt_gamma(float(rho))
                    stats["gamma"] = self.gamma
                if held_out:
                    self._pending = {"theta": theta, "M": float(M), "lm_due": lm_due}  # "next" reads the host anyway
            self._check_rejections(force=True)
        elif refresh:
            self._check_rejections(force=True)
            if bool(reject) and int(code) != 4:
                warnings.warn(f"K-FAC step {k} rejected ({stats['reason']}); λ raised to {self.lambda_:.3g}",
                              RuntimeWarning)
        else:
            self._check_rejections()
        return stats

    def _decision(self, measure: bool, lm_due: bool, held_out: bool):
        """:func:`kfac_fast.rules.step_decision` for this schedule case, compiled with
        ``fullgraph=True`` under ``compile=True`` (one compiled variant per case, cached)."""
        key = (measure, lm_due, held_out)
        fn = self._decisions.get(key)
        if fn is None:
            cfg = self.config
            fn = functools.partial(step_decision, measure=measure, lm_due=lm_due, held_out=held_out,
                                   reject_steps=cfg.reject_steps, rescale=cfg.rescale, rho_min=cfg.rho_min,
                                   omega1=cfg.omega1, lambda_min=cfg.lambda_min, lambda_max=cfg.lambda_max)
            if self.compile:
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            self._decisions[key] = fn
        return fn

    def _reason(self, code: int, flags: torch.Tensor, names: list, rho, h, h_new) -> Optional[str]:
        """The words for a rejection code (read lazily, from the host values)."""
        if not code:
            return None
        if code == 2:
            fl = flags.tolist()
            bad = names[fl.index(False)] if False in fl else "statistics"
            return f"non-finite {bad} in the sampled-target pass"
        if code == 3:
            return "non-finite update δ"
        if code == 4:
            return (f"ρ = {float(rho):.3g} < {self.config.rho_min:g} (objective {float(h):.6g} -> "
                    f"{float(h_new):.6g})")
        return REJECT_CODES[code]

    def _select_params(self, reject: torch.Tensor, saved: list[list[torch.Tensor]]) -> None:
        """θ ← where(reject, saved θ, θ): the rejection as a selection, bit for bit."""
        with torch.no_grad():
            for layer, ps in zip(self.layers, saved):
                for p, s in zip(layer.params(), ps):
                    p.copy_(torch.where(reject, s, p))
        torch.clear_autocast_cache()

    def _host_rules_after_reject(self, stats: StepStats) -> None:
        """Without re-scaling Nielsen's rule raises γ (host), not λ."""
        cfg, st = self.config, self._st
        if not cfg.rescale:
            g2, nu = rejection_increase(self.gamma ** 2, float(st.nu), omega1=cfg.omega1, hi=cfg.gamma_max ** 2)
            self.gamma = math.sqrt(g2)
            st.set("nu", nu)
            stats["gamma"] = self.gamma

    def _adapt_gamma(self, rho: float) -> None:
        """Without re-scaling there is no exact-Fisher model for λ to damp, so the LM rule of
        Sec 6.5 adapts γ² (ρ then compares with K-FAC's own model)."""
        cfg = self.config
        g2 = levenberg_marquardt(self.gamma ** 2, rho, cfg.omega1, lo=cfg.gamma_min ** 2, hi=cfg.gamma_max ** 2)
        self.gamma = math.sqrt(g2)
        self._st.set("nu", NU_INIT)

    def _check_pending(self, inputs, targets: torch.Tensor, h_new: torch.Tensor, stats: StepStats):
        """rho_batch="next": ρ of the previous step δ_k on this batch, a sample the step was not
        fitted to: (h_B(θ_k + δ_k) − h_B(θ_k)) / M(δ_k). h_B(θ_k + δ_k) is this step's objective;
        h_B(θ_k) costs one forward pass with the saved θ_k (``torch.func.functional_call``).
        Returns the stats of a rejection (θ ← θ_k, nothing else done this call) or None. This mode
        reads ρ on the host every iteration."""
        cfg, pend = self.config, self._pending
        self._pending = None
        h_new_v = float(h_new)
        if not math.isfinite(h_new_v):  # the previous, unchecked step led here: undo it
            return self._host_rejection("non-finite loss after the previous step (undone)", stats,
                                        saved=pend["theta"])
        with self._phase("8 rho forward"):
            h_old = self._objective(inputs, targets, params=pend["theta"])
            if self.dist.world_size > 1:
                h_old = self.dist.reduce_scalars(h_old, op="mean")
            h_old = float(h_old)
        rho = (h_new_v - h_old) / float(pend["M"]) if math.isfinite(h_old) else float("nan")
        stats["rho"] = rho
        if cfg.reject_steps and not accept(rho, rho_min=cfg.rho_min):
            return self._host_rejection(f"the previous step: held-out ρ = {rho:.3g} < {cfg.rho_min:g} "
                                        f"(objective on this batch {h_old:.6g} -> {h_new_v:.6g}); θ restored", stats,
                                        saved=pend["theta"], warn=False)
        st = self._st
        st.rejections.zero_()
        st.set("nu", NU_INIT)
        self._unread_bound = 0
        if pend["lm_due"]:
            if cfg.rescale:
                st.lam = levenberg_marquardt_t(st.lam, torch.tensor(rho, dtype=torch.float64, device=self.device),
                                               cfg.omega1, lo=cfg.lambda_min, hi=cfg.lambda_max)
            else:
                self._adapt_gamma(rho)
        return None

    def _build_inverse(self, records: list, gamma: float):
        """The inverse over ``records`` at γ: one process builds it whole; data-parallel with
        ``distributed_mode`` "replicate_inverses"/"shard_inverses" the blocks are built by
        their owners (greedy LPT on n³, :class:`kfac_fast.distributed.ShardedInverse`)."""
        fact = resolve_factorization(self.config.factorization, self.config.inverse, self.backend)
        kind = self.config.inverse

        def build(recs, warm):
            return build_block_inverse(kind, recs, damping=gamma, backend=self.backend, warm_start=warm,
                                       factorization=fact)

        if self.dist.world_size == 1 or self.distributed_mode == "replicated_work":
            return build(records, self.inverse)
        inv = ShardedInverse(self.dist, mode=self.distributed_mode, kind=kind, build=build, backend=self.backend,
                             damping=gamma)
        prev = self.inverse
        if isinstance(prev, ShardedInverse):  # its owned blocks warm-start the new ones
            inv.local, inv.owners = prev.local, prev.owners
        inv.refresh(records)
        return inv

    def _refresh(self, gamma: float):
        """New approximate inverse from the pending factors (Sec 4 + 6.3), with fallbacks.

        Factors whose eigendecomposition fails even in float64 keep the last good one; an
        inverse that cannot be built at all (e.g. Σ_(i|i+1) not positive definite) is replaced by
        the previous inverse. Both are counted in ``stats["inverse_fallbacks"]`` and warned once.
        """
        facs = snapshot(self.factors.pending, dtype=self.inverse_dtype)
        try:
            inv = self._build_inverse(facs, gamma)
            failures = list(inv.fallbacks)
            inv.compute_dtype = self.compute_dtype
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
            "delta0": _storage_bytes(self._delta0 or []),
            "params": _storage_bytes(self._params()),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the same trajectory (with the model's own state_dict).

        Data-parallel: a collective (every rank calls it); the state is replicated except the
        generators, whose states of all ranks are gathered into ``rank_generators``, so rank 0's
        dict is the whole checkpoint."""
        gens = None
        if self.dist.world_size > 1:
            gens = self.dist.all_gather_object(self.generator.get_state())
        return {
            "rank_generators": gens,
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
        inv_state = state["inverse"]
        if inv_state is not None and inv_state.get("sharded"):  # rebuilt from its records (any world size)
            from .curvature.block_inverse import records_from_dicts

            self.inverse = None
            self.inverse = self._build_inverse(records_from_dicts(inv_state["records"], self.factors.current),
                                               float(inv_state["damping"]))
        else:
            self.inverse = load_inverse(self.config.inverse, inv_state, self.factors.current, self.backend)
        if self.inverse is not None:
            self.inverse.compute_dtype = self.compute_dtype
        self.k = int(state["k"])
        self.lambda_ = float(state["lambda_"])
        self.gamma = float(state["gamma"])
        self._delta0 = None if state["delta0"] is None else [d.to(self.device, self.inverse_dtype)
                                                             for d in state["delta0"]]
        self._st.has_delta0.fill_(self._delta0 is not None)
        gens = state.get("rank_generators")
        if gens is not None and len(gens) == self.dist.world_size:
            self.generator.set_state(gens[self.dist.rank])
        elif gens is not None or self.dist.world_size > 1:
            # another world size: fresh per-rank streams from a seed drawn from the saved stream
            g = torch.Generator().manual_seed(0)
            g.set_state(state["generator"])
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
            self.generator = rank_generator(seed, self.dist.rank, self.device)
        else:
            self.generator.set_state(state["generator"])
        self.rejections = int(state["rejections"])
        self._st.set("total_rejections", int(state["total_rejections"]))
        self.nu = float(state.get("nu", NU_INIT))
        pend = state.get("pending")
        self._pending = None if pend is None else {
            "theta": [[t.to(self.device) for t in ps] for ps in pend["theta"]], "M": float(pend["M"]),
            "lm_due": bool(pend["lm_due"])}
        self.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
