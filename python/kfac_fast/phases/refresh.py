"""Step 4 of Algorithm 2: the inverse refresh (Sec 4, 6.3, 8) at the current γ, with fallbacks.

``RefreshPhase`` is a mixin of :class:`kfac_fast.optimizer.KFAC`: the inverse it builds replaces
the optimizer's ``inverse`` only when the step commits (:mod:`kfac_fast.phases.commit`), the
previous inverse warm-starts the new one and is the fallback when a build fails, and
``load_state_dict`` rebuilds a sharded inverse through the same :meth:`RefreshPhase._build_inverse`.
It reads ``config``, ``backend``, ``dist``, ``distributed_mode``, ``factors``, ``inverse``,
``inverse_dtype``, ``compute_dtype``, ``gamma``, ``k`` and counts ``inverse_fallbacks``.
"""
from __future__ import annotations

import warnings

from ..curvature.inverses import build_block_inverse, resolve_factorization, warmup_rebuild
from ..curvature.running import snapshot
from ..distributed import ShardedInverse
from ..step_state import StepStats

__all__ = ["RefreshPhase"]


class RefreshPhase:
    """Step 4: a new damped inverse when k ≡ 0 (mod T3) or k ≤ 3, else the last one."""

    def _refresh_due(self) -> bool:
        """Sec 8: the inverse is rebuilt when k ≡ 0 (mod T3), in the first three iterations, and
        whenever there is none yet (on iterations 2 and 3 only its small blocks:
        :func:`~kfac_fast.curvature.inverses.warmup_rebuild`)."""
        return (self.k % self.config.T3 == 0) or self.k <= 3 or self.inverse is None

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

    def _build_inverse(self, records: list, gamma: float):
        """The inverse over ``records`` at γ: one process builds it whole; data-parallel with
        ``distributed_mode`` "replicate_inverses"/"shard_inverses" the blocks are built by
        their owners (greedy LPT on n³, :class:`kfac_fast.distributed.ShardedInverse`)."""
        fact = resolve_factorization(self.config.factorization, self.config.inverse, self.backend)
        kind = self.config.inverse

        def build(recs, warm, rebuild=None):
            return build_block_inverse(kind, recs, damping=gamma, backend=self.backend, warm_start=warm,
                                       factorization=fact, rebuild=rebuild)

        if self.dist.world_size == 1 or self.distributed_mode == "replicated_work":
            scheduled = self.inverse is None or self.k % self.config.T3 == 0
            return build(records, self.inverse, warmup_rebuild(records, self.k, scheduled=scheduled))
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
