"""The trivial native op through its custom op: eager, opcheck, torch.compile."""
import pytest
import torch

import kfac_fast
from kfac_fast.ops import symmetrize, symmetrize_ref
from kfac_fast.ops.symmetrize import _symmetrize_native

pytestmark = pytest.mark.native


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (3, 33, 33), (2, 2, 5, 5), (0, 4, 4)])
def test_native_symmetrize_matches_reference(dtype, shape):
    A = torch.randn(shape, dtype=dtype)
    out = symmetrize(A, backend="native")
    torch.testing.assert_close(out, symmetrize_ref(A), rtol=0, atol=0)
    if A.numel():
        torch.testing.assert_close(out, out.transpose(-1, -2), rtol=0, atol=0)


def test_native_symmetrize_non_contiguous_input():
    A = torch.randn(9, 9, dtype=torch.float64).t()[1:8, 1:8]
    assert not A.is_contiguous()
    torch.testing.assert_close(symmetrize(A, backend="native"), symmetrize_ref(A))


def test_native_symmetrize_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        symmetrize(torch.randn(3, 4), backend="native")
    with pytest.raises(TypeError, match="float32 or float64"):
        symmetrize(torch.randn(3, 3).half(), backend="native")


def test_opcheck():
    A = torch.randn(4, 6, 6)
    torch.library.opcheck(_symmetrize_native, (A,))


@pytest.mark.heavy  # torch.compile: about 15 s on a quiet 2-core machine
def test_under_torch_compile():
    A = torch.randn(2, 5, 5, dtype=torch.float64)

    def f(x):
        return symmetrize(x * 3.0, backend="native").sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(A), symmetrize_ref(A * 3.0).sum(-1))


@pytest.mark.gpu
def test_native_symmetrize_cuda():
    if not kfac_fast.build_info()["cuda"] or kfac_fast.build_info()["cuda"] == "none":
        pytest.skip("native module built without CUDA")
    A = torch.randn(3, 130, 130, device="cuda")
    torch.testing.assert_close(symmetrize(A, backend="native"), symmetrize_ref(A))
