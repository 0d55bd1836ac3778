"""K-FAC as a gradient preconditioner for people who keep their own optimizer.

Differences from :class:`kfac_fast.KFAC` (Algorithm 2):
  * no re-scaling by the exact Fisher, no momentum, no λ/γ adaptation: the damping γ is
    fixed (factored Tikhonov, Sec 6.3) and the step size is your optimizer's learning rate;
  * it works on the gradients you computed (``loss.backward()``) and replaces each layer's
    ``.grad`` in place by the corresponding block of F̆⁻¹∇ (or F̂⁻¹∇);
  * weight decay is your optimizer's business (applied after preconditioning).
Like KFAC it keeps running factor averages (Sec 5) and refreshes the inverse every T3 steps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._parts import default_factor_dtype, default_generator, model_device
from .checkpoint import READABLE_VERSIONS, STATE_VERSION
from .config import INVERSES, check_factorization
from .batch import batch_size, select
from .curvature.blocks import check_kfac_approx, check_unsupported, find_blocks
from .curvature.capture import forward_order
from .curvature.inverses import build_block_inverse, inverse_state, load_inverse, resolve_factorization
from .curvature.losses import get_loss
from .curvature.running import RunningFactors, ema_decay, snapshot
from .curvature.statistics import sampled_statistics

FISHERS = ("mc", "empirical")


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

    Args:
        model: any network (blocks as for :class:`kfac_fast.KFAC`).
        loss: predictive distribution the factors use (``"softmax_cross_entropy"``, ...).
        kfac_approx: ``"expand"`` or ``"reduce"`` (layers applied at R positions per example).
        unsupported: ``"skip"`` (default: parameters no Kronecker/norm block models keep the
            ``.grad`` you computed, for your optimizer as it is, as KAISA does), ``"diagonal"``
            (a diagonal Fisher block each) or ``"error"``.
        ignore_index: softmax targets equal to it are excluded (default −100); with
            ``fisher="mc"`` pass the targets to ``step`` so the sampled pass masks them too.
        ignore_nan_targets: the float losses' mask: terms whose targets are all NaN are excluded.
        damping: γ of the factored Tikhonov damping (Sec 6.3), > 0.
        fisher: ``"mc"`` (true Fisher, targets sampled from the model: one extra forward and
            backward on a τ₁ subset, Sec 5) or ``"empirical"`` (uses the given targets).
        inverse: ``"block_diagonal"`` or ``"block_tridiagonal"``.
        T3: inverse refresh period (also refreshed on the first 3 steps).
        tau1: fraction of the batch used for the factor statistics.
        ema_max: ε = min(1 − 1/k, ema_max).
        backend, generator, factor_dtype: as for :class:`kfac_fast.KFAC`.
        factorization: "auto" (Cholesky for block_diagonal unless backend="native"), "eigh" or
            "cholesky": how the damped factor inverses are computed at each refresh.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: str,
        damping: float = 1e-2,
        fisher: str = "mc",
        inverse: str = "block_diagonal",
        T3: int = 20,
        tau1: float = 1.0 / 8,
        ema_max: float = 0.95,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        factor_dtype: Optional[torch.dtype] = None,
        factorization: str = "auto",
        kfac_approx: str = "expand",
        unsupported: str = "skip",
        ignore_index: Optional[int] = -100,
        ignore_nan_targets: bool = False,
    ):
        check_factorization(factorization, inverse)
        if fisher not in FISHERS:
            raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHERS)}")
        if inverse not in INVERSES:
            raise ValueError(f"unknown inverse {inverse!r}; choose one of {', '.join(INVERSES)}")
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a positive finite number, got {damping}")
        if not isinstance(T3, int) or T3 < 1:
            raise ValueError(f"T3 must be a positive integer, got {T3!r}")
        if not 0 < tau1 <= 1:
            raise ValueError(f"tau1 must lie in (0, 1], got {tau1}")
        if not 0 <= ema_max < 1:
            raise ValueError(f"ema_max must lie in [0, 1), got {ema_max}")
        self.model = model
        self.loss = get_loss(loss, ignore_index=ignore_index, ignore_nan_targets=ignore_nan_targets)
        self.kfac_approx = check_kfac_approx(kfac_approx)
        self.unsupported = check_unsupported(unsupported)
        self.damping = float(damping)
        self.fisher = fisher
        self.inverse_kind = inverse
        self.T3, self.tau1, self.ema_max = T3, tau1, ema_max
        self.backend = backend
        self.factorization = resolve_factorization(factorization, inverse, backend)
        self.layers = find_blocks(model, kfac_approx=kfac_approx, unsupported=unsupported)
        self.device = model_device(self.layers)
        self.factor_dtype = factor_dtype or default_factor_dtype(self.layers)
        self.generator = generator if generator is not None else default_generator(self.device)
        self.k = 1
        self._ordered = False
        self.factors: Optional[RunningFactors] = None
        self.inverse = None

    def step(self, inputs, targets: Optional[torch.Tensor] = None) -> None:
        """Update the factors on (a τ₁ subset of) ``inputs`` and precondition ``.grad`` in place.

        Args:
            inputs: the batch whose gradients are in ``.grad``: a tensor, tuple/list
                (``model(*inputs)``) or dict (``model(**inputs)``), examples along dim 0.
            targets: needed for ``fisher="empirical"``; for ``"mc"`` optional (its ignored
                positions are then excluded from the sampled pass too).
        """
        m = batch_size(inputs, self.device)
        if m == 0:
            raise ValueError("empty batch: inputs has 0 rows")
        if self.fisher == "empirical" and targets is None:
            raise ValueError("fisher='empirical' needs the targets: step(inputs, targets)")
        if targets is not None and (targets.dim() == 0 or targets.shape[0] != m):
            raise ValueError(f"inputs has {m} rows but targets {tuple(targets.shape)[:1] or 'none (0-d)'}")
        grads = [l.grad_matrix() for l in self.layers]  # raises if backward was not called
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
        if self.factors is None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.inverse_kind == "block_tridiagonal")
        self.factors.update(stats, eps=ema_decay(self.k, self.ema_max), backend=self.backend)
        self.factors.commit()
        if self.inverse is None or self.k <= 3 or self.k % self.T3 == 0:
            self.inverse = build_block_inverse(self.inverse_kind, snapshot(self.factors.current), damping=self.damping,
                                         backend=self.backend, warm_start=self.inverse,
                                         factorization=self.factorization)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            # e.g. a GradScaler overflow step: leave .grad as it is so the scaler sees inf and skips
            self.k += 1
            return
        U = self.inverse.apply([g.to(self.factor_dtype) for g in grads])
        with torch.no_grad():
            for layer, u in zip(self.layers, U):
                for p, part in zip(layer.params(), layer.from_matrix(u)):
                    p.grad.copy_(part.to(p.dtype).reshape(p.shape))
        self.k += 1

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "kind": "KFACPreconditioner", "layers": [l.name for l in self.layers],
            "ordered": self._ordered, "k": self.k, "damping": self.damping,
            "factors": None if self.factors is None else self.factors.state(),
            "inverse": inverse_state(self.inverse), "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "KFACPreconditioner" or state.get("version") not in READABLE_VERSIONS:
            raise ValueError("not a KFACPreconditioner state_dict of this version")
        by_name = {l.name: l for l in self.layers}
        if sorted(by_name) != sorted(state["layers"]):
            raise ValueError(f"state_dict is from a different model: layers {state['layers']} vs {sorted(by_name)}")
        self.layers = [by_name[n] for n in state["layers"]]
        self._ordered = state["ordered"]
        self.k = int(state["k"])
        self.damping = float(state["damping"])
        self.factors = None
        if state["factors"] is not None:
            self.factors = RunningFactors(self.layers, dtype=self.factor_dtype, device=self.device,
                                          tridiagonal=self.inverse_kind == "block_tridiagonal")
            self.factors.load(state["factors"])
            self.inverse = load_inverse(self.inverse_kind, state["inverse"], self.factors.current, self.backend)
        self.generator.set_state(state["generator"])
