"""Lazy access to the compiled core ``kfac_fast._C``.

The native module is optional at run time: everything works with the plain-PyTorch
backend when it is missing. Code that needs it calls :func:`native`, which raises
:class:`NativeUnavailableError` with the cause and the fix.
"""
from __future__ import annotations

import importlib

# Must equal kfac_fast::kAbiVersion in csrc/include/kfac_fast/common.h.
EXPECTED_ABI_VERSION = 3


class NativeUnavailableError(RuntimeError):
    """The compiled module ``kfac_fast._C`` is missing, stale, or lacks CUDA."""


_LOADED: list = []


def _load():
    if not _LOADED:
        _LOADED.append(_import())
    return _LOADED[0]


def _import():
    try:
        mod = importlib.import_module("kfac_fast._C")
    except ImportError as exc:  # not built, or built for another Python
        return None, (
            f"kfac_fast._C is not importable ({exc}); reinstall with "
            "`pip install --no-build-isolation .` or run scripts/build_inplace.sh for a source checkout"
        )
    abi = getattr(mod, "ABI_VERSION", None)
    if abi != EXPECTED_ABI_VERSION:
        return None, (
            f"kfac_fast._C is stale (ABI {abi}, this Python code expects {EXPECTED_ABI_VERSION}); "
            "rebuild it: `pip install --no-build-isolation .` or scripts/build_inplace.sh"
        )
    return mod, ""


def native():
    """Return the compiled module or raise :class:`NativeUnavailableError` saying why."""
    mod, reason = _load()
    if mod is None:
        raise NativeUnavailableError(reason)
    return mod


def native_status() -> tuple[bool, str]:
    """(importable, one-line reason when not)."""
    mod, reason = _load()
    return mod is not None, reason


DTYPE_CODES = {"torch.float32": 0, "torch.float64": 1}


def dtype_code(t) -> int:
    """Native dtype code of a tensor (0 float32, 1 float64); raises for others."""
    code = DTYPE_CODES.get(str(t.dtype))
    if code is None:
        raise TypeError(f"native kernels take float32 or float64 tensors, got {t.dtype}; cast with .float()")
    return code


def cuda_stream_handle(t) -> int:
    """Integer handle of the current CUDA stream on ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.current_stream(t.device).cuda_stream)
