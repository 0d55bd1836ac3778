"""The ``max_block_dim`` bound: a Kronecker factor larger than the bound is kept as its diagonal.

Checked against independent float64 computation: the diagonal factors equal the diagonals of
the dense factors built here from hand-indexed patches (tests/dense.py) and per-row output
derivatives; the preconditioned direction equals a dense solve of (diag-side ⊗ dense-side with
the factored Tikhonov damping of Sec 6.3) built with torch.kron; the running factors, the flat
data-parallel buffer, checkpoints (also ones written without the bound), coverage and the
memory report handle 1-D factors; KFAC and KFACPreconditioner (both captures) train with it."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import kfac_fast
from kfac_fast.curvature.factors import DEFAULT_MAX_BLOCK_DIM, KroneckerFactors
from kfac_fast.distributed import record_cost, record_kind

from dense import dense_A

D = torch.float64
BOUND = 15


def cnn(seed=0):
    """Blocks (a, g) and which factor the bound 15 makes diagonal: conv 0 (10, 16): G;
    conv 2 (145, 4): Ā; linear 5 (4·4·4 + 1, 20): both; linear 7 (21, 6): Ā; linear 9 (7, 3): neither."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(16, 4, 3, padding=2, dilation=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 20), nn.Tanh(), nn.Linear(20, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)


PATHS = ["0", "2", "5", "7", "9"]
DIAG = {"0": (False, True), "2": (True, False), "5": (True, True), "7": (True, False), "9": (False, False)}


def dense_G(model, x, y, path):
    """G = (1/N) Σ_rows g gᵀ, g = ∂(Σ loss terms)/∂s per output row (a conv: per location), N = m."""
    mod = model.get_submodule(path)
    got = {}

    def hook(m, args, out):
        out.retain_grad()
        got["s"] = out

    h = mod.register_forward_hook(hook)
    try:
        Fn.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        h.remove()
    model.zero_grad()
    g = got["s"].grad
    rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) if g.dim() == 4 else g
    return rows.t() @ rows / x.shape[0]


def _data(seed=1, m=6):
    torch.manual_seed(seed)
    return torch.randn(m, 1, 8, 8, dtype=D), torch.randint(0, 3, (m,))


def _pre_one_step(model, x, y, bound, **kw):
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks",
                                       factor_dtype=D, max_block_dim=bound, step_size=None, **kw)
    Fn.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    pre.step(targets=y)
    return pre, grads


def test_diagonal_factors_are_the_dense_factors_diagonals():
    model = cnn()
    x, y = _data()
    pre, _ = _pre_one_step(model, x, y, BOUND)  # k = 1: ε = 0, the factors are this batch's
    recs = {f.name: f for f in pre.factors.current}
    for p in PATHS:
        f = recs[f"model.{p}"]
        assert (f.A.dim() == 1, f.G.dim() == 1) == DIAG[p], p
        A, G = dense_A(model, x, p), dense_G(model, x, y, p)
        for got, ref in ((f.A, A), (f.G, G)):
            want = torch.diagonal(ref) if got.dim() == 1 else ref
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max())), p
        if f.A.dim() == 1:
            assert float(f.A[-1]) == 1.0  # the homogeneous coordinate's 1·1


def _damped(M, c):
    M = torch.diag(M) if M.dim() == 1 else M
    return M + c * torch.eye(M.shape[0], dtype=D)


def test_direction_is_the_dense_kronecker_solve():
    model = cnn()
    x, y = _data()
    gamma = 0.05
    pre, grads = _pre_one_step(model, x, y, BOUND, damping=gamma)
    got = {p: torch.cat([model.get_submodule(p).weight.grad.reshape(model.get_submodule(p).weight.shape[0], -1),
                         model.get_submodule(p).bias.grad[:, None]], 1) for p in PATHS}
    for p in PATHS:
        mod = model.get_submodule(p)
        A, G = dense_A(model, x, p), dense_G(model, x, y, p)
        dA, dG = DIAG[p]
        A = torch.diagonal(A) if dA else A
        G = torch.diagonal(G) if dG else G
        tr = lambda M: float(M.sum() if M.dim() == 1 else torch.diagonal(M).sum()) / M.shape[0]  # noqa: E731
        pi = math.sqrt(tr(A) / tr(G))
        K = torch.kron(_damped(G, gamma / pi), _damped(A, pi * gamma))  # row-major vec: (G ⊗ A) vec(V)
        V = torch.cat([grads[mod.weight].reshape(mod.weight.shape[0], -1), grads[mod.bias][:, None]], 1)
        U = torch.linalg.solve(K, V.reshape(-1)).reshape(V.shape)
        assert torch.allclose(got[p], U, rtol=1e-8, atol=1e-10 * float(U.abs().max())), p


def test_unbounded_factors_are_all_dense_and_default_is_documented():
    model = cnn()
    x, y = _data()
    pre, _ = _pre_one_step(model, x, y, None)
    assert all(f.A.dim() == 2 and f.G.dim() == 2 for f in pre.factors.current)
    assert DEFAULT_MAX_BLOCK_DIM == 4096
    assert kfac_fast.config.KFACConfig().max_block_dim == DEFAULT_MAX_BLOCK_DIM
    with pytest.raises(ValueError, match="max_block_dim must be a positive integer"):
        kfac_fast.config.KFACConfig(max_block_dim=0)


def test_tridiagonal_keeps_bounded_blocks_block_diagonal():
    model = cnn()
    x, y = _data()
    pre, _ = _pre_one_step(model, x, y, BOUND, inverse="block_tridiagonal")
    inv = pre.inverse
    assert [inv.records[i].name for i in inv.kron_idx] == ["model.9"]
    assert [inv.other[i][0] for i in inv.other_idx] == ["kron_diag"] * 4
    assert all(f.A_next is None for f in pre.factors.current)  # no dense neighbour to couple


def test_running_factor_paths_with_diagonal_factors():
    model = cnn()
    x, y = _data()
    pre, _ = _pre_one_step(model, x, y, BOUND)
    rf = pre.factors
    # the flat data-parallel buffer: a 1-D factor is packed whole and comes back unchanged
    ts, sym = rf.flat_tensors("current")
    assert [t.dim() == 2 for t in ts] == sym
    # what the buffer carries: a 1-D factor whole, a dense one's upper triangle mirrored
    before = [t.clone() if t.dim() == 1 else t.triu() + t.triu(1).t() for t in ts]
    flat = rf.pack_flat("current")
    assert flat.numel() == sum(t.numel() if t.dim() == 1 else t.shape[0] * (t.shape[0] + 1) // 2 for t in ts)
    for t in ts:
        t.zero_()
    rf.unpack_flat_(flat, "current")
    assert all(torch.equal(a, b) for a, b in zip(rf.flat_tensors("current")[0], before))
    # the sync-free invalid step leaves every factor bitwise, the diagonal Ā's homogeneous 1 included
    stats = _stats_like(pre, model, x, y)
    rf.update(stats, eps=0.5, backend="torch", valid=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(rf.flat_tensors("pending")[0], before))
    rf.update(stats, eps=0.5, backend="torch", valid=torch.tensor(True))
    assert not all(torch.equal(a, b) for a, b in zip(rf.flat_tensors("pending")[0], before))
    # the distributed cost model: n for a diagonal side
    costs = {f.name: record_cost(f) for f in rf.current}
    assert costs["model.0"] == 10 ** 3 + 16 and costs["model.2"] == 145 + 4 ** 3 and costs["model.5"] == 65 + 20 and costs["model.9"] == 7 ** 3 + 3 ** 3
    assert [record_kind(f) for f in rf.current] == ["kron_diag"] * 4 + ["kron"]


def _stats_like(pre, model, x, y):
    """BatchStatistics of a batch, from the statistics path KFACPreconditioner(capture='pass') uses."""
    from kfac_fast.curvature.statistics import sampled_statistics

    stats, _ = sampled_statistics(model, pre.layers, x, pre.loss, fisher="empirical", targets=y,
                                  generator=torch.Generator().manual_seed(0))
    return stats


def test_coverage_and_memory_report_name_the_diagonal_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(60, 8), nn.Linear(8, 60)).to(D)
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", max_block_dim=16, factor_dtype=D)
    cov = pre.coverage()
    head = [e for e in cov.entries if e.name == "model.1"][0]
    assert head.kind == "kronecker" and head.reason == "G diagonal: 60 > max_block_dim=16"
    assert cov.kronecker_fraction == 1.0
    assert [e.reason for e in cov.entries if e.name == "model.0"] == [None]  # the Embedding's Ā: by construction
    rep = pre.memory_report()
    assert rep.diagonal_factors == {"model.1": "G diagonal: 60 > max_block_dim=16"}
    x = torch.randint(0, 60, (32,))
    y = torch.randint(0, 60, (32,))
    Fn.cross_entropy(model(x), y).backward()
    pre.step(x, y)
    rep = pre.memory_report()
    # two buffers of: Ā (60,) of the Embedding, G (8, 8); head Ā (9, 9), G (60,)
    assert rep["factors"] == 2 * 8 * (60 + 64 + 81 + 60)


def _lm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(40, 12), nn.Tanh(), nn.Linear(12, 40))


def _lm_data(n=256, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (n,), generator=g)
    return x, (x * 7 + 3) % 40  # a learnable map


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_preconditioner_trains_with_the_bound(capture):
    model = _lm()
    x, y = _lm_data()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture=capture, max_block_dim=10,
                                       damping=1e-2)
    assert pre.memory_report().diagonal_factors == {"model.2": "Ā diagonal: 13 > max_block_dim=10; "
                                                                "G diagonal: 40 > max_block_dim=10",
                                                    "model.0": "G diagonal: 12 > max_block_dim=10"}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with torch.no_grad():
        first = float(Fn.cross_entropy(model(x), y))
    for _ in range(30):
        opt.zero_grad()
        loss = Fn.cross_entropy(model(x), y)
        loss.backward(retain_graph=capture == "hooks")
        pre.step(x, y) if capture == "pass" else pre.step(targets=y)
        opt.step()
    with torch.no_grad():
        last = float(Fn.cross_entropy(model(x), y))
    assert last < 0.7 * first, (first, last)
    assert all(f.G.dim() == 1 for f in pre.factors.current)


def test_kfac_trains_with_the_bound_and_checkpoints_round_trip():
    model = _lm()
    x, y = _lm_data()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", max_block_dim=10)
    first = None
    for _ in range(6):
        st = opt.step(x, y)
        first = first if first is not None else st["loss"]
    assert st["loss"] < first
    assert [tuple(t.dim() for t in (f.A, f.G)) for f in opt.factors.current] == [(1, 1), (1, 1)]
    state = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = kfac_fast.KFAC(model2, loss="softmax_cross_entropy", max_block_dim=10)
    opt2.load_state_dict(state)
    a, b = opt.step(x, y), opt2.step(x, y)
    assert a["loss"] == b["loss"]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
def test_checkpoint_without_the_bound_loads_with_it(inverse):
    """A preconditioner checkpoint written with every factor dense loads into a bounded one: the
    bounded factors become the saved factors' diagonals (the tridiagonal coupling of the blocks
    now diagonal dropped) and the inverse is rebuilt from them."""
    model = cnn()
    x, y = _data()
    pre, _ = _pre_one_step(copy.deepcopy(model), x, y, None, inverse=inverse)
    if inverse == "block_tridiagonal":
        assert pre.factors.current[2].A_next is not None  # linear 5 was coupled to 7
    state = pre.state_dict()
    bounded = kfac_fast.KFACPreconditioner(copy.deepcopy(model), loss="softmax_cross_entropy", fisher="empirical",
                                           capture="hooks", factor_dtype=D, max_block_dim=BOUND, step_size=None,
                                           inverse=inverse)
    bounded.load_state_dict(state)
    for f, g in zip(bounded.factors.current, pre.factors.current):
        for got, full in ((f.A, g.A), (f.G, g.G)):
            assert torch.equal(got, torch.diagonal(full) if got.dim() == 1 else full)
    assert [bounded.inverse.records[i].name for i in bounded.inverse.kron_idx] == ["model.9"]
    fresh, _ = _pre_one_step(copy.deepcopy(model), x, y, BOUND, inverse=inverse)
    V = [torch.randn(s, dtype=D) for s in fresh.inverse.shapes]
    for u, v in zip(bounded.inverse.apply(V), fresh.inverse.apply(V)):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-14)


def test_kfac_checkpoint_written_before_the_bound_resumes_unbounded():
    model = _lm()
    x, y = _lm_data()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", max_block_dim=None)
    opt.step(x, y)
    state = opt.state_dict()
    del state["config"]["max_block_dim"]  # as written before the field existed
    opt2 = kfac_fast.KFAC(copy.deepcopy(model), loss="softmax_cross_entropy")
    opt2.load_state_dict(state)
    assert opt2.config.max_block_dim is None
    assert all(f.A.dim() == 2 or f.name == "model.0" for f in opt2.factors.current)


def test_kronecker_factors_dense_flag():
    f = KroneckerFactors(A=torch.ones(3), G=torch.eye(2))
    assert not f.dense and KroneckerFactors(A=torch.eye(3), G=torch.eye(2)).dense


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
@pytest.mark.parametrize("net,bound", [("mlp", 8), ("token", 7)])
def test_distributed_world_one_equals_the_preconditioner(mode, net, bound):
    """The data-parallel preconditioner's block inverses (the replicated parts' broadcast and
    apply, the sharded build) with diagonal factors, on one rank: the plain preconditioner's run."""
    import _distributed_worker as W
    from kfac_fast.distributed import LocalDistributor
    from kfac_fast.preconditioner import DistributedKFACPreconditioner

    def run(cls, **kw):
        model = W.make_net(net)
        pre = cls(model, **dict(W.PRE_KW, generator=torch.Generator().manual_seed(0)), max_block_dim=bound, **kw)
        out = W.train(pre, model, model, W.batches(net), slice(0, W.M), stop=8)
        kron = [f for f in pre.factors.current if isinstance(f, KroneckerFactors)]
        assert any(f.G.dim() == 1 for f in kron) and any(f.A.dim() == 1 and f.homogeneous for f in kron)
        return out

    ref = run(kfac_fast.KFACPreconditioner)
    got = run(DistributedKFACPreconditioner, mode=mode, distributor=LocalDistributor())
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
