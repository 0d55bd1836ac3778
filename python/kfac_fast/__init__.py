"""kfac_fast: K-FAC (Martens & Grosse, 2015) with fast kernels.

Public surface:
    available_backends, use_backend      -- kernel backends (torch / triton / native)
    curvature                            -- Kronecker factors, block-diagonal and
                                            block-tridiagonal inverses, Appendix B
    linalg                               -- the eigendecomposition engine
    KFAC, KFACPreconditioner             -- optimizers (Algorithm 2; gradient preconditioner)
    register_block                       -- K-FAC for another module type (curvature.blocks)
    causal_lm_targets                    -- targets for a causal LM from Hugging Face-style labels
"""
from __future__ import annotations

import importlib

from .backends import BackendInfo, BackendUnavailableError, available_backends, use_backend
from ._native import NativeUnavailableError

__version__ = "0.1.0"

_LAZY = {
    "curvature": ".curvature",
    "linalg": ".linalg",
    "ops": ".ops",
    "KFAC": ".optimizer",
    "KFACPreconditioner": ".preconditioner",
    "register_block": ".curvature.blocks",
    "causal_lm_targets": ".curvature.losses",
    "CoverageWarning": "._parts",
    "DistributedKFACPreconditioner": ".preconditioner",
    "distributed": ".distributed",
}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name], __name__)
        value = mod if mod.__name__.rsplit(".", 1)[-1] == name else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kfac_fast' has no attribute {name!r}")


def build_info() -> dict:
    """How the native module was built: ``{"native": bool, "cuda": str, "cuda_archs": str}``."""
    try:
        from ._native import native

        mod = native()
        return {"native": True, "cuda": mod.cuda_version() or "none", "cuda_archs": mod.cuda_archs()}
    except NativeUnavailableError as exc:
        return {"native": False, "cuda": "none", "cuda_archs": "", "reason": str(exc)}


__all__ = [
    "BackendInfo",
    "BackendUnavailableError",
    "NativeUnavailableError",
    "available_backends",
    "use_backend",
    "build_info",
    "curvature",
    "linalg",
    "ops",
    "KFAC",
    "KFACPreconditioner",
    "register_block",
    "causal_lm_targets",
    "CoverageWarning",
    "DistributedKFACPreconditioner",
    "distributed",
]
