"""What ``KFAC`` and ``KFACPreconditioner`` set up the same way (written once): the device and
default factor dtype of a layer set, the default RNG, the coverage summary and the byte counts
of their state."""
from __future__ import annotations

from typing import Sequence

import torch

from .curvature.blocks import CurvatureBlock
from .curvature.coverage import diagonal_factors_note


def _first_param(blocks: Sequence[CurvatureBlock]) -> torch.nn.Parameter:
    """The first parameter a block owns (a tied embedding owns none: :mod:`.curvature.blocks.tied`)."""
    return next(p for b in blocks for p in b.params())


def model_device(blocks: Sequence[CurvatureBlock]) -> torch.device:
    return _first_param(blocks).device


def default_factor_dtype(blocks: Sequence[CurvatureBlock]) -> torch.dtype:
    """float64 factors for a float64 model, float32 otherwise."""
    return torch.float64 if _first_param(blocks).dtype == torch.float64 else torch.float32


def default_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from torch's global RNG (``torch.manual_seed`` makes runs
    reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
    return generator


def tensors_in(obj, depth: int = 0) -> list[torch.Tensor]:
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
    return [t for it in items for t in tensors_in(it, depth + 1)]


def state_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


class CoverageWarning(UserWarning):
    """Less than :data:`COVERAGE_WARN_BELOW` of the trainable parameters have Kronecker blocks."""


#: the Kronecker fraction under which constructing ``KFAC`` / ``KFACPreconditioner`` warns once
COVERAGE_WARN_BELOW = 0.9


def warn_low_coverage(cov, owner: str, var: str) -> None:
    """One :class:`CoverageWarning` line when ``cov`` (a :class:`~kfac_fast.curvature.Coverage`)
    puts less than 90% of the trainable parameters in Kronecker blocks, naming the largest
    parameters left out and why. Silence it with ``warnings.filterwarnings("ignore",
    category=kfac_fast.CoverageWarning)``; ``unsupported="error"`` refuses such models instead."""
    if cov.trainable == 0 or cov.kronecker_fraction >= COVERAGE_WARN_BELOW:
        return
    import warnings

    out = sorted((e for e in cov.entries if e.kind in ("diagonal", "skipped")), key=lambda e: -e.params)
    shown = "; ".join(f"{e.name} ({e.kind}, {e.params} params: {e.reason})" for e in out[:3])
    more = f"; and {len(out) - 3} more" if len(out) > 3 else ""
    warnings.warn(f"{owner}: {cov.kronecker_fraction:.1%} of {cov.trainable} trainable parameters have Kronecker "
                  f"blocks (scale-shift {cov.count('scale-shift')}, dense {cov.count('dense')}, diagonal "
                  f"{cov.count('diagonal')}, skipped {cov.count('skipped')}). Largest left out: {shown}{more}. "
                  f"print({var}.coverage()) lists every block", CoverageWarning, stacklevel=3)


class MemoryReport(dict):
    """``memory_report()``'s bytes by kind (a ``dict[str, int]``), with ``diagonal_factors``:
    per Kronecker block whose Ā or G the ``max_block_dim`` bound keeps as a diagonal, which and
    why (e.g. ``{"model.head": "G diagonal: 50257 > max_block_dim=4096"}``)."""

    def __init__(self, sizes: dict, diagonal_factors: dict):
        super().__init__(sizes)
        self.diagonal_factors = dict(diagonal_factors)


def memory_report_of(sizes: dict, layers, max_block_dim) -> MemoryReport:
    """A :class:`MemoryReport` of ``sizes`` with the diagonal-factor notes of ``layers``."""
    notes = {l.name: diagonal_factors_note(l, max_block_dim) for l in layers}
    return MemoryReport(sizes, {n: v for n, v in notes.items() if v})
