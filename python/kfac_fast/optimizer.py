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

Each step lives in one module of :mod:`kfac_fast.phases`: ``statistics`` (1-3), ``refresh`` (4),
``proposal`` (5-6), ``commit`` (7-8). The rules that adapt λ and γ and reject bad steps, in their
device and host forms, are one part the optimizer holds (``KFAC.adapt``, ``phases.adaptation``);
checkpoints and the memory report are ``phases.checkpoint_io``. The phases 1-8 are mixins of
``KFAC`` because they share its model, layers, factors, inverse, δ₀ and generator (the order of
the RNG draws across phases is part of the trajectory); each module names what it reads and
writes. This file keeps the construction, the host view of the device state, the helpers on θ
and ``step``. The ``profile`` phases follow the task list of Sec 8 instead.

The curvature blocks own their factors and inverses; kernels know nothing of this class.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._parts import default_factor_dtype, default_generator, model_device, warn_low_coverage
from .curvature.coverage import Coverage, coverage
from .config import KFACConfig
from .batch import batch_size, buffers_kept, call, functional_call
from .curvature.blocks import check_kfac_approx, check_tied_weights, check_unsupported, find_blocks
from .curvature.losses import get_loss
from .curvature.recorded_batch import RecordedBatch, TargetsFn
from .curvature.running import RunningFactors
from .curvature.compute_dtype import ComputeDtype, resolve_compute_dtype
from .distributed import MODES, common_seed, default_distributor, rank_generator, unwrap_model
from .phases import checkpoint_io
from .phases.adaptation import Adaptation, StepRejected
from .phases.commit import CommitPhase
from .phases.proposal import ProposalPhase
from .phases.refresh import RefreshPhase
from .phases.statistics import StatisticsPhase
from .rules import levenberg_marquardt
from .step_state import AdaptState, StepStats

__all__ = ["KFAC", "StepRejected", "levenberg_marquardt"]

DISTRIBUTED_MODES = MODES + ("replicated_work",)


class KFAC(StatisticsPhase, RefreshPhase, ProposalPhase, CommitPhase, torch.optim.Optimizer):
    """The K-FAC optimizer (Algorithm 2) with re-scaling, momentum, λ and γ adaptation.

    Example::

        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", inverse="block_tridiagonal")
        for x, y in loader:
            stats = opt.step(x, y)   # does the forward/backward passes itself

    It is a ``torch.optim.Optimizer`` (one param group of the K-FAC blocks' parameters, ``lr``
    1.0 by default), so the usual loop, LR schedulers, Hugging Face ``Trainer`` and Lightning
    drive it too::

        opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** (k // 100))
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(targets=y)      # Algorithm 2 on the batch of that forward
            sched.step()

    ``step()`` without ``inputs`` replays the batch of your last forward with grad enabled (a
    forward pre-hook on the model records it) and runs Algorithm 2 on it from scratch: its
    own gradient pass (your backward's ``.grad`` is not read, so clipping it changes nothing),
    the statistics, the exact-Fisher products and ρ. The targets: ``step(targets=y)``, or
    ``targets=`` at construction, a callable ``batch -> targets`` for loops that call
    ``optimizer.step()`` with no arguments (``Trainer``: ``targets=lambda b:
    kfac_fast.causal_lm_targets(b["labels"])``). ``step(closure=...)`` (Lightning) runs the
    closure first (your forward and backward, under grad) and returns its loss. ``lr``
    multiplies the final update δ (and M(δ) follows, so ρ and the λ rule judge the step taken):
    a scheduler halving ``lr`` halves the step.

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
        tied_weights: an ``nn.Embedding`` whose weight is also a bias-free ``nn.Linear`` output
            layer's (GPT-2, Gemma): ``"unsupported"`` (default: the shared weight follows
            ``unsupported``) or ``"kronecker_sum"`` (one Kronecker-sum block over both uses,
            Appendix B; :func:`kfac_fast.curvature.blocks.find_blocks` gives the measurement
            behind the default).
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
            :mod:`kfac_fast.curvature.compute_dtype` and docs/fast-step.md for the measured error.
        compile: run the step's scalar decisions (:func:`kfac_fast.rules.step_decision`) under
            ``torch.compile(fullgraph=True)``, one variant per schedule case. The model passes
            (gradient, sampled backward, linearized forward) stay eager: see docs/fast-step.md.
        process_group, distributor: data parallelism. When ``torch.distributed`` is
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
        targets: for ``step()`` without arguments (``Trainer``, Lightning): ``targets(batch) ->
            Tensor`` of the recorded batch (the arguments of your last ``model(...)`` call: a
            tensor, a tuple or a dict). ``step(targets=y)`` takes precedence.
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
        tied_weights: str = "unsupported",
        ignore_index: Optional[int] = -100,
        ignore_nan_targets: bool = False,
        validate: bool = False,
        compute_dtype: ComputeDtype = None,
        compile: bool = False,
        distributor=None,
        process_group=None,
        distributed_mode: str = "replicate_inverses",
        targets: Optional[TargetsFn] = None,
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
        # data parallelism: a DistributedDataParallel wrapper is bypassed (K-FAC takes
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
        self.tied_weights = check_tied_weights(tied_weights)
        self.layers = find_blocks(model, kfac_approx=kfac_approx, unsupported=unsupported,
                                  tied_weights=tied_weights)
        warn_low_coverage(self.coverage(), "KFAC", "opt")
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
        # λ, ν, the rejection counters and the δ₀ flag on the device, γ on the host: the rules'
        # own state (phases/adaptation.py)
        self.adapt = Adaptation(self.config, device=self.device, compile=compile)
        self.validate = bool(validate)
        self.k = 1
        self._terms_per_example = 1  # loss terms per example (P), updated by every gradient pass
        self._ordered = False
        self.factors: Optional[RunningFactors] = None
        self.inverse = None
        self._delta0: Optional[list[torch.Tensor]] = None  # δ₀ (zeros after a rejection: see has_delta0)
        # Tq > 1: the last exact-Fisher check's curvature quotients Γ_ab/(‖d_a‖‖d_b‖), (n, n) float64
        self._exact_model: Optional[torch.Tensor] = None
        self._last_stats: Optional[StepStats] = None
        self._reuse = None  # (outputs, recording) of a gradient pass whose graph the statistics reuse
        # rho_batch="next": the last step, to be checked on the next batch (θ_k, M(δ_k), whether the LM rule is due)
        self._pending: Optional[dict] = None
        self.profile = profile
        self._phases: dict[str, float] = {}
        self.inverse_fallbacks = 0
        self._warned_fallback = False
        # torch.optim.Optimizer: one param group, lr a multiplier of the final step
        torch.optim.Optimizer.__init__(self, self._params(), {"lr": 1.0})
        self._recorder = RecordedBatch(model, targets=targets)

    # ------------------------------------------------------------------ torch.optim.Optimizer
    def __getstate__(self) -> dict:
        return dict(self.__dict__)  # the whole K-FAC state (torch's keeps only the param groups)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _lr(self) -> float:
        """The multiplier of the final step: the (single) param group's ``lr``."""
        if len(self.param_groups) != 1:
            raise ValueError(f"KFAC has one param group (the K-FAC blocks' parameters), found "
                             f"{len(self.param_groups)}: drop add_param_group; train other parameters with "
                             "another optimizer")
        lr = self.param_groups[0]["lr"]
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"KFAC's lr (a multiplier of the K-FAC step, 1 by default) must be positive and finite, "
                             f"got {lr}: a schedule that reaches 0 (warm-up from 0, decay to 0) leaves ρ undefined; "
                             "start and end it above 0")
        return lr

    @property
    def last_stats(self) -> Optional[StepStats]:
        """The :class:`~kfac_fast.step_state.StepStats` of the last step (what ``step(inputs,
        targets)`` returns; ``step(closure=...)`` returns the closure's loss instead)."""
        return self._last_stats

    def set_targets(self, targets: torch.Tensor) -> None:
        """The targets of the next ``step()`` without arguments (e.g. from a Lightning
        ``training_step``, which runs inside ``step(closure)``); ``step(targets=y)`` wins."""
        self._recorder.set_targets(targets)

    def paused(self):
        """Context manager: forwards inside it are not recorded as the batch ``step()`` replays
        (e.g. a validation pass with grad enabled)."""
        return self._recorder.paused()

    # ------------------------------------------------------------------ the rules' state, host view
    # Reading λ, ν or the rejection counts waits for the device (one transfer); the step itself never does.
    @property
    def config(self) -> KFACConfig:
        """The hyper-parameters (:class:`KFACConfig`); replacing them reaches the rules too."""
        return self._config

    @config.setter
    def config(self, value: KFACConfig) -> None:
        self._config = value
        if "adapt" in vars(self):
            self.adapt.config = value

    @property
    def gamma(self) -> float:
        """γ, the factored Tikhonov damping of the inverse (Sec 6.3, adapted by Sec 6.6)."""
        return self.adapt.gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self.adapt.gamma = value

    @property
    def compile(self) -> bool:
        """Whether the step's decisions run under ``torch.compile`` (see the class docstring)."""
        return self.adapt.compile

    @compile.setter
    def compile(self, value: bool) -> None:
        self.adapt.compile = bool(value)

    @property
    def _st(self) -> AdaptState:
        return self.adapt.state

    @property
    def _unread_bound(self) -> int:
        return self.adapt.unread_bound

    @_unread_bound.setter
    def _unread_bound(self, value: int) -> None:
        self.adapt.unread_bound = value

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
        for l in self.layers:
            for p in l.params():
                if not p.requires_grad:
                    raise ValueError(f"a parameter of {l.name} was frozen after KFAC was built; build a new KFAC "
                                     "for the new set of trainable parameters")

    def _ensure_state(self) -> None:
        if self.factors is None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.config.inverse == "block_tridiagonal",
                                          compute_dtype=self.compute_dtype, max_block_dim=self.config.max_block_dim)

    def _examples_for(self, terms: int) -> int:
        """Examples holding at least ``terms`` loss terms (P per example, from the last gradient pass)."""
        return -(-terms // self._terms_per_example) if terms > 0 else 0

    def _subset(self, m: int, frac: float, min_rows: int = 0) -> torch.Tensor:
        """A random subset of the m ≥ 1 examples: round(frac·m) of them, at least ``min_rows`` and at
        least one (a batch of 2-4 sequences still gets a τ₁ / τ₂ subset), at most m."""
        size = min(m, max(int(round(frac * m)), min_rows, 1))
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
                z = functional_call(self.model, dict(zip(self._param_names(), flat)), inputs)
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

    # ------------------------------------------------------------------ Algorithm 2
    def step(self, inputs=None, targets: Optional[torch.Tensor] = None,
             closure: Optional[Callable[[], Any]] = None):
        """One iteration of Algorithm 2 on the mini-batch.

        Args:
            inputs: the batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or
                a dict (``model(**inputs)``); dim 0 of every tensor in it indexes the m examples
                (the subsets S₁, S₂ index it). None: the batch of your last forward with grad
                enabled since the previous step (``loss.backward(); opt.step()``).
            targets: (m, ...) per the loss (see the class docstring); None with ``inputs`` None:
                the ``targets`` callable given at construction.
            closure: ``torch.optim`` style: called first (under grad) to run your forward and
                backward; its return value is returned.

        Returns:
            a :class:`~kfac_fast.step_state.StepStats` mapping (read like a dict; its device
            values reach the host together on the first read) with ``loss`` (batch mean data
            loss at θ_k), ``objective`` (h incl. η/2‖θ‖²), ``lambda_``, ``gamma``, ``alpha``,
            ``mu``, ``M`` (M(δ) − M(0)), ``rho`` (every iteration with ``reject_steps``, else on
            λ-update iterations; None where not measured, NaN where M(δ) ≥ 0 left it undefined),
            ``refreshed``, ``rejected`` (with ``reason``), ``k``. A step rejected by ρ leaves θ
            as it was, keeps the new statistics (they were measured at θ) and drops δ₀; a step
            with non-finite loss or statistics keeps neither. k counts every call that got past
            the input checks. With a ``closure``: the closure's return value (the stats are in
            :attr:`last_stats`).
        """
        if closure is None and callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
            inputs, closure = None, inputs  # torch.optim's positional step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if inputs is None:
            batches, targets = self._recorder.take(targets)
            if not batches:
                raise RuntimeError("KFAC.step() without a batch replays your last forward with grad enabled, and none "
                                   "was recorded since the last step: call model(...) (and loss.backward()) before "
                                   "opt.step(), pass a closure, or pass the batch: opt.step(inputs, targets)")
            inputs = batches[-1]
            if isinstance(targets, (list, tuple)):
                targets = targets[-1]
            if targets is None:
                raise ValueError("KFAC.step() needs the targets of the recorded batch: opt.step(targets=y), or "
                                 "KFAC(..., targets=lambda batch: ...) for loops that call optimizer.step() with no "
                                 "arguments (e.g. lambda b: kfac_fast.causal_lm_targets(b['labels']))")
        else:
            self._recorder.clear()
        self._lr()  # a bad lr is refused before anything changes
        with self._recorder.paused():
            stats = self._algorithm2(inputs, targets)
        return stats if closure is None else loss

    def _algorithm2(self, inputs, targets: torch.Tensor) -> StepStats:
        """Algorithm 2 (Sec 9) on one batch: the body of :meth:`step`."""
        self._check_batch(inputs, targets)
        self._ensure_state()
        refresh = self._refresh_due()  # Sec 8: k ≡ 0 (mod T3) or k ≤ 3
        stats = StepStats(k=self.k, rho=None, rejected=False, refreshed=False)
        self._phases = {}
        # 1. h and ∇h on S' (Sec 9)
        V, h, h_data, rho_rows = self._gradient(inputs, targets, validate=self.validate or refresh)
        stats.update(loss=h_data, objective=h)
        if self._pending is not None:  # rho_batch="next": the previous step's 7-8, judged on this batch
            verdict = self._check_pending(inputs, targets, h, stats)
            if verdict is not None:
                self._reuse = None  # release the gradient pass's graph
                return verdict
        # 2. the statistics on S₁ with targets sampled from the model (Sec 5)
        batch_stats, valid, flags, names = self._statistics(inputs, targets, h)
        # 3. the running factors: before the refresh that reads them, else in the commit (after δ)
        if refresh:
            self._update_factors(batch_stats, valid)
        # 4. the damped inverse at γ (Sec 4, 6.3)
        base = self._refresh_if_due(stats, refresh)
        # 5-6. Δ per γ candidate, δ = αΔ + µδ₀ from the exact-Fisher model (Sec 6.4, 6.6, 7)
        best = self._proposals(inputs, targets, base, V)
        # 7-8. θ ← θ + δ, ρ and λ (Sec 6.5); the step kept or undone
        return self._commit(inputs, targets, h, best, stats, rho_rows, valid, (flags, names), refresh,
                            None if refresh else batch_stats)

    # ------------------------------------------------------------------ memory and checkpoints
    def coverage(self) -> Coverage:
        """Which trainable parameters have Kronecker, norm, dense or diagonal blocks and which are
        skipped, with reasons (:func:`kfac_fast.curvature.coverage`)."""
        return coverage(self.model, self.layers, kfac_approx=self.kfac_approx, tied_weights=self.tied_weights,
                        max_block_dim=self.config.max_block_dim)

    def memory_report(self) -> dict[str, int]:
        """Bytes of K-FAC state by kind, each storage counted once (views share storage).

        ``factors``: the running Ā, G (and cross factors) in two buffers (current and pending,
        so a rejected step leaves the current ones untouched); ``inverse``: the damped inverses,
        eigenbases or Appendix B matrices plus the factor snapshot they were built from;
        ``delta0``: the previous update δ₀ (Sec 7); ``params``: the model's K-FAC parameters,
        for scale. Nothing else persists between steps. Its ``diagonal_factors`` name the factors
        the ``max_block_dim`` bound keeps as diagonals, and why.
        """
        return checkpoint_io.memory_report(self)

    def state_dict(self) -> dict:
        """Everything needed to continue the same trajectory (with the model's own state_dict).

        Data-parallel: a collective (every rank calls it); the state is replicated except the
        generators, whose states of all ranks are gathered into ``rank_generators``, so rank 0's
        dict is the whole checkpoint. The ``torch.optim`` keys ``state`` (empty: K-FAC's state is
        not per parameter) and ``param_groups`` (``lr`` and a scheduler's ``initial_lr``) sit
        beside the K-FAC keys."""
        return checkpoint_io.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (also one written before KFAC was a
        ``torch.optim.Optimizer``: the param group then keeps its hyper-parameters). Raises
        ValueError for another model or format."""
        checkpoint_io.load_state_dict(self, state)
