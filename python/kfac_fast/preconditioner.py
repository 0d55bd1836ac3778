"""K-FAC as a gradient preconditioner for people who keep their own optimizer.

Differences from :class:`kfac_fast.KFAC` (Algorithm 2):
  * no re-scaling by the exact Fisher, no momentum, no λ/γ adaptation: the damping γ is
    fixed (factored Tikhonov, Sec 6.3) and the step size is your optimizer's learning rate;
  * it works on the gradients you computed (``loss.backward()``) and replaces each layer's
    ``.grad`` in place by the corresponding block of F̆⁻¹∇ (or F̂⁻¹∇);
  * weight decay is your optimizer's business (applied after preconditioning).
Like KFAC it keeps running factor averages (Sec 5) and refreshes the inverse every T3 steps.

Where the statistics come from (``capture=``):
  * ``"pass"`` (default): ``step(inputs, targets)`` runs its own forward and backward on a τ₁
    subset of the batch (Sec 5), as it always has;
  * ``"hooks"``: hooks record the block inputs and output derivatives of YOUR forward and
    backward (:mod:`kfac_fast.curvature.hooks`), so ``step()`` runs no forward: the empirical
    Fisher costs no extra pass, the MC Fisher one extra backward (run inside yours, from the
    outputs) on targets sampled from your outputs (no second forward).

Data parallel (:class:`DistributedKFACPreconditioner`): the same preconditioner on p ranks, each
with its own shard of the batch. ``KFACPreconditioner(...)`` constructs it when torch.distributed
is initialised over more than one rank.

    torch.distributed.init_process_group("gloo")            # or torchrun + "nccl"
    model = DistributedDataParallel(net)                    # or the plain net
    pre = DistributedKFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2)
    for x, y in shard_of_loader:                            # m/p examples per rank
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()             # DDP averages .grad
        pre.step(x, y)                                      # .grad ← F̆⁻¹ .grad, same on all ranks
        sgd.step()

One iteration, per rank (the paper's Sec 8 tasks with the communication of
:mod:`kfac_fast.distributed` in between):

1. gradient: with a plain model, start ONE flat all-reduce of every ``.grad`` (the mean over
   ranks, as DDP would); a DDP model has already averaged them;
2. statistics on this rank's τ₁ subset (its own generator stream), the pending factors updated
   locally (Sec 5); with ``Tf > 1`` only on statistics steps (the first 3 and every Tf-th, the
   same steps on every rank), and steps 4-5 then only there too: the other steps precondition
   with the current inverse, with no statistics pass and no factor traffic;
3. one small all-reduce of the failure flags (a non-finite sampled-pass output, non-finite
   gradients on any rank): every rank takes the same decision;
4. start ONE flat all-reduce of the pending factors (upper triangles), every
   ``factor_reduce_every`` iterations and always before a refresh;
5. refresh due (first 3 iterations, every T3): wait for the factors, commit, the sharded
   refresh (:class:`~kfac_fast.distributed.ShardedInverse`) and precondition; otherwise
   precondition with the current inverse while the factor reduction is in flight, then wait and
   commit;
6. write the directions into ``.grad`` (the same bits on every rank, so the parameters stay
   bitwise identical across ranks under any deterministic optimizer).

World 2 with batch m/2 per rank equals world 1 with batch m (float64, to rounding) when the
factors are exact averages (see :mod:`kfac_fast.distributed`: equal shard sizes, no
``diagonal``-kind blocks, no training-mode BatchNorm) and the τ₁ subsets together are the
union batch (``tau1=1``); with ``fisher="mc"`` or ``tau1 < 1`` the ranks draw different samples,
so the runs agree in distribution only.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from ._parts import (default_factor_dtype, default_generator, memory_report_of, model_device, state_bytes, tensors_in,
                     warn_low_coverage)
from .checkpoint import READABLE_VERSIONS, STATE_VERSION
from .config import INVERSES, check_factorization
from .batch import batch_size, select
from .curvature.damping import DEFAULT_DAMPING_WARMUP, warmup_damping
from .curvature.coverage import Coverage, coverage
from .curvature.blocks import check_kfac_approx, check_tied_weights, check_unsupported, find_blocks
from .curvature.capture import forward_order, internal_pass
from .curvature.hooks import CapturedPass, HookCapture, check_pass
from .curvature.inverses import (build_block_inverse, inverse_state, load_inverse, resolve_factorization,
                                 warmup_rebuild)
from .curvature.losses import check_output, get_loss, rows, sample_targets
from .curvature.recorded_batch import RecordedBatch, TargetsFn
from .curvature.running import RunningFactors, ema_decay, snapshot
from .curvature.factors import (DEFAULT_MAX_BLOCK_DIM, BlockFisher, KroneckerFactors, check_max_block_dim,
                                cross_factor_like, factor_like, record_to_dict)
from .curvature.statistics import (BatchStatistics, NonFiniteOutputs, block_rows, concat_statistics,
                                   sampled_statistics)
from .distributed import (Distributor, PhaseTimer, ShardedInverse, check_mode, common_seed, default_distributor,
                          rank_generator, rank_seed, unwrap_model)
from .step_size import Graft, StepSize, apply_step_size, check_step_size

FISHERS = ("mc", "empirical")
CAPTURES = ("pass", "hooks")
REDUCTIONS = ("mean", "sum")
#: relative tolerance of the first-step check that your loss's output gradient matches the scale
#: capture="hooks" assumes (loss_reduction, grad_scale, N)
SCALE_RTOL = 1e-2


def _world_size(process_group=None) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


DEFAULT_TF_MAX = 10


def default_statistics_period(T3: int) -> int:
    """The default ``Tf``: the largest divisor of ``T3`` not above ``DEFAULT_TF_MAX``, so that
    every refresh falls on a statistics step (measured in docs/race.md)."""
    return max(d for d in range(1, min(T3, DEFAULT_TF_MAX) + 1) if T3 % d == 0)


class KFACPreconditioner:
    """Replace ``.grad`` of every K-FAC block's parameters by the K-FAC direction.

    Example::

        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(x, y)          # .grad ← F̆⁻¹ .grad
            sgd.step()

    With the statistics from your own passes (``capture="hooks"``, no extra forward)::

        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical",
                                           capture="hooks")
        for x, y in loader:
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(targets=y)     # or pre.step(): see "N" below
            sgd.step()

    capture="hooks" in detail (:mod:`kfac_fast.curvature.hooks` for what is recorded when):
        * every ``model(...)`` call with grad enabled is a pass; its block inputs ā and (empirical
          Fisher) ∂L/∂s are recorded, L your loss. Forwards under ``torch.no_grad()`` are not
          recorded, nor those inside ``with pre.paused():``, nor kfac_fast's own; a forward
          that no backward reached is dropped. Train or eval mode does not matter.
        * scaling: the blocks' G needs ∂(Σ loss terms)/∂s (:mod:`.curvature.blocks.base`), so the
          recorded derivatives are multiplied by N / grad_scale (``loss_reduction="mean"``: your
          loss is the mean over the N loss terms) or 1 / grad_scale (``"sum"``). ``grad_scale``
          (a ``step`` argument) is whatever multiplied your loss on top: ``scaler.get_scale()``
          of a GradScaler (the captured derivatives are not unscaled by ``scaler.unscale_``), 1/k
          if you divide each of k accumulated micro-batch losses by k.
        * N, the number of loss terms per pass: with ``targets`` given, the loss's own count (the
          terms whose target is not ``ignore_index`` / not all-NaN); without, every leading
          position of the model output (m for (m, k) outputs, m·T for (m, T, k)). Without
          targets and with a loss that can ignore terms (softmax with ``ignore_index`` set, the
          default; ``ignore_nan_targets``), a pass whose output gradient has an exactly zero
          row (an ignored term) is refused: pass the targets.
        * check: on the first step given targets the gradient your backward sent to the model
          output is compared with ∂(Σ loss terms)/∂z: a ratio off the assumed 1/(N / grad_scale)
          by more than 1 % (a sum loss declared as a mean, a forgotten GradScaler scale, a loss
          other than ``loss=``) raises ValueError naming the setting to change.
        * several forwards before one ``step()`` (gradient accumulation): their rows are pooled
          (Ā averages every row, G divides by the total N); ``targets`` is then a list, one per
          pass in forward order, or None.
        * ``fisher="mc"``: in your backward, as soon as it reaches the model output z, targets are
          sampled from z (``generator``) and their summed loss is backpropagated from z to the
          blocks (a nested backward, before yours frees the graph: no ``retain_graph`` needed).
          The terms your loss ignores (exactly zero rows of ∂L/∂z, when the loss can ignore
          terms) are left out of it; given targets must ignore the same terms.
        * activation checkpointing (``torch.utils.checkpoint``, transformers'
          ``gradient_checkpointing_enable()``, timm's ``set_grad_checkpointing()``): the
          recomputation in the backward is not a pass; the statistics equal those without
          checkpointing. ``use_reentrant=True`` supports ``fisher="empirical"`` only, one
          backward per forward.
        * hooks stay on the model until :meth:`remove_hooks` (or the end of a ``with pre:`` block);
          recorded tensors are released at every ``step``.
        * a non-finite ``.grad`` (GradScaler overflow) leaves ``.grad``, the factors and k as
          they were and drops the recorded pass.

    Args:
        model: any network (blocks as for :class:`kfac_fast.KFAC`).
        loss: predictive distribution the factors use (``"softmax_cross_entropy"``, ...).
        kfac_approx: ``"expand"`` or ``"reduce"`` (layers applied at R positions per example).
        unsupported: ``"skip"`` (default: parameters no Kronecker/norm block models keep the
            ``.grad`` you computed, for your optimizer as it is, as KAISA does), ``"diagonal"``
            (a diagonal Fisher block each) or ``"error"``.
        tied_weights: an ``nn.Embedding`` whose weight is also a bias-free ``nn.Linear`` output
            layer's (GPT-2, Gemma): ``"unsupported"`` (default: the shared weight follows
            ``unsupported``) or ``"kronecker_sum"`` (one Kronecker-sum block over both uses,
            Appendix B; :func:`kfac_fast.curvature.blocks.find_blocks` gives the measurement
            behind the default).
        ignore_index: softmax targets equal to it are excluded (default −100); with
            ``fisher="mc"`` pass the targets to ``step`` so the sampled pass masks them too.
        ignore_nan_targets: the float losses' mask: terms whose targets are all NaN are excluded.
        damping: γ of the factored Tikhonov damping (Sec 6.3), > 0.
        fisher: ``"mc"`` (true Fisher, targets sampled from the model: one extra forward and
            backward on a τ₁ subset, Sec 5) or ``"empirical"`` (uses the given targets).
        inverse: ``"block_diagonal"`` or ``"block_tridiagonal"``.
        T3: inverse refresh period (also refreshed on the first 3 steps).
        tau1: fraction of the batch used for the factor statistics (default 1/8 with
            ``capture="pass"``; ``capture="hooks"`` uses every row: only 1 is accepted there).
        capture: ``"pass"`` (default: ``step(inputs, targets)`` runs its own forward and
            backward) or ``"hooks"`` (statistics from your passes, see above).
        loss_reduction: ``capture="hooks"`` only: ``"mean"`` (default: your loss averages the
            loss terms, as ``F.cross_entropy`` does) or ``"sum"``.
        ema_max: ε = min(1 − 1/k, ema_max).
        backend, generator, factor_dtype: as for :class:`kfac_fast.KFAC`.
        factorization: "auto" (Cholesky for block_diagonal unless backend="native"), "eigh" or
            "cholesky": how the damped factor inverses are computed at each refresh.
        Tf: statistics period: the factors (and, on those steps, the inverse) are updated on
            the first 3 steps and every Tf-th; the other steps only precondition with the
            current inverse (no statistics pass; with ``capture="hooks"`` the recorded pass is
            dropped, no sampled backward). The inverse refreshes on statistics steps only, so
            make T3 a multiple of Tf. Default (None): the largest divisor of T3 up to
            ``DEFAULT_TF_MAX`` = 10 (10 at the default T3 = 20); 1 updates every step.
        step_size: what your optimizer receives in place of u = F̆⁻¹∇ (:mod:`kfac_fast.step_size`):
            ``Graft()`` (default: each block's u rescaled to the norm of its gradient, so your
            optimizer's usual learning rate applies), ``KLClip(kappa=1e-3, lr=optimizer)`` (u
            scaled so that lr²∇ᵀu ≤ κ) or None (u itself: tune the learning rate for it).
        damping_warmup: K, the damping warm-up in iterations: an inverse built at iteration k
            uses γ_k = γ·max(1, K/k) (:func:`kfac_fast.curvature.damping.warmup_damping`), Kγ
            at the first refreshes and γ from iteration K on. The young factors average few
            statistics and are noisy; damping them more makes K-FAC's early steps at least as good
            as your optimizer's own (docs/race.md, "Damping warm-up"). 0: γ throughout. Default
            (None): ``DEFAULT_DAMPING_WARMUP`` = 30 with ``Graft`` (which gives every block the
            gradient's norm, so γ shapes only the direction), 0 with ``KLClip`` or None, whose
            step length γ sets (a warm-up there would shrink your early steps up to K×).
        max_block_dim: the largest Kronecker factor (Ā or G) kept dense; a larger one is kept as
            its diagonal (the block stays a Kronecker product, diag ⊗ dense, and a block-diagonal
            entry also with ``inverse="block_tridiagonal"``). Default 4096 (an LM head's
            vocabulary-sized G, a 3×3×512-input convolution's Ā); None: no bound.
    """

    def __new__(cls, *args, **kwargs):
        # Data parallelism: with torch.distributed initialised over more than one rank,
        # KFACPreconditioner(...) is the DistributedKFACPreconditioner (factors reduced, inverse
        # work sharded, every rank the same direction), not a per-rank preconditioner whose
        # ranks would silently drift apart.
        if cls is KFACPreconditioner and _world_size(kwargs.get("process_group")) > 1:
            return super().__new__(DistributedKFACPreconditioner)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: str,
        damping: float = 1e-2,
        fisher: str = "mc",
        inverse: str = "block_diagonal",
        T3: int = 20,
        tau1: Optional[float] = None,
        ema_max: float = 0.95,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        factor_dtype: Optional[torch.dtype] = None,
        factorization: str = "auto",
        kfac_approx: str = "expand",
        unsupported: str = "skip",
        tied_weights: str = "unsupported",
        ignore_index: Optional[int] = -100,
        ignore_nan_targets: bool = False,
        capture: str = "pass",
        loss_reduction: str = "mean",
        step_size: StepSize = Graft(),
        Tf: Optional[int] = None,
        max_block_dim: Optional[int] = DEFAULT_MAX_BLOCK_DIM,
        damping_warmup: Optional[int] = None,
    ):
        check_factorization(factorization, inverse)
        self.max_block_dim = check_max_block_dim(max_block_dim)
        if capture not in CAPTURES:
            raise ValueError(f"unknown capture {capture!r}; choose one of {', '.join(CAPTURES)}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss_reduction {loss_reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        if capture == "pass" and loss_reduction != "mean":
            raise ValueError("loss_reduction applies to capture='hooks' only (capture='pass' computes its own sum "
                             "loss); drop it or pass capture='hooks'")
        if tau1 is None:
            tau1 = 1.0 if capture == "hooks" else 1.0 / 8
        if capture == "hooks" and tau1 != 1:
            raise ValueError(f"capture='hooks' uses every row of your pass (tau1=1), got tau1={tau1}; drop tau1 or "
                             "use capture='pass' for the statistics of a tau1 subset")
        if fisher not in FISHERS:
            raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHERS)}")
        if inverse not in INVERSES:
            raise ValueError(f"unknown inverse {inverse!r}; choose one of {', '.join(INVERSES)}")
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a positive finite number, got {damping}")
        if not isinstance(T3, int) or T3 < 1:
            raise ValueError(f"T3 must be a positive integer, got {T3!r}")
        if damping_warmup is None:
            damping_warmup = DEFAULT_DAMPING_WARMUP if isinstance(step_size, Graft) else 0
        if isinstance(damping_warmup, bool) or not isinstance(damping_warmup, int) or damping_warmup < 0:
            raise ValueError(f"damping_warmup must be an integer >= 0 (iterations; 0 keeps the damping constant), "
                             f"got {damping_warmup!r}")
        if Tf is None:
            Tf = default_statistics_period(T3) if isinstance(T3, int) and T3 >= 1 else 1
        if not isinstance(Tf, int) or Tf < 1:
            raise ValueError(f"Tf must be a positive integer (statistics every Tf steps), got {Tf!r}")
        if not 0 < tau1 <= 1:
            raise ValueError(f"tau1 must lie in (0, 1], got {tau1}")
        if not 0 <= ema_max < 1:
            raise ValueError(f"ema_max must lie in [0, 1), got {ema_max}")
        self.model = model
        self.loss = get_loss(loss, ignore_index=ignore_index, ignore_nan_targets=ignore_nan_targets)
        self.kfac_approx = check_kfac_approx(kfac_approx)
        self.unsupported = check_unsupported(unsupported)
        self.tied_weights = check_tied_weights(tied_weights)
        self.damping = float(damping)
        self.damping_warmup = damping_warmup
        self._gamma: Optional[float] = None  # γ_k of the current inverse (warmup_damping)
        self.fisher = fisher
        self.inverse_kind = inverse
        self.T3, self.Tf, self.tau1, self.ema_max = T3, Tf, tau1, ema_max
        self.backend = backend
        self.factorization = resolve_factorization(factorization, inverse, backend)
        self.layers = find_blocks(model, kfac_approx=kfac_approx, unsupported=unsupported,
                                  tied_weights=tied_weights)
        warn_low_coverage(self.coverage(), "KFACPreconditioner", "pre")
        self.device = model_device(self.layers)
        self.factor_dtype = factor_dtype or default_factor_dtype(self.layers)
        self.generator = generator if generator is not None else default_generator(self.device)
        self.k = 1
        self._ordered = False
        self.factors: Optional[RunningFactors] = None
        self.inverse = None
        self.capture = capture
        self.loss_reduction = loss_reduction
        self.step_size = check_step_size(step_size)
        self._scale_checked = False
        self._hooks: Optional[HookCapture] = None
        if capture == "hooks":
            self._hooks = HookCapture(model, self.layers, record_grads=fisher == "empirical",
                                      sampler=self._sampled_cotangent if fisher == "mc" else None)
        self._attached: Optional[tuple] = None  # (optimizer, hook handle, GradScaler, constant grad_scale)
        self._recorder: Optional[RecordedBatch] = None

    # ------------------------------------------------------------------ hooks
    def coverage(self) -> Coverage:
        """Which trainable parameters have Kronecker, norm, dense or diagonal blocks and which are
        skipped, with reasons (:func:`kfac_fast.curvature.coverage`)."""
        return coverage(self.model, self.layers, kfac_approx=self.kfac_approx, tied_weights=self.tied_weights,
                        max_block_dim=self.max_block_dim)

    def memory_report(self) -> dict[str, int]:
        """Bytes of K-FAC state by kind, each storage counted once: ``factors`` (the running Ā, G
        and their pending buffer), ``inverse`` (the damped inverses or eigenbases and the factor
        snapshot they were built from), ``params`` (the parameters with blocks, for scale). Its
        ``diagonal_factors`` name the factors the ``max_block_dim`` bound keeps as diagonals."""
        return memory_report_of({
            "factors": state_bytes([] if self.factors is None else self.factors.tensors()),
            "inverse": state_bytes(tensors_in(self.inverse)),
            "params": state_bytes([p for layer in self.layers for p in layer.params()]),
        }, self.layers, self.max_block_dim)

    def remove_hooks(self) -> None:
        """Take the ``capture="hooks"`` hooks off the model and drop what they recorded (idempotent;
        ``step`` then raises)."""
        if self._hooks is not None:
            self._hooks.remove()

    @contextlib.contextmanager
    def paused(self):
        """Context manager: forwards inside it are not recorded (``capture="hooks"``, and the batch
        an attached preconditioner replays), e.g. a validation pass with grad enabled. A no-op
        with ``capture="pass"`` when not attached."""
        with contextlib.ExitStack() as stack:
            if self._hooks is not None:
                stack.enter_context(self._hooks.paused())
            if self._recorder is not None:
                stack.enter_context(self._recorder.paused())
            yield

    # ------------------------------------------------------------------ torch.optim
    def attach(self, optimizer: torch.optim.Optimizer, *, targets: Optional[TargetsFn] = None,
               grad_scaler=None, grad_scale: float = 1.0) -> None:
        """Precondition ``.grad`` at the start of every ``optimizer.step()`` (a step pre-hook,
        ``torch.optim.Optimizer.register_step_pre_hook``), so that an unchanged training loop
        ``loss.backward(); [clip]; optimizer.step(); scheduler.step()`` is K-FAC preconditioned.

        Order within one iteration: your backward, your gradient clipping (it clips the raw
        gradient), ``GradScaler.step``'s unscaling, then this preconditioner (``.grad`` ←
        F̆⁻¹ ``.grad``, Sec 4.2), then the optimizer's own update with its learning rate (as the
        scheduler set it), momentum and weight decay. An iteration whose ``optimizer.step()`` is
        skipped (GradScaler overflow) updates nothing here either. ``optimizer.step(closure)``
        (Lightning) preconditions right after the closure's backward, inside the step; an
        optimizer that evaluates its closure several times per step (LBFGS) would update the
        factors at each evaluation: not supported.

        Where the statistics come from: ``capture="hooks"`` from the passes the hooks recorded
        (no extra forward); ``capture="pass"`` from this preconditioner's own pass on a τ₁
        subset of the batch of your last forward with grad enabled (recorded by a forward
        pre-hook on the model: ``model(x)``, ``model(*args)`` or ``model(**kwargs)``; with
        gradient accumulation, the last micro-batch).

        Args:
            optimizer: any ``torch.optim.Optimizer`` holding every parameter of every K-FAC block.
            targets: ``targets(batch) -> Tensor``, called with the recorded batch at every step
                (e.g. ``lambda b: kfac_fast.causal_lm_targets(b["labels"])`` for a Hugging Face
                causal LM called as ``model(**batch)``); or give one step's targets with
                :meth:`set_targets`. Needed where :meth:`step` needs them (``fisher="empirical"``
                with ``capture="pass"``; ignored terms with ``capture="hooks"``).
            grad_scaler: ``capture="hooks"``: the ``torch.amp.GradScaler`` that scales your loss;
                its scale at the step (``get_scale()``, before ``scaler.update()``) divides the
                recorded derivatives, which ``unscale_`` does not reach. Ignored by
                ``capture="pass"`` (its own pass is unscaled and so is ``.grad`` by then).
            grad_scale: ``capture="hooks"``: a constant factor on your loss besides the scaler,
                e.g. 1/k when you divide each of k accumulated micro-batch losses by k.

        Raises:
            TypeError: not a ``torch.optim.Optimizer``; RuntimeError: already attached;
            ValueError: a K-FAC parameter that the optimizer does not update.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._attached is not None:
            raise RuntimeError("this KFACPreconditioner is already attached to an optimizer; call detach() first")
        if not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a positive finite number, got {grad_scale!r}")
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [l.name for l in self.layers if any(id(p) not in stepped for p in l.params())]
        if missing:
            raise ValueError(f"the optimizer does not update the parameters of layer {missing[0]} (of {len(missing)}), "
                             "so their preconditioned gradients would be thrown away: build the optimizer on "
                             "model.parameters(), or the preconditioner on the part of the model it trains")
        self._recorder = RecordedBatch(self.model, targets=targets)
        handle = optimizer.register_step_pre_hook(self._pre_step)
        self._attached = (optimizer, handle, grad_scaler, float(grad_scale))

    def detach(self) -> None:
        """Undo :meth:`attach`: the step pre-hook and the batch recorder come off (idempotent)."""
        if self._attached is not None:
            self._attached[1].remove()
            self._attached = None
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def set_targets(self, targets) -> None:
        """The targets of the next attached step (a tensor; with ``capture="hooks"`` and several
        recorded passes a list, one per pass), for loops whose model call does not carry them."""
        if self._recorder is None:
            raise RuntimeError("set_targets is for an attached preconditioner (attach(optimizer)); without one "
                               "pass the targets to step()")
        self._recorder.set_targets(targets)

    def _pre_step(self, optimizer, args, kwargs):
        # args = (optimizer, *step's positional arguments), as torch's step wrapper passes them
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._precondition_attached()
            return None
        # step(closure) (Lightning): the closure runs the forward and backward inside the
        # optimizer's step, after this hook; precondition right after it instead

        def preconditioned_closure():
            loss = closure()
            self._precondition_attached()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": preconditioned_closure}
        return (args[0], preconditioned_closure) + tuple(args[2:]), kwargs

    def _precondition_attached(self) -> None:
        _, _, scaler, const = self._attached
        batches, targets = self._recorder.take()
        if self.capture == "hooks":
            scale = const
            if scaler is not None and scaler.is_enabled():
                scale *= float(scaler.get_scale())
            self._step_hooks(None, targets, scale)
            return
        if not batches:
            raise RuntimeError("nothing to replay: no forward of the model with grad enabled since the last "
                               "optimizer.step() (capture='pass' takes its statistics on the batch of your last "
                               "forward); call model(...) and loss.backward() before optimizer.step()")
        if isinstance(targets, (list, tuple)):
            targets = targets[-1]
        self.step(batches[-1], targets)

    def __enter__(self) -> "KFACPreconditioner":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
        self.remove_hooks()

    def step(self, inputs=None, targets=None, *, grad_scale: float = 1.0) -> None:
        """Update the factors and precondition ``.grad`` in place (F̆⁻¹∇ per block, Sec 4.2).

        ``capture="pass"``: statistics from one forward and backward of this method on a τ₁ subset
        of ``inputs``. ``capture="hooks"``: statistics from the passes the hooks recorded since
        the last step (no forward; with ``fisher="mc"`` the sampled backward ran inside yours).

        Args:
            inputs: ``"pass"``: the batch whose gradients are in ``.grad``: a tensor, tuple/list
                (``model(*inputs)``) or dict (``model(**inputs)``), examples along dim 0.
                ``"hooks"``: optional, only checked against the recorded passes' batch size.
            targets: ``"pass"``: needed for ``fisher="empirical"``; for ``"mc"`` optional (its
                ignored positions are then excluded from the sampled pass too). ``"hooks"``:
                optional; gives N its mask, the MC targets their ignored terms, and the scale
                check its reference (a list, one per pass, after several forwards).
            grad_scale: ``"hooks"`` only: what multiplied your loss on top of ``loss_reduction``
                (``scaler.get_scale()``, 1/k for k accumulated micro-batches), > 0.
        """
        if self.capture == "hooks":
            return self._step_hooks(inputs, targets, grad_scale)
        if inputs is None:
            raise TypeError("capture='pass' needs the batch: step(inputs, targets); construct the preconditioner "
                            "with capture='hooks' to take the statistics from your own passes instead")
        if grad_scale != 1.0:
            raise ValueError("grad_scale applies to capture='hooks' only (capture='pass' recomputes the statistics "
                             "in its own pass)")
        m = self._check_batch(inputs, targets)
        grads = [l.grad_matrix() for l in self.layers]  # raises if backward was not called
        if not self._statistics_step():
            if _all_finite(grads):  # one host sync for all blocks
                self._precondition(grads)
            self.k += 1
            return
        size = max(1, int(round(self.tau1 * m)))
        idx = torch.randperm(m, generator=self.generator, device=self.device)[:size]
        x1 = select(inputs, idx)
        y1 = None if targets is None else targets.index_select(0, idx)
        stats, rec = sampled_statistics(self.model, self.layers, x1, self.loss, fisher=self.fisher, targets=y1,
                                        generator=self.generator)
        if not self._ordered:  # forward order, from the first statistics pass
            order = forward_order(self.layers, rec)
            self.layers = [self.layers[i] for i in order]
            grads = [grads[i] for i in order]
            stats = stats.permuted(order)
            self._ordered = True
        self._update(stats)
        if not _all_finite(grads):
            # e.g. a GradScaler overflow step: leave .grad as it is so the scaler sees inf and skips
            self.k += 1
            return
        self._precondition(grads)
        self.k += 1

    def _statistics_step(self) -> bool:
        """Whether step k updates the factors: the first 3 steps, then every Tf-th."""
        return self.inverse is None or self.k <= 3 or self.k % self.Tf == 0

    def _update(self, stats: BatchStatistics) -> None:
        """Running factors ← this batch's statistics (Sec 5); inverse refresh on k ≤ 3 and every T3."""
        if self.factors is None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.inverse_kind == "block_tridiagonal",
                                          max_block_dim=self.max_block_dim)
        self.factors.update(stats, eps=ema_decay(self.k, self.ema_max), backend=self.backend)
        self.factors.commit()
        scheduled = self.inverse is None or self.k % self.T3 == 0
        if scheduled or self.k <= 3:  # k = 2, 3: the small blocks only (warmup_rebuild)
            records = snapshot(self.factors.current)
            self.inverse = build_block_inverse(self.inverse_kind, records, damping=self._refresh_damping(scheduled),
                                               backend=self.backend, warm_start=self.inverse,
                                               factorization=self.factorization,
                                               rebuild=warmup_rebuild(records, self.k, scheduled=scheduled))

    def _refresh_damping(self, scheduled: bool) -> float:
        """γ for the inverse built now: γ_k of the damping warm-up on a scheduled refresh (the
        first, and every T3); the warm-up refreshes of k = 2, 3 keep the γ of k = 1, so that
        the blocks they do not rebuild (warmup_rebuild) and those they do share one γ."""
        if scheduled or self._gamma is None:
            self._gamma = warmup_damping(self.damping, self.k, self.damping_warmup)
        return self._gamma

    def _precondition(self, grads: list) -> None:
        U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
        self._write_grads(apply_step_size(self.step_size, grads, U))

    def _write_grads(self, U: list) -> None:
        """``.grad`` of every block's parameters ← its (g_dim, a_dim) matrix in ``U``."""
        with torch.no_grad():
            for layer, u in zip(self.layers, U):
                for p, part in zip(layer.params(), layer.from_matrix(u)):
                    p.grad.copy_(part.to(p.dtype).reshape(p.shape))

    # ------------------------------------------------------------------ capture="hooks"
    def _step_hooks(self, inputs, targets, grad_scale: float) -> None:
        if not self._hooks.armed:
            raise RuntimeError("the hooks of this KFACPreconditioner were removed (remove_hooks() or the end of its "
                               "`with` block); construct a new one with capture='hooks'")
        if not (isinstance(grad_scale, (int, float)) and math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a positive finite number (scaler.get_scale()), got {grad_scale!r}")
        grads = [l.grad_matrix() for l in self.layers]  # raises if backward was not called
        passes, stray = self._hooks.take()
        if self._ordered and not self._statistics_step():
            del passes  # amortised: no sampled backward, the recorded tensors are released
            if bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
                self._precondition(grads)
                self.k += 1
            return
        try:
            self._check_passes(passes, stray, inputs)
            # one host sync for all blocks and passes: a sum is inf/NaN when an entry is (or when
            # finite entries overflow it, ~1e38, which only a diverged run reaches)
            sums = [g.sum().double() for g in grads] + [p.gz.sum().double() for p in passes if p.gz is not None]
            finite = torch.isfinite(torch.stack(sums)).tolist()
            if not all(finite[:len(grads)]):
                return  # GradScaler overflow: .grad, factors and k as they were; the pass is dropped
            stale = {id(p) for p, ok in zip([p for p in passes if p.gz is not None], finite[len(grads):]) if not ok}
            if stale:
                # non-finite derivatives with a finite .grad: the passes of an overflow iteration whose
                # optimizer.step() the GradScaler skipped (attach()); dropped with their targets
                keep = [id(p) not in stale for p in passes]
                if isinstance(targets, (list, tuple)) and len(targets) == len(passes):
                    targets = [t for t, k in zip(targets, keep) if k]
                passes = [p for p, k in zip(passes, keep) if k]
                if not passes:
                    return
                if isinstance(targets, (list, tuple)) and len(targets) == 1:
                    targets = targets[0]
            ys = self._per_pass_targets(targets, len(passes))
            blocks = self._hooks.blocks
            if not self._ordered:  # forward order, from the first recorded pass
                order = forward_order(blocks, passes[0].recording())
                self.layers = [blocks[i] for i in order]
                grads = [l.grad_matrix() for l in self.layers]
                self._ordered = True
            parts = [self._pass_statistics(p, y, grad_scale) for p, y in zip(passes, ys)]
            stats = concat_statistics(blocks, parts)
        finally:
            del passes  # release the recorded tensors (and the graph an MC pass kept) before the update
        position = {id(b): i for i, b in enumerate(blocks)}
        self._update(stats.permuted([position[id(l)] for l in self.layers]))
        self._precondition(grads)
        self.k += 1

    def _check_passes(self, passes: list, stray: list, inputs) -> None:
        if stray:
            raise ValueError(f"layer {stray[0]} ran outside a forward of the model given to KFACPreconditioner (a "
                             "submodule called directly?); "
                             "capture='hooks' opens a pass at model(...): call the model, wrap that forward in "
                             "`with pre.paused():` and leave its gradient out, or use capture='pass'")
        if not passes:
            raise RuntimeError("nothing recorded since the last step: capture='hooks' needs a forward of the model with "
                               "grad enabled and its loss.backward() before pre.step() (forwards under torch.no_grad() "
                               "or pre.paused() are not recorded)")
        for p in passes:
            check_pass(self._hooks.blocks, p, sampled=self.fisher == "mc")
            check_output(p.z, self.loss)
        if inputs is not None:
            m, got = batch_size(inputs, self.device), sum(int(p.z.shape[0]) for p in passes)
            if m != got:
                raise ValueError(f"inputs has {m} rows but the recorded forward passes had {got} examples; with "
                                 "capture='hooks' step() uses the recorded passes (inputs are only checked)")

    def _per_pass_targets(self, targets, n: int) -> list:
        if targets is None:
            return [None] * n
        if isinstance(targets, torch.Tensor):
            if n != 1:
                raise ValueError(f"{n} forward passes were recorded since the last step (gradient accumulation); "
                                 "pass targets as a list with one tensor per pass, in forward order, or None")
            return [targets]
        if isinstance(targets, (list, tuple)) and len(targets) == n and all(isinstance(t, torch.Tensor)
                                                                            for t in targets):
            return list(targets)
        raise ValueError(f"targets must be a tensor (one recorded pass) or a list of {n} tensors, one per recorded "
                         f"pass; got {type(targets).__name__}"
                         + (f" of length {len(targets)}" if isinstance(targets, (list, tuple)) else ""))

    def _loss_terms(self, p: CapturedPass, y) -> int:
        """N of one pass: the loss's count given targets, else every leading position of z
        (refused when an exactly zero row of ∂L/∂z betrays an ignored term)."""
        z = p.z.detach()
        if y is not None:
            if y.shape[:1] != z.shape[:1]:
                raise ValueError(f"the recorded pass has {z.shape[0]} examples but its targets {tuple(y.shape)[:1]}")
            if not self._scale_checked:  # validated with the scale (first step given targets): your loss used them
                self.loss.check_targets(z, y)
            return int(self.loss.count(z, y))
        can_mask = self.loss.ignore_index is not None or getattr(self.loss, "ignore_nan_targets", False)
        if can_mask and bool((rows(p.gz) == 0).all(-1).any()):
            raise ValueError("the gradient of your loss is exactly zero for some loss terms of the model output "
                             "(targets equal to ignore_index, or all-NaN with ignore_nan_targets), so N, the number "
                             "of terms your loss averages, is not the number of outputs: pass the targets, "
                             "pre.step(targets=y), so that N counts the kept terms (or ignore_index=None if no term "
                             "is ever ignored)")
        return rows(z).shape[0]

    def _check_scale(self, p: CapturedPass, y, n_terms: int, scale: float, grad_scale: float) -> None:
        """Once, given targets: ∂L/∂z = c · ∂(Σ loss terms)/∂z with c = 1/scale (Sec 5 convention)."""
        z = p.z.detach().requires_grad_(True)
        with torch.enable_grad(), internal_pass():
            h, = torch.autograd.grad(self.loss.total(z, y), z)
        hh = float((h * h).sum())
        if hh == 0.0 or p.gz is None:
            return
        c = float((p.gz.to(h.dtype) * h).sum()) / hh
        if abs(c * scale - 1.0) > SCALE_RTOL:
            raise ValueError(
                f"the gradient your backward sent to the model output is {c:.4g} x d(sum of {self.loss.name} terms)/dz, "
                f"but loss_reduction={self.loss_reduction!r}, grad_scale={grad_scale:g} and N={n_terms} mean "
                f"{1.0 / scale:.4g}: pass loss_reduction='sum' if your loss sums the terms, "
                "step(grad_scale=scaler.get_scale()) under a GradScaler or 1/k for k accumulated micro-batches, "
                f"and make sure your loss is the {self.loss.name} of loss= (mean over the same N terms)")
        self._scale_checked = True

    def _pass_statistics(self, p: CapturedPass, y, grad_scale: float) -> BatchStatistics:
        """One recorded pass -> its BatchStatistics in the capture's block order, G following the
        ∂(Σ loss terms)/∂s convention (:mod:`.curvature.blocks.base`)."""
        blocks = self._hooks.blocks
        n_terms = self._loss_terms(p, y)
        scale = (n_terms if self.loss_reduction == "mean" else 1.0) / grad_scale
        if y is not None and not self._scale_checked:
            self._check_scale(p, y, n_terms, scale, grad_scale)
        rec = p.recording()
        if self.fisher == "empirical":
            g = [(p.output_grad(i) if b.captures else p.grads[i]) for i, b in enumerate(blocks)]
            g = [None if t is None else t * scale for t in g]
            return block_rows(blocks, rec, g, n_terms)
        z = p.z
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteOutputs("the model's outputs contain NaN or inf, so no targets can be sampled for the MC "
                                   "Fisher: the parameters or inputs have diverged (lower the learning rate or raise "
                                   "the damping)")
        if p.sampled is None:
            raise RuntimeError("no sampled-target backward ran in the backward of this pass (fisher='mc' takes it "
                               "inside your loss.backward(), for the passes of a statistics step): call "
                               "pre.step() after every backward, not load_state_dict() in between")
        self._check_kept(p, y)
        g = [p.sampled[i] if p.sampled[i] is not None or not b.captures else p.output_grad(i)
             for i, b in enumerate(blocks)]
        return block_rows(blocks, rec, g, rows(z).shape[0] if p.kept is None else int(p.kept.sum()))

    def _sampled_cotangent(self, z: torch.Tensor, gz: torch.Tensor):
        """The MC Fisher's cotangent at the model output z (m, ..., k), called by the hooks in your
        backward (Sec 5): targets ŷ sampled from the predictive distribution at z, c = ∂(Σ kept
        loss terms ℓ(z, ŷ))/∂z, and the kept terms (M,) bool (None: all): those whose row of
        your ∂L/∂z (gz) is not exactly zero when the loss can ignore terms. None when the next
        step takes no statistics (Tf) or z is not finite (the step raises)."""
        if self._ordered and not self._statistics_step():
            return None
        if not bool(torch.isfinite(z).all()):
            return None
        can_mask = self.loss.ignore_index is not None or getattr(self.loss, "ignore_nan_targets", False)
        kept = ~(rows(gz) == 0).all(-1) if can_mask else None
        ys = sample_targets(self.loss, z, self.generator)
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad(), internal_pass():
            c, = torch.autograd.grad(self.loss.total(zz, ys), zz)
        if kept is not None:
            c = c * kept.reshape(z.shape[:-1]).unsqueeze(-1).to(c.dtype)
        return c, kept

    def _check_kept(self, p: CapturedPass, y) -> None:
        """Given targets: the terms they keep are those your loss kept (its nonzero rows of ∂L/∂z),
        which the sampled loss kept in the backward."""
        if y is None:
            return
        want = self.loss.mask(y)
        want = None if want is None or bool(want.all()) else want
        got = None if p.kept is None or bool(p.kept.all()) else p.kept
        if (want is None) != (got is None) or (want is not None and not torch.equal(want, got)):
            raise ValueError("the loss terms the targets keep are not those your loss kept (its rows of dL/dz that "
                             "are not exactly zero), which the sampled-target pass of fisher='mc' kept in your "
                             "backward: make your loss ignore exactly the targets' ignored terms (ignore_index / "
                             "all-NaN rows), or use fisher='empirical'")

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "kind": "KFACPreconditioner", "layers": [l.name for l in self.layers],
            "ordered": self._ordered, "k": self.k, "damping": self.damping, "inverse_damping": self._gamma,
            "factors": None if self.factors is None else self.factors.state(),
            "inverse": inverse_state(self.inverse), "generator": self.generator.get_state(),
        }

    def _check_batch(self, inputs, targets: Optional[torch.Tensor]) -> int:
        """The rows m of a ``step(inputs, targets)`` batch, after the checks both
        ``capture="pass"`` preconditioners share."""
        m = batch_size(inputs, self.device)
        if m == 0:
            raise ValueError("empty batch: inputs has 0 rows")
        if self.fisher == "empirical" and targets is None:
            raise ValueError("fisher='empirical' needs the targets: step(inputs, targets)")
        if targets is not None and (targets.dim() == 0 or targets.shape[0] != m):
            raise ValueError(f"inputs has {m} rows but targets {tuple(targets.shape)[:1] or 'none (0-d)'}")
        return m

    def _load_layers_and_factors(self, state: dict) -> None:
        """The block order, k, γ and the running factors of a checkpoint (shared with the
        data-parallel subclass)."""
        by_name = {l.name: l for l in self.layers}
        if sorted(by_name) != sorted(state["layers"]):
            raise ValueError(f"state_dict is from a different model: layers {state['layers']} vs {sorted(by_name)}")
        self.layers = [by_name[n] for n in state["layers"]]
        self._ordered = state["ordered"]
        self.k = int(state["k"])
        self.damping = float(state["damping"])
        g = state.get("inverse_damping")  # absent before the damping warm-up: the inverse was built at γ
        self._gamma = float(g) if g is not None else (self.damping if state.get("factors") is not None else None)
        self.factors = None
        if state["factors"] is not None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.inverse_kind == "block_tridiagonal",
                                          max_block_dim=self.max_block_dim)
            self.factors.load(state["factors"])

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "KFACPreconditioner" or state.get("version") not in READABLE_VERSIONS:
            raise ValueError("not a KFACPreconditioner state_dict of this version")
        self._load_layers_and_factors(state)
        if self.factors is not None:
            self.inverse = load_inverse(self.inverse_kind, state["inverse"], self.factors.current, self.backend)
        self.generator.set_state(state["generator"])


STATE_KIND = "DistributedKFACPreconditioner"


def _all_finite(tensors) -> bool:
    """Whether every tensor is finite, with one host sync."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class DistributedKFACPreconditioner(KFACPreconditioner):
    """:class:`~kfac_fast.KFACPreconditioner` over the ranks of a ``torch.distributed`` group.

    Call :meth:`step` on every rank with that rank's batch shard, after ``loss.backward()``.
    Every argument of :class:`~kfac_fast.KFACPreconditioner` is accepted (keyword-only), plus:

    Args:
        model: the network, plain or wrapped in ``DistributedDataParallel`` (block names are
            the plain model's: ``model.0``, never ``model.module.0``).
        distributor: a :class:`~kfac_fast.distributed.Distributor` (default: a
            ``TorchDistributor`` over ``process_group`` when torch.distributed is initialised,
            else a ``LocalDistributor``).
        process_group: the group for the default distributor (None: the default group).
        mode: ``"replicate_inverses"`` (owners broadcast the inverses at each refresh, every
            rank preconditions every block) or ``"shard_inverses"`` (owners precondition their
            blocks, directions all-gathered every iteration).
        factor_reduce_every: reduce the factors every this many iterations (and always before
            a refresh and a checkpoint); with ``Tf > 1`` only statistics steps count, so keep
            it 1 or a multiple of Tf. The running averages are linear, so the factors at a
            reduction are the same (to rounding) whatever this is: between reductions each rank
            keeps its own ε-average of its own estimates; only the traffic changes.
        average_gradients: average every ``.grad`` over the ranks in :meth:`step` (default:
            True for a plain model, False for a DDP-wrapped one, which already did).
        seed: common seed of the per-rank generator streams (default: drawn from torch's
            global RNG on rank 0 and broadcast). Ignored when ``generator`` is given (which must
            then differ between ranks).
    """

    def __init__(self, model: nn.Module, *, loss: str, distributor: Optional[Distributor] = None,
                 process_group=None, mode: str = "replicate_inverses", factor_reduce_every: int = 1,
                 average_gradients: Optional[bool] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        self.mode = check_mode(mode)
        if not isinstance(factor_reduce_every, int) or factor_reduce_every < 1:
            raise ValueError(f"factor_reduce_every must be a positive integer, got {factor_reduce_every!r}")
        self.distributor = distributor if distributor is not None else default_distributor(process_group)
        self.factor_reduce_every = factor_reduce_every
        wrapped = isinstance(model, DistributedDataParallel)
        self.average_gradients = (not wrapped) if average_gradients is None else bool(average_gradients)
        inner = unwrap_model(model)
        d = self.distributor
        if generator is None:
            if seed is None:
                seed = common_seed(d)
            dev = next(inner.parameters()).device
            generator = rank_generator(seed, d.rank, dev)
        self.seed = seed
        if kwargs.get("capture", "pass") == "hooks":
            raise ValueError("capture='hooks' is not data-parallel yet: the statistics of the user's own passes "
                             "are not reduced over the ranks; use capture='pass' (the default) with "
                             "torch.distributed")
        super().__init__(inner, loss=loss, generator=generator, **kwargs)
        self.timer = PhaseTimer()
        self.inverse: Optional[ShardedInverse] = None
        self._synced = True  # the committed factors are the same on every rank

    # ------------------------------------------------------------------ the iteration
    def _new_inverse(self) -> ShardedInverse:
        def build(records, warm):
            # γ_k of this refresh (step) or of the saved inverse (load_state_dict)
            return build_block_inverse(self.inverse_kind, records, damping=self._gamma, backend=self.backend,
                                       warm_start=warm, factorization=self.factorization)

        return ShardedInverse(self.distributor, mode=self.mode, kind=self.inverse_kind, build=build,
                              backend=self.backend, timer=self.timer)

    def step(self, inputs, targets: Optional[torch.Tensor] = None) -> None:
        """Update the factors on (a τ₁ subset of) this rank's ``inputs``, reduce them over the
        ranks and precondition ``.grad`` in place, the same on every rank. A collective: every
        rank calls it once per iteration, with shards of equal size.

        Raises:
            FloatingPointError: the sampled-target pass met non-finite outputs on any rank (all
                ranks raise; nothing is committed).
        """
        d, t = self.distributor, self.timer
        m = self._check_batch(inputs, targets)
        for layer in self.layers:
            if any(p.grad is None for p in layer.params()):
                layer.grad_matrix()  # raises: backward was not called
        with t("gradient_start"):
            # local check before averaging (a NaN on this rank is a NaN in the mean); one sync
            local_ok = _all_finite(p.grad for l in self.layers for p in l.params())
            handle_g = None
            if self.average_gradients and d.world_size > 1:
                grads_all = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
                handle_g = d.start_all_reduce_mean(grads_all, kind="gradient")
        failure: Optional[BaseException] = None
        # Tf: statistics (and the factor reduction) on the first 3 steps and every Tf-th only; k is
        # the same on every rank, so all ranks skip together
        stats_step = self._statistics_step()
        if stats_step:
            with t("statistics"):
                size = max(1, int(round(self.tau1 * m)))
                idx = torch.randperm(m, generator=self.generator, device=self.device)[:size]
                x1 = select(inputs, idx)
                y1 = None if targets is None else targets.index_select(0, idx)
                try:
                    stats, rec = sampled_statistics(self.model, self.layers, x1, self.loss, fisher=self.fisher,
                                                    targets=y1, generator=self.generator)
                except NonFiniteOutputs as exc:
                    failure = exc
        with t("scalars"):
            # on the model's device: NCCL reduces CUDA tensors only
            flags = torch.tensor([float(failure is not None), float(not local_ok)], dtype=torch.float64,
                                 device=self.device)
            flags = d.reduce_scalars(flags, op="sum")
        if float(flags[0]) > 0:
            if handle_g is not None:
                handle_g.wait()
            if failure is not None:
                raise failure
            raise NonFiniteOutputs(f"the sampled-target pass met non-finite model outputs on {int(flags[0])} of "
                                   f"{d.world_size} ranks (not this one); the step is rejected on every rank")
        handle_f, refresh = None, False
        if stats_step:
            if not self._ordered:
                order = forward_order(self.layers, rec)
                self.layers = [self.layers[i] for i in order]
                stats = stats.permuted(order)
                self._ordered = True
            if self.factors is None:
                self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                              tridiagonal=self.inverse_kind == "block_tridiagonal",
                                              max_block_dim=self.max_block_dim)
            with t("factor_update"):
                self.factors.update(stats, eps=ema_decay(self.k, self.ema_max), backend=self.backend)
            refresh = self.inverse is None or self.k <= 3 or self.k % self.T3 == 0
            reduce = d.world_size > 1 and (refresh or self.k % self.factor_reduce_every == 0)
            with t("factor_start"):
                handle_f = d.start_reduce_factors(self.factors) if reduce else None
        with t("gradient_wait"):
            if handle_g is not None:
                handle_g.wait()
            # averaged gradients are the same on every rank, so is this check
            ok = float(flags[1]) == 0 and (handle_g is None or _all_finite(p.grad for l in self.layers
                                                                          for p in l.params()))
            grads = [l.grad_matrix() for l in self.layers]
        U = None
        if refresh:
            with t("factor_wait"):
                if handle_f is not None:
                    handle_f.wait()
                self.factors.commit()
            self._synced = True
            self._refresh_damping(self.inverse is None or self.k % self.T3 == 0)
            if self.inverse is None:
                self.inverse = self._new_inverse()
            self.inverse.refresh(snapshot(self.factors.current))
            if ok:
                U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
        else:
            if ok:  # overlapped with the factor reduction in flight
                U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
            if stats_step:
                with t("factor_wait"):
                    if handle_f is not None:
                        handle_f.wait()
                    self.factors.commit()
                self._synced = handle_f is not None or d.world_size == 1
        if U is None:
            # e.g. a GradScaler overflow step on any rank: leave .grad (non-finite) as it is
            self.k += 1
            return
        # the step-size rule reduces over U (norms, inner products): an owner's own direction and
        # the gathered copies elsewhere must have the same dtype and memory layout, or the sums'
        # rounding, and so the parameters, differ between ranks
        U = apply_step_size(self.step_size, grads, [u.to(g.dtype).contiguous() for u, g in zip(U, grads)])
        with t("write"):
            self._write_grads(U)
        self.k += 1

    # ------------------------------------------------------------------ checkpoints
    def sync_factors(self) -> None:
        """Average the committed factors over the ranks if iterations since the last reduction
        left them rank-local (``factor_reduce_every > 1``); a collective."""
        if self.factors is not None and not self._synced and self.distributor.world_size > 1:
            self.distributor.reduce_factors(self.factors, which="current")
        self._synced = True

    def state_dict(self) -> dict:
        """The whole state, on every rank (a collective: every rank calls it; save rank 0's).

        The factors are replicated (reduced first if needed) and the inverse is saved as the
        factor snapshot it was built from (also replicated), so nothing but the generator
        states needs gathering: ``"generators"`` holds every rank's, in rank order."""
        self.sync_factors()
        gens = self.distributor.all_gather_object(self.generator.get_state())
        inv = self.inverse
        return {
            "version": STATE_VERSION, "kind": STATE_KIND, "layers": [l.name for l in self.layers],
            "ordered": self._ordered, "k": self.k, "damping": self.damping, "inverse_damping": self._gamma,
            "factors": None if self.factors is None else self.factors.state(),
            "inverse_records": None if inv is None or inv.records is None else
            [record_to_dict(r) for r in inv.records],
            "generators": gens, "seed": self.seed, "world_size": self.distributor.world_size, "mode": self.mode,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on any world size (a collective when an inverse is rebuilt:
        every rank calls it with the same state). The refresh's assignment is recomputed for this
        world and every rank rebuilds its share of the inverse from the saved snapshot; each rank
        takes its own generator state when the world size is the one saved, else a fresh stream
        from the saved seed, the rank and the iteration."""
        if state.get("kind") != STATE_KIND or state.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a {STATE_KIND} state_dict of this version (got kind {state.get('kind')!r}); a "
                             "plain KFACPreconditioner state loads into KFACPreconditioner")
        self._load_layers_and_factors(state)
        self.inverse = None
        self._synced = True
        if state.get("inverse_records") is not None:
            if self.factors is None:
                raise ValueError("state_dict has an inverse but no factors")
            records = []
            for t, dct in zip(self.factors.current, state["inverse_records"]):
                if isinstance(t, BlockFisher):
                    records.append(BlockFisher(F=dct["F"].to(t.F.device, t.F.dtype), name=t.name, kind=t.kind))
                else:
                    def cv(v, like):
                        return None if v is None else factor_like(v, like).to(like.device, like.dtype)

                    records.append(KroneckerFactors(A=cv(dct["A"], t.A), G=cv(dct["G"], t.G),
                                                    A_next=cv(cross_factor_like(dct.get("A_next"), t.A_next), t.A_next),
                                                    G_next=cv(cross_factor_like(dct.get("G_next"), t.G_next), t.G_next),
                                                    name=t.name, homogeneous=t.homogeneous,
                                                    tied_partner=t.tied_partner, tied_owner=t.tied_owner))
            self.inverse = self._new_inverse()
            self.inverse.refresh(records)
        d = self.distributor
        gens = state.get("generators") or []
        if len(gens) == d.world_size:
            self.generator.set_state(gens[d.rank])
        elif self.seed is not None or state.get("seed") is not None:
            base = state.get("seed") if state.get("seed") is not None else self.seed
            self.generator.manual_seed(rank_seed(rank_seed(int(base), self.k), d.rank))
