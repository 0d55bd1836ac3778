"""Whole-model agreement of the backends: curvature blocks and K-FAC trajectories."""
import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast import KFAC
from kfac_fast.curvature import BlockDiagonal, BlockTridiagonal, kronecker_factors

from dense import mlp

BACKENDS = [b for b in ("triton", "native") if kfac_fast.available_backends()[b].available]


def _fp32_problem(seed=0):
    model = mlp([7, 9, 5, 3], nn.Tanh, seed=seed, dtype=torch.float32)
    x = torch.randn(33, 7, generator=torch.Generator().manual_seed(seed))
    fac = kronecker_factors(model, x, "softmax_cross_entropy", fisher="exact", tridiagonal=True)
    V = [torch.randn(f.G.shape[0], f.A.shape[0], generator=torch.Generator().manual_seed(i)) for i, f in enumerate(fac)]
    return fac, V


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [BlockDiagonal, BlockTridiagonal])
def test_curvature_blocks_agree_with_torch(backend, cls):
    fac, V = _fp32_problem()
    ref = cls(fac, damping=0.05, backend="torch").apply(V)
    got = cls(fac, damping=0.05, backend=backend).apply(V)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_damping_and_rank_m_agree_with_torch(backend):
    fac, V = _fp32_problem(1)
    for kw in ({"exact_damping": True},):
        ref = BlockDiagonal(fac, damping=0.3, backend="torch", **kw).apply(V)
        got = BlockDiagonal(fac, damping=0.3, backend=backend, **kw).apply(V)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-4)
    m = 4
    X = [torch.randn(m, f.A.shape[0] - 1) for f in fac]
    Gm = [torch.randn(m, f.G.shape[0]) for f in fac]
    ref = BlockDiagonal(fac, damping=0.3, backend="torch").apply_per_example(X, Gm, scale=1 / m, rank_m=True)
    got = BlockDiagonal(fac, damping=0.3, backend=backend).apply_per_example(X, Gm, scale=1 / m, rank_m=True)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
def test_kfac_trajectories_agree(backend, inverse):
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(3))
    y = torch.rand(48, 6, generator=torch.Generator().manual_seed(4))

    def run(b):
        model = mlp([6, 8, 4, 6], nn.Sigmoid, seed=2, dtype=torch.float32)
        opt = KFAC(model, loss="sigmoid_cross_entropy", inverse=inverse, backend=b, T3=2, T2=2,
                   generator=torch.Generator().manual_seed(0))
        return [opt.step(x, y)["loss"] for _ in range(5)], [p.detach() for p in model.parameters()]

    ref_loss, ref_p = run("torch")
    loss, p = run(backend)
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    for a, b in zip(p, ref_p):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-4)
