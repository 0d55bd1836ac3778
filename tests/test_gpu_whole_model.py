"""Whole K-FAC runs on a CUDA device: every backend against the torch backend, CUDA against CPU,
checkpoints, the preconditioner, low precision. Skipped where no GPU exists (CI); run on the
GPU machine with ``TRITON_INTERPRET=0 pytest -m gpu``.
"""
import io

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast import KFAC, KFACPreconditioner

from dense import mlp

pytestmark = pytest.mark.gpu

SIZES = [40, 70, 33, 9, 33, 40]  # odd sizes: no dimension is a multiple of a tile


def _backends():
    st = kfac_fast.available_backends()
    return [b for b in ("triton", "native", "auto") if b == "auto" or st[b].available]


def _data(device, m=96):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(m, SIZES[0], generator=g)
    return x.to(device), x.round().to(device)


def _run(device, backend, inverse, steps=8, **kw):
    torch.manual_seed(0)
    model = mlp(SIZES, nn.Sigmoid, seed=2, dtype=torch.float32).to(device)
    opt = KFAC(model, loss="sigmoid_cross_entropy", inverse=inverse, backend=backend, T3=3, T2=3, T1=2,
               generator=torch.Generator(device=device).manual_seed(0), **kw)
    x, y = _data(device)
    stats = [opt.step(x, y) for _ in range(steps)]
    return stats, [p.detach().cpu() for p in model.parameters()], opt


@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
def test_cuda_torch_backend_matches_cpu(inverse):
    # CUDA and CPU generators draw different τ1/τ2 subsets and sampled targets, so the runs are
    # not identical: the first loss (same θ₀, same batch) must agree, and both must make progress.
    st_cpu, _, _ = _run("cpu", "torch", inverse)
    st_gpu, _, _ = _run("cuda", "torch", inverse)
    assert all(not s["rejected"] for s in st_gpu)
    assert st_gpu[0]["loss"] == pytest.approx(st_cpu[0]["loss"], rel=1e-5)  # same θ₀, same batch
    assert st_gpu[-1]["loss"] < st_gpu[0]["loss"]
    assert st_gpu[-1]["loss"] == pytest.approx(st_cpu[-1]["loss"], rel=0.25)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
def test_cuda_backends_agree_with_torch(backend, inverse):
    ref_st, ref_p, _ = _run("cuda", "torch", inverse)
    st, p, _ = _run("cuda", backend, inverse)
    assert [s["loss"] for s in st] == pytest.approx([s["loss"] for s in ref_st], rel=2e-3)
    tol = 10.0 if torch.backends.cuda.matmul.allow_tf32 else 1.0
    for a, b in zip(p, ref_p):
        torch.testing.assert_close(a, b, rtol=5e-3 * tol, atol=5e-4 * tol)


def test_cuda_curvature_blocks_match_cpu():
    from kfac_fast.curvature import BlockDiagonal, BlockTridiagonal, kronecker_factors

    model = mlp([7, 9, 5, 3], nn.Tanh, seed=0, dtype=torch.float64)
    x = torch.randn(33, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fac = kronecker_factors(model, x, "softmax_cross_entropy", fisher="exact", tridiagonal=True)
    fac_gpu = kronecker_factors(model.cuda(), x.cuda(), "softmax_cross_entropy", fisher="exact", tridiagonal=True)
    V = [torch.randn(f.G.shape[0], f.A.shape[0], dtype=torch.float64) for f in fac]
    for cls in (BlockDiagonal, BlockTridiagonal):
        for backend in ("torch", "native"):
            if not kfac_fast.available_backends()[backend].available:
                continue
            ref = cls(fac, damping=0.05, backend="torch").apply(V)
            got = cls(fac_gpu, damping=0.05, backend=backend).apply([v.cuda() for v in V])
            for r, g in zip(ref, got):
                assert g.is_cuda
                torch.testing.assert_close(g.cpu(), r, rtol=1e-8, atol=1e-10)


def test_cuda_checkpoint_resumes_same_trajectory():
    _, _, opt = _run("cuda", "torch", "block_diagonal", steps=4)
    model = opt.model
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    x, y = _data("cuda")
    cont = [opt.step(x, y)["loss"] for _ in range(3)]
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = mlp(SIZES, nn.Sigmoid, seed=5, dtype=torch.float32).cuda()
    model2.load_state_dict(ck["model"])
    opt2 = KFAC(model2, loss="sigmoid_cross_entropy", backend="torch", T3=3, T2=3, T1=2)
    opt2.load_state_dict(ck["opt"])
    again = [opt2.step(x, y)["loss"] for _ in range(3)]
    assert again == pytest.approx(cont, rel=1e-6)


def test_cuda_preconditioner_and_profile():
    model = mlp(SIZES, nn.Sigmoid, seed=2, dtype=torch.float32).cuda()
    pre = KFACPreconditioner(model, loss="sigmoid_cross_entropy", damping=1e-2, T3=2,
                             generator=torch.Generator(device="cuda").manual_seed(0))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data("cuda")
    losses = []
    for _ in range(6):
        sgd.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / x.shape[0]
        loss.backward()
        pre.step(x)
        assert all(p.grad.is_cuda and torch.isfinite(p.grad).all() for p in model.parameters())
        sgd.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    st, _, _ = _run("cuda", "auto", "block_diagonal", steps=3, profile=True)
    assert set(st[-1]["phases"]) >= {"1-2 gradient", "6 precondition", "7 fisher quadratic"}


def test_cuda_bf16_autocast_steps():
    torch.manual_seed(0)
    model = mlp(SIZES, nn.Sigmoid, seed=2, dtype=torch.float32).cuda()
    opt = KFAC(model, loss="sigmoid_cross_entropy", backend="auto", T3=3, T2=3, T1=2,
               generator=torch.Generator(device="cuda").manual_seed(0))
    x, y = _data("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        st = [opt.step(x, y) for _ in range(6)]
    assert all(not s["rejected"] for s in st)
    assert st[-1]["loss"] < st[0]["loss"]
