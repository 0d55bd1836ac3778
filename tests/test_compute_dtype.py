"""compute_dtype: the curvature products read rounded operands and accumulate in fp32.

Checked against float64 computations from the same factors: the preconditioned direction of
both inverses per dtype (tolerance per dtype), the factor accumulation equals the float64
accumulation of the *rounded* rows (so the rounding is the only error: fp32 accumulation),
every backend, and the optimizer's validation of the keyword.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast import KFAC
from kfac_fast import ops
from kfac_fast.curvature.block_inverse import BlockInverse
from kfac_fast.curvature.factors import KroneckerFactors

TOL = {None: 1e-5, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _records(seed=0, dims=((7, 5), (5, 6), (6, 3)), tridiagonal=False):
    """Factors of rows shared by consecutive layers (so the cross factors are consistent)."""
    g = torch.Generator().manual_seed(seed)
    Xs, Gs, recs = [], [], []
    for i, (din, dout) in enumerate(dims):
        X = torch.randn(40, din + 1, generator=g, dtype=torch.float64)
        X[:, -1] = 1
        Gr = torch.randn(40, dout, generator=g, dtype=torch.float64)
        Xs.append(X)
        Gs.append(Gr)
        recs.append(KroneckerFactors(A=X.T @ X / 40, G=Gr.T @ Gr / 40, name=f"l{i}", homogeneous=True))
    if tridiagonal:
        for i in range(len(dims) - 1):
            recs[i].A_next = Xs[i].T @ Xs[i + 1] / 40
            recs[i].G_next = Gs[i].T @ Gs[i + 1] / 40
    return recs


def _to(recs, dt):
    return [KroneckerFactors(A=r.A.to(dt), G=r.G.to(dt), A_next=None if r.A_next is None else r.A_next.to(dt),
                             G_next=None if r.G_next is None else r.G_next.to(dt), name=r.name,
                             homogeneous=r.homogeneous) for r in recs]


@pytest.mark.parametrize("kind", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("factorization", ["eigh", "cholesky"])
@pytest.mark.parametrize("cd", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_preconditioned_direction_error_per_dtype(kind, factorization, cd, backend):
    if kind == "block_tridiagonal" and factorization == "cholesky":
        pytest.skip("the tridiagonal inverse always uses eigendecompositions")
    recs = _records(tridiagonal=kind == "block_tridiagonal")
    exact = BlockInverse(recs, kind=kind, damping=0.1, backend="torch", factorization=factorization)
    inv = BlockInverse(_to(recs, torch.float32), kind=kind, damping=0.1, backend=backend,
                       factorization=factorization)
    inv.compute_dtype = cd
    g = torch.Generator().manual_seed(1)
    V = [torch.randn(r.G.shape[0], r.A.shape[0], generator=g, dtype=torch.float64) for r in recs]
    want = exact.apply(V)
    got = inv.apply([v.float() for v in V])
    num = sum(float(((a.double() - b) ** 2).sum()) for a, b in zip(got, want)) ** 0.5
    den = sum(float((b ** 2).sum()) for b in want) ** 0.5
    assert all(u.dtype == torch.float32 for u in got)
    assert num / den < TOL[cd]
    if cd is not None:  # and the rounding is visible: the products really read cd operands
        assert num / den > 1e-7


def test_inverse_operands_are_cast_once_per_inverse():
    inv = BlockInverse(_to(_records(), torch.float32), kind="block_diagonal", damping=0.1, backend="torch",
                       factorization="cholesky")
    inv.compute_dtype = torch.bfloat16
    kron = inv.kron
    a = kron._operands(kron.Ginv)
    b = kron._operands(kron.Ginv)
    assert all(x is y and x.dtype == torch.bfloat16 for x, y in zip(a, b))
    assert inv.with_damping(0.2).compute_dtype == torch.bfloat16


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_factor_accumulation_rounds_only_the_rows(cd, backend):
    """F ← εF + s X̄ᵀX̄ with X rounded to cd: equals the float64 accumulation of the rounded
    rows to fp32 accuracy (the accumulation itself is fp32)."""
    g = torch.Generator().manual_seed(2)
    X = [torch.randn(33, d, generator=g) for d in (5, 17)]
    F = [torch.eye(d + 1) for d in (5, 17)]
    want = []
    for f, x in zip(F, X):
        xb = torch.cat([x.to(cd).double(), torch.ones(33, 1, dtype=torch.float64)], 1)
        want.append(0.9 * f.double() + 0.1 / 33 * xb.T @ xb)
    ops.factor_update(F, [x.to(cd) for x in X], eps=0.9, scale=0.1 / 33, homogeneous=True, backend=backend)
    for f, w in zip(F, want):
        torch.testing.assert_close(f.double(), w, rtol=2e-6, atol=2e-6)


def test_kfac_with_bf16_curvature_trains_and_validates_the_keyword():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    opt = KFAC(model, loss="softmax_cross_entropy", compute_dtype=torch.bfloat16, T3=2, T2=4,
               generator=torch.Generator().manual_seed(0))
    first = opt.step(x, y)["loss"]
    for _ in range(10):
        s = opt.step(x, y)
    assert s["loss"] < first and opt.factors.compute_dtype == torch.bfloat16
    assert opt.inverse.compute_dtype == torch.bfloat16 and opt.factors.current[0].A.dtype == torch.float32
    with pytest.raises(ValueError, match="tf32.*CUDA"):
        KFAC(model, loss="softmax_cross_entropy", compute_dtype="tf32")
    with pytest.raises(ValueError, match="compute_dtype"):
        KFAC(model, loss="softmax_cross_entropy", compute_dtype=torch.int8)
    assert KFAC(model, loss="softmax_cross_entropy", compute_dtype=torch.float32).compute_dtype is None
