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
