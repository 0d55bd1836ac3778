"""Kernel backends: which can run here, and how a caller picks one.

Three backends implement every kernel family:

``torch``
    Plain PyTorch. Always available; the ground truth in tests and the baseline in benchmarks.
``triton``
    Triton kernels. Needs Triton and either a CUDA device or ``TRITON_INTERPRET=1``
    (the interpreter, which runs the kernels on CPU tensors: slow, for testing).
``native``
    The compiled ``kfac_fast._C`` module (C++ threads on CPU, CUDA when built with nvcc).

Every public object that runs kernels takes ``backend="auto"|"torch"|"triton"|"native"``.
``auto`` first honours an enclosing :func:`use_backend` block, then picks per device and
per kernel family the fastest correct backend *as measured by our benchmarks* (see
``_AUTO_PREFERENCE``): plain PyTorch on CPU and CUDA unless a kernel was measured faster.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from ._native import native_status

BACKENDS = ("torch", "triton", "native")
_CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


@dataclass(frozen=True)
class BackendInfo:
    """Whether one backend can run, and why not (one line) when it cannot."""

    name: str
    available: bool
    reason: str = ""
    detail: str = ""

    def __str__(self) -> str:
        if self.available:
            return f"{self.name}: available" + (f" ({self.detail})" if self.detail else "")
        return f"{self.name}: unavailable ({self.reason})"


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status() -> BackendInfo:
    if "triton" not in _STATUS_CACHE:
        _STATUS_CACHE["triton"] = _probe_triton()
    return _STATUS_CACHE["triton"]


def _native_status() -> BackendInfo:
    if "native" not in _STATUS_CACHE:
        _STATUS_CACHE["native"] = _probe_native()
    return _STATUS_CACHE["native"]


# Plain dict (not lru_cache) so torch.compile traces the lookups without warnings.
_STATUS_CACHE: dict[str, BackendInfo] = {}


def _probe_triton() -> BackendInfo:
    if importlib.util.find_spec("triton") is None:
        return BackendInfo("triton", False, "triton is not installed; `pip install 'kfac_fast[triton]'` (Linux)")
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return BackendInfo("triton", False, f"import triton failed: {exc}")
    version = getattr(triton, "__version__", "?")
    if triton_interpret():
        return BackendInfo("triton", True, detail=f"triton {version}, interpreter (TRITON_INTERPRET=1), CPU tensors")
    if _torch_cuda_available():
        return BackendInfo("triton", True, detail=f"triton {version}, CUDA")
    return BackendInfo(
        "triton", False, "no CUDA device; set TRITON_INTERPRET=1 before importing triton to run the interpreter on CPU"
    )


def _probe_native() -> BackendInfo:
    ok, reason = native_status()
    if not ok:
        return BackendInfo("native", False, reason)
    from ._native import native

    mod = native()
    if mod.built_with_cuda():
        detail = f"C++ CPU + CUDA {mod.cuda_version()} (sm {mod.cuda_archs()})"
    else:
        detail = "C++ CPU only (built without CUDA)"
    return BackendInfo("native", True, detail=detail)


def available_backends() -> dict[str, BackendInfo]:
    """Report which backends can run here.

    Returns:
        ``{"torch": BackendInfo, "triton": BackendInfo, "native": BackendInfo}``; each has
        ``available`` and, when unavailable, a one-line ``reason`` with the fix.
    """
    return {
        "torch": BackendInfo("torch", True, detail="plain PyTorch reference"),
        "triton": _triton_status(),
        "native": _native_status(),
    }


def native_has_cuda() -> bool:
    info = _native_status()
    if not info.available:
        return False
    from ._native import native

    return bool(native().built_with_cuda())


_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("kfac_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every ``backend="auto"`` kernel inside the block on backend ``name``.

    Example::

        with kfac_fast.use_backend("torch"):
            opt.step(x, y)

    Raises:
        ValueError: unknown name. BackendUnavailableError: the backend cannot run here.
    """
    _validate_name(name)
    if name != "auto":
        check_available(name)
    token = _override.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _override.reset(token)


def _validate_name(name: str) -> None:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")


def check_available(name: str) -> None:
    """Raise :class:`BackendUnavailableError` (with the reason) if ``name`` cannot run."""
    info = available_backends()[name]
    if not info.available:
        raise BackendUnavailableError(f"backend {name!r} was requested but cannot run: {info.reason}")


# Measured preferences for backend="auto": (kernel family, device type) -> ordered candidates.
# Only entries backed by a benchmark in benchmarks/results/ belong here; everything else
# falls back to the default rule in resolve_backend.
# ("eigh", "cpu") stays torch: benchmarks/results/eigh_cpu.csv shows the native Jacobi engine
# faster only for sets of small factors (n <= 64) and several times slower on the large factors
# that dominate a K-FAC refresh (mnist_ae, resnet_like), even warm-started.
# CUDA stays torch too: benchmarks/results/kernels_cuda_fp32.csv (H100, 2026-11-28) has the
# grouped Triton kernels at 0.15-0.93x of cuBLAS through torch for every family in fp32
# (e.g. eigen_precondition 0.46-0.63x, cross_factor_update 0.15-0.64x), and the whole K-FAC
# step with backend="triton" slower than with "torch" (step_cuda.csv). The native CUDA Jacobi
# eigensolver is faster than cuSOLVER only for sets of small matrices (n <= 64, cold) and
# 100x slower on the MNIST autoencoder's factors (eigh_cuda.csv).
_AUTO_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {}


def resolve_backend(requested: str, device_type: str, *, family: str = "generic") -> str:
    """Turn ``requested`` into a concrete backend for tensors on ``device_type``.

    ``requested`` other than ``"auto"`` is validated and returned (raising when it cannot
    run, or when ``triton`` is asked for CPU tensors without the interpreter).
    ``"auto"``: an enclosing :func:`use_backend` wins; else the measured preference for
    ``(family, device_type)``; else ``torch`` (the kernel backends are opt-in until a benchmark
    shows them faster: see ``_AUTO_PREFERENCE``).
    """
    _validate_name(requested)
    if requested == "auto":
        forced = _override.get()
        if forced is not None:
            requested = forced
        else:
            status = available_backends()
            for cand in _AUTO_PREFERENCE.get((family, device_type), ()):
                if status[cand].available and _can_run_on(cand, device_type):
                    return cand
            return "torch"
    check_available(requested)
    if not _can_run_on(requested, device_type):
        if requested == "triton":
            raise BackendUnavailableError(
                "backend 'triton' got CPU tensors but Triton runs them only in the interpreter; "
                "set TRITON_INTERPRET=1 before importing triton, or move the tensors to CUDA"
            )
        raise BackendUnavailableError(
            "backend 'native' got CUDA tensors but kfac_fast._C was built without CUDA; "
            "rebuild with nvcc on PATH (KFAC_FAST_CUDA=ON)"
        )
    return requested


def _can_run_on(backend: str, device_type: str) -> bool:
    if backend == "triton":
        return device_type == "cuda" or triton_interpret()
    if backend == "native":
        return device_type == "cpu" or (device_type == "cuda" and native_has_cuda())
    return True
