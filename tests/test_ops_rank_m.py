"""rank_m_precondition (end of Sec 8): Triton vs reference and the dense
Ginv (Gmᵀ X̄) Ainv, plus the flop rule."""
import pytest
import torch

from _kernel_utils import assert_close_scaled, needs_compiled_triton, noncontig, spd
from kfac_fast.ops import rank_m_is_cheaper, rank_m_precondition
from kfac_fast.ops.rank_m import _rank_m_triton

# (d_out, d_in) per layer, homogeneous flags
LAYERS = [(7, 33), (33, 1), (1, 7), (130, 34)]
HOMOG = [True, False, True, True]


def _inputs(m, layers, hs, dtype=torch.float32, device="cpu"):
    X = [torch.randn(m, di, device=device).to(dtype) for _, di in layers]
    Gm = [torch.randn(m, do, device=device).to(dtype) for do, _ in layers]
    Ainv = [torch.linalg.inv(spd(di + h, device=device)).to(dtype) for (_, di), h in zip(layers, hs)]
    Ginv = [torch.linalg.inv(spd(do, device=device)).to(dtype) for do, _ in layers]
    return X, Gm, Ainv, Ginv


def _dense(x, g, a, gi, h, s):
    x = x.double()
    if h:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
    return s * gi.double() @ (g.double().T @ x) @ a.double()


@pytest.mark.parametrize("m", [1, 3, 257])
def test_matches_dense(m):
    X, Gm, Ainv, Ginv = _inputs(m, LAYERS, HOMOG)
    X[0] = noncontig(X[0])
    U = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=HOMOG, scale=1.0 / m, backend="triton")
    R = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=HOMOG, scale=1.0 / m, backend="torch")
    for u, r, x, g, a, gi, h in zip(U, R, X, Gm, Ainv, Ginv, HOMOG):
        assert u.shape == (g.shape[1], a.shape[0])
        assert_close_scaled(u, r, torch.float32)
        assert_close_scaled(u, _dense(x, g, a, gi, h, 1.0 / m), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype):
    X, Gm, Ainv, Ginv = _inputs(3, LAYERS, HOMOG, dtype)
    U = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=HOMOG, scale=[1.0, 0.5, 2.0, 1.0], backend="triton")
    R = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=HOMOG, scale=[1.0, 0.5, 2.0, 1.0], backend="torch")
    for u, r in zip(U, R):
        assert u.dtype == dtype
        assert_close_scaled(u, r.float(), dtype)


def test_flop_rule():
    assert rank_m_is_cheaper(1, 1000, 785)
    assert rank_m_is_cheaper(128, 1000, 785)
    assert not rank_m_is_cheaper(1024, 1000, 785)
    assert not rank_m_is_cheaper(513, 512, 513)
    assert rank_m_is_cheaper(511, 512, 512)
    assert not rank_m_is_cheaper(512, 512, 512)


def test_errors():
    X, Gm, Ainv, Ginv = _inputs(3, [(4, 5)], [True])
    with pytest.raises(ValueError, match="Ainv must be \\(5, 5\\)"):
        rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=False, scale=1.0)
    with pytest.raises(ValueError, match="same m"):
        rank_m_precondition(X, [torch.randn(2, 4)], Ainv, Ginv, homogeneous=True, scale=1.0)
    with pytest.raises(TypeError, match="float32"):
        rank_m_precondition([X[0].double()], Gm, Ainv, Ginv, homogeneous=True, scale=1.0, backend="triton")


def test_opcheck():
    X, Gm, Ainv, Ginv = _inputs(3, [(4, 5), (2, 1)], [True, False])
    torch.library.opcheck(_rank_m_triton, (X, Gm, Ainv, Ginv, [True, False], [0.5, 1.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 128])
def test_matches_reference_cuda(m):
    needs_compiled_triton()
    layers = [(1000, 784), (500, 1000), (250, 500), (30, 250), (784, 1000)]
    hs = [True] * len(layers)
    X, Gm, Ainv, Ginv = _inputs(m, layers, hs, device="cuda")
    U = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=hs, scale=1.0 / m, backend="triton")
    R = rank_m_precondition(X, Gm, Ainv, Ginv, homogeneous=hs, scale=1.0 / m, backend="torch")
    for u, r in zip(U, R):
        assert_close_scaled(u, r, torch.float32, factor=10.0 if torch.backends.cuda.matmul.allow_tf32 else 1.0)
