"""Steps 1-3 of Algorithm 2 (Sec 5, 9): the gradient pass, the sampled-target statistics, the factor update.

``StatisticsPhase`` is a mixin of :class:`kfac_fast.optimizer.KFAC`, not a part with its own
state: the first gradient pass reorders the optimizer's ``layers`` (forward order) and rebuilds
its running factors, and the τ₁ = 1 path hands the gradient pass's graph (``_reuse``) to the
statistics backward; the subsets S₁ and the sampled targets draw from the optimizer's one
generator, in an order that is part of the trajectory. It reads ``model``, ``loss``, ``config``,
``dist``, ``generator``, ``inverse_dtype``, ``k`` and the helpers ``_params``, ``_l2``, ``_subset``,
``_examples_for``, ``_ensure_state``, ``_phase`` of ``KFAC``; it writes ``layers``, ``_ordered``,
``_terms_per_example``, ``_reuse`` and the pending running factors.
"""
from __future__ import annotations

import math

import torch

from ..batch import batch_size, call, select
from ..curvature.capture import capture, forward_order
from ..curvature.losses import check_output
from ..curvature.running import ema_decay
from ..curvature.statistics import finite_flags, sampled_statistics

__all__ = ["StatisticsPhase"]


class StatisticsPhase:
    """Steps 1-3: ∇h on S' as per-layer blocks V_i, the statistics on S₁ and the running factors."""

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
        from ..curvature.losses import sample_targets
        from ..curvature.statistics import block_rows, statistics_grads

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
