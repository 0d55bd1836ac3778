"""The CUDA half of kfac_fast._C where there is no GPU: the module loads, says whether CUDA is
compiled in, and its CUDA entry points fail with the driver's reason instead of crashing.

_C links no CUDA library: the kernels are embedded fatbins launched through the driver API, and
libcuda.so.1 is opened (dlopen) at the first CUDA op. On the GPU machine the same entry points
run the kernels (tests marked gpu in test_native_symmetrize.py and test_linalg_eigh.py).
"""
import re

import pytest
import torch

from kfac_fast._native import native

pytestmark = pytest.mark.native

REASONS = ("no NVIDIA driver: cannot load libcuda.so.1", "cuInit failed", "libcuda.so.1 lacks")


def test_driver_status_is_a_device_count_or_a_reason():
    mod = native()
    status = mod.cuda_driver_status()
    if not mod.built_with_cuda():
        assert status == "built without CUDA"
        return
    assert re.fullmatch(r"driver \d+\.\d+, \d+ device\(s\)", status) or status.startswith(REASONS), status
    assert mod.cuda_driver_status() == status  # loaded once


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present (the gpu tests run the kernels)")
def test_cuda_entry_points_without_a_device_raise_the_reason():
    mod = native()
    status = mod.cuda_driver_status()
    calls = {
        "symmetrize_cuda": lambda: mod.symmetrize_cuda(1, 1, 1, 2, 0, 0),
        "eigh_jacobi_cuda": lambda: mod.eigh_jacobi_cuda([1], [1], [2], 1e-9, 10, 0),
    }
    for name, call in calls.items():
        with pytest.raises(mod.NativeError) as info:
            call()
        message = str(info.value)
        if not mod.built_with_cuda():
            assert "has no CUDA code" in message, (name, message)
        elif "device(s)" not in status:  # no usable driver: the same reason as the status
            assert status in message, (name, message, status)
    # Nothing to do: no driver needed.
    if mod.built_with_cuda():
        assert mod.symmetrize_cuda(0, 0, 0, 5, 0, 0) is None
        assert mod.eigh_jacobi_cuda([], [], [], 1e-9, 10, 0) == []


_MOCK_RUN = r'''
import ctypes, sys
import torch
from kfac_fast._native import native

C = native()
print("status:", C.cuda_driver_status())
assert C.cuda_driver_status() == "driver 13.0, 1 device(s)", C.cuda_driver_status()
torch.manual_seed(0)
for dtype, code in ((torch.float32, 0), (torch.float64, 1)):
    A = torch.randn(3, 33, 33, dtype=dtype)
    out = torch.full_like(A, float("nan"))
    assert C.symmetrize_cuda(A.data_ptr(), out.data_ptr(), 3, 33, code, 0x1234) is None
    torch.testing.assert_close(out, (A + A.mT) / 2, rtol=0, atol=0)
sizes = [5, 70, 1, 0]
B = [torch.randn(n, n, dtype=torch.float64) for n in sizes]
V = [torch.eye(n, dtype=torch.float64) for n in sizes]
sweeps = C.eigh_jacobi_cuda([b.data_ptr() if n else 0 for b, n in zip(B, sizes)],
                            [v.data_ptr() if n else 0 for v, n in zip(V, sizes)], sizes, 1e-9, 33, 0x77)
assert sweeps == sizes, sweeps
try:
    C.eigh_jacobi_cuda([B[0].data_ptr(), B[1].data_ptr()], [V[0].data_ptr(), V[1].data_ptr()], [5, 13], 1e-9, 7, 0)
    raise AssertionError("no error for the unconverged matrix")
except C.NativeError as exc:
    assert "matrix 1 (size 13)" in str(exc) and "max_sweeps=7" in str(exc), exc
try:
    C.symmetrize_cuda(0, 0, 1, 4, 0, 0)  # the driver cannot place a null pointer
    raise AssertionError("no error for a null pointer")
except C.NativeError as exc:
    assert "CUDA_ERROR_INVALID_VALUE" in str(exc), exc
stats = (ctypes.c_longlong * 10)()
ctypes.CDLL("libcuda.so.1").mock_stats(stats)
push, pop, loads, launches, allocs, frees, bad, stream, max_sweeps = stats[:9]
tol = ctypes.cast(ctypes.byref(stats, 9 * 8), ctypes.POINTER(ctypes.c_double))[0]
assert (loads, launches, bad) == (2, 4, 0), list(stats)  # one module load per fatbin, then cached
assert push == pop and allocs == frees == 2, list(stats)
assert (stream, max_sweeps, tol) == (0, 7, 1e-9), list(stats)
print("mock driver: ok")
'''


def test_launch_code_against_a_mock_driver(tmp_path):
    """The host side of the CUDA path (driver loading, context push/pop, module cache, argument
    marshalling, launch shapes, copies, error reporting) against tests/data/mock_libcuda.c, a
    libcuda.so.1 that runs host versions of the kernels: what can be checked without a GPU."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    mod = native()
    if not mod.built_with_cuda():
        pytest.skip("native module built without CUDA")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the mock driver")
    src = Path(__file__).parent / "data" / "mock_libcuda.c"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "libcuda.so.1"), str(src)], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{tmp_path}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same kfac_fast as this process
    run = subprocess.run([sys.executable, "-c", _MOCK_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mock driver: ok" in run.stdout
