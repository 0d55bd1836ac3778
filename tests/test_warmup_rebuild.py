"""The warm-up refreshes (iterations 2 and 3, Sec 8's k ≤ 3 rule) rebuild only the blocks whose
largest dense factor is at most ``WARMUP_REBUILD_MAX_DIM``; the others keep their iteration-1
inverse until the T3 schedule. Models whose factors are all small keep Sec 8 exactly (the
trajectory regression test covers that bitwise)."""
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import kfac_fast
from kfac_fast.curvature import inverses
from kfac_fast.curvature.block_inverse import BlockInverse, largest_dense_factor
from kfac_fast.curvature.factors import BlockFisher, KroneckerFactors
from kfac_fast.curvature.running import snapshot

D = torch.float64


def _model():
    torch.manual_seed(0)  # blocks (a, g): (13, 16), (17, 6), (7, 3); a LayerNorm's 2×2 blocks
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(D)


def _batches(n=6, m=32):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(m, 12, dtype=D, generator=g), torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def test_rule():
    recs = [KroneckerFactors(A=torch.eye(5), G=torch.eye(3)), KroneckerFactors(A=torch.ones(9), G=torch.eye(2)),
            BlockFisher(F=torch.ones(4, 2, 2)), KroneckerFactors(A=torch.eye(3), G=torch.ones(50))]
    assert [largest_dense_factor(f) for f in recs] == [5, 2, 2, 3]
    for k in (1, 2, 3, 4, 40):
        assert inverses.warmup_rebuild(recs, k, scheduled=False) is None  # all small
        assert inverses.warmup_rebuild(recs, k, scheduled=True) is None
    big = recs + [KroneckerFactors(A=torch.eye(inverses.WARMUP_REBUILD_MAX_DIM + 1), G=torch.eye(2))]
    assert inverses.warmup_rebuild(big, 2, scheduled=False) == [0, 1, 2, 3]
    assert inverses.warmup_rebuild(big, 3, scheduled=False) == [0, 1, 2, 3]
    assert inverses.warmup_rebuild(big, 2, scheduled=True) is None
    assert inverses.warmup_rebuild(big, 4, scheduled=False) is None


@pytest.mark.parametrize("inverse,factorization", [("block_diagonal", "cholesky"), ("block_diagonal", "eigh"),
                                                   ("block_tridiagonal", "eigh")])
def test_large_blocks_keep_their_first_inverse_until_t3(monkeypatch, factorization, inverse):
    monkeypatch.setattr(inverses, "WARMUP_REBUILD_MAX_DIM", 14)  # the first two Linear blocks are "large"
    model = _model()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", factor_dtype=D, T3=4, inverse=inverse,
                                       factorization=factorization, fisher="empirical", tau1=1.0,
                                       damping_warmup=0)  # one γ at every refresh: the rebuild rule alone
    seen = []
    for x, y in _batches(4):  # k = 1..4: every step refreshes (k ≤ 3, k = T3)
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        pre.step(x, y)
        seen.append((pre.k - 1, pre.inverse, snapshot(pre.factors.current)))
    names = [f.name for f in seen[0][1].records]
    large = [i for i, f in enumerate(seen[0][1].records) if largest_dense_factor(f) > 14]
    assert [names[i] for i in large] == ["model.0", "model.2"]
    V = [torch.randn(s, dtype=D) for s in seen[0][1].shapes]
    first = seen[0][1].apply(V)
    for k, inv, facs in seen:
        fresh = BlockInverse(facs, kind=inverse, damping=pre.damping, factorization=inv.factorization).apply(V)
        got = inv.apply(V)
        for i in range(len(V)):
            if k in (2, 3) and i in large and inverse == "block_diagonal":
                assert torch.equal(got[i], first[i]), (k, names[i])  # kept from iteration 1
                assert not torch.allclose(got[i], fresh[i]), (k, names[i])
            elif k in (2, 3) and inverse == "block_tridiagonal" and names[i] != "model.3":
                # the tridiagonal inverse couples its blocks: kept whole (the LayerNorm's rebuilt)
                assert torch.equal(got[i], first[i]), (k, names[i])
            else:  # rebuilt from this iteration's factors: iteration 1, the small blocks, and k = T3
                torch.testing.assert_close(got[i], fresh[i], rtol=1e-10, atol=1e-12)


def test_kfac_warmup_keeps_large_blocks(monkeypatch):
    monkeypatch.setattr(inverses, "WARMUP_REBUILD_MAX_DIM", 14)
    model = _model()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", T3=4, T2=4, factor_dtype=D)
    x, y = _batches(1, m=64)[0]
    invs = []
    for _ in range(4):
        opt.step(x, y)
        invs.append(opt.inverse)
    first = invs[0]
    for inv in invs[1:3]:
        for i, f in enumerate(inv.records):
            assert (f is first.records[i]) == (f.name in ("model.0", "model.2")), f.name
    assert all(f is not first.records[i] for i, f in enumerate(invs[3].records))  # k = 4 = T3: all rebuilt


def test_small_models_rebuild_everything_in_warmup():
    model = _model()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", factor_dtype=D)
    prev = None
    for x, y in _batches(3):
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        pre.step(x, y)
        if prev is not None:
            assert all(f is not g for f, g in zip(pre.inverse.records, prev.records))
        prev = pre.inverse
