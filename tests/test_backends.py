import pytest

import kfac_fast
from kfac_fast.backends import BackendUnavailableError, resolve_backend


def test_available_backends_reports_all_three():
    status = kfac_fast.available_backends()
    assert set(status) == {"torch", "triton", "native"}
    assert status["torch"].available
    for info in status.values():
        assert info.available or info.reason, f"{info.name} unavailable without a reason"


def test_native_and_triton_available_in_test_environment():
    # The test command builds _C (with CUDA when nvcc exists) and runs Triton in the interpreter.
    status = kfac_fast.available_backends()
    assert status["native"].available, status["native"].reason
    assert status["triton"].available, status["triton"].reason


def test_use_backend_overrides_auto_and_restores():
    assert resolve_backend("auto", "cpu") == "torch"
    with kfac_fast.use_backend("native"):
        assert resolve_backend("auto", "cpu") == "native"
        # an explicit request still wins over the context
        assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with kfac_fast.use_backend("fast"):
            pass


def test_unavailable_backend_raises_with_reason(monkeypatch):
    from kfac_fast import backends

    monkeypatch.setitem(backends._STATUS_CACHE, "native", backends.BackendInfo("native", False, "not built (test)"))
    with pytest.raises(BackendUnavailableError, match="not built \\(test\\)"):
        resolve_backend("native", "cpu")
    with pytest.raises(BackendUnavailableError):
        with kfac_fast.use_backend("native"):
            pass


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")


def test_stale_native_module_message(monkeypatch):
    from kfac_fast import _native

    class Fake:
        ABI_VERSION = -1

    monkeypatch.setattr(_native.importlib, "import_module", lambda name: Fake())
    mod, reason = _native._import()
    assert mod is None and "stale" in reason and "rebuild" in reason


def test_build_info_mentions_cuda():
    info = kfac_fast.build_info()
    assert info["native"]
    assert "cuda" in info
