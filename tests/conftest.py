"""Shared test set-up.

TRITON_INTERPRET must be set before anything imports triton, so it is set here (tests run
Triton kernels in the interpreter on CPU tensors unless a GPU is present and the caller
set TRITON_INTERPRET=0 explicitly).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_repo, ".cache", "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances per dtype for kernel-vs-reference comparisons: (rtol, atol).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
