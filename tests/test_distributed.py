"""Data-parallel K-FAC (kfac_fast.distributed).

Single-process: the flat packing, the LPT assignment, the no-op LocalDistributor, the per-rank
streams, the preconditioner over LocalDistributor against KFACPreconditioner. Two processes
(gloo on localhost, one thread each; tests/_distributed_worker.py, run once per session): every
collective against the same computation done here in one process, and the acceptance test of
world 2 with batch m/2 per rank equals world 1 with batch m (float64, 1e-10) for 20
iterations, plain and DDP-wrapped, both modes, parameters bitwise identical across ranks.
"""
import copy
import itertools
import math
import os
import subprocess
import sys

import pytest
from _gloo import free_port, run_ranks
import torch
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.curvature.running import RunningFactors, pack_tensors, packed_numel, unpack_tensors_
from kfac_fast.distributed import (
    ByteCounter,
    Distributor,
    LocalDistributor,
    ShardedInverse,
    TorchDistributor,
    assign,
    imbalance,
    loads,
    rank_generator,
    rank_seed,
)
from kfac_fast.preconditioner import DistributedKFACPreconditioner

import _distributed_worker as W

D = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ packing
def _sym(n, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*((k,) if k else ()), n, n, dtype=D, generator=g)
    return X + X.transpose(-1, -2)


def test_pack_round_trip_and_layout():
    A, F, v, R = _sym(5), _sym(3, k=4, seed=1), torch.arange(6.0, dtype=D), torch.randn(2, 3, dtype=D)
    ts, sym = [A, F, v, R], [True, True, False, False]
    buf = pack_tensors(ts, sym)
    assert buf.shape == (15 + 4 * 6 + 6 + 6,) == (packed_numel(ts, sym),)
    # layout: the upper triangle of A row by row, independently indexed
    expect_A = torch.stack([A[i, j] for i in range(5) for j in range(i, 5)])
    assert torch.equal(buf[:15], expect_A)
    assert torch.equal(buf[15:21], torch.stack([F[0, i, j] for i in range(3) for j in range(i, 3)]))
    assert torch.equal(buf[-12:-6], v) and torch.equal(buf[-6:], R.reshape(-1))
    outs = [torch.zeros_like(t) for t in ts]
    unpack_tensors_(buf, outs, sym)
    for a, b in zip(outs, ts):
        assert torch.equal(a, b)


def test_unpack_mirrors_the_upper_triangle():
    M = torch.randn(4, 4, dtype=D)  # not symmetric: only the upper triangle travels
    out = torch.zeros_like(M)
    unpack_tensors_(pack_tensors([M], True), [out], True)
    assert torch.equal(out, torch.triu(M) + torch.triu(M, 1).T)


def test_pack_errors_name_the_problem():
    with pytest.raises(ValueError, match="one dtype"):
        pack_tensors([torch.zeros(2, dtype=D), torch.zeros(2)], False)
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        pack_tensors([torch.zeros(2, 3)], True)
    with pytest.raises(ValueError, match="1-D buffer of 3"):
        unpack_tensors_(torch.zeros(4), [torch.zeros(3)], False)


def test_running_factors_flat_round_trip_every_kind():
    blocks = W.kinds_blocks()
    kinds = [b.factor_kind for b in blocks]
    assert kinds == ["kronecker_diag_a", "kronecker", "kronecker", "dense", "diagonal"]
    rf = RunningFactors(blocks, dtype=D, device="cpu", tridiagonal=True)
    rf.update(W.kinds_stats(0, slice(0, 8)), eps=0.0, backend="torch")
    rf.commit()
    rf.update(W.kinds_stats(1, slice(0, 8)), eps=0.5, backend="torch")
    # sizes by hand: emb Ā (7,), G 4x4; l1 Ā 5x5, G 5x5, Ā_next 5x6, G_next 5x3; l2 Ā 6x6, G 3x3;
    # LayerNorm 3 blocks 2x2; the loose parameter 4 scalars
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    assert rf.flat_numel() == 7 + tri(4) + tri(5) + tri(5) + 30 + 15 + tri(6) + tri(3) + 3 * tri(2) + 4
    for which in ("pending", "current"):
        ts = [t.clone() for t in rf.flat_tensors(which)[0]]
        buf = rf.pack_flat(which)
        for t in rf.flat_tensors(which)[0]:
            t.zero_()
        rf.unpack_flat_(buf, which)
        for a, b in zip(rf.flat_tensors(which)[0], ts):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)  # factors are symmetric to rounding


# ------------------------------------------------------------------ assignment
AUTOENCODER = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def _autoencoder_factor_costs():
    costs = []
    for d_in, d_out in zip(AUTOENCODER[:-1], AUTOENCODER[1:]):
        costs += [float(d_in + 1) ** 3, float(d_out) ** 3]
    return costs


@pytest.mark.parametrize("world", [2, 4])
def test_lpt_balances_the_autoencoder_factors(world):
    costs = _autoencoder_factor_costs()
    assert len(costs) == 16
    owners = assign(costs, world)
    assert sorted(set(owners)) == list(range(world))
    ld = loads(costs, owners, world)
    assert sum(ld) == pytest.approx(sum(costs))
    assert max(ld) / (sum(ld) / world) <= 1.2
    assert imbalance(costs, owners, world) == pytest.approx(max(ld) / (sum(ld) / world))
    assert assign(list(costs), world) == owners  # deterministic


def test_lpt_rule_ties_and_bound_against_brute_force():
    assert assign([1, 1, 1, 1], 2) == [0, 1, 0, 1]  # ties: lower index first, lower rank first
    assert assign([1, 5, 3], 2) == [1, 0, 1]  # 5 -> rank 0, 3 -> rank 1, 1 -> rank 1 (load 3 < 5)
    assert assign([], 3) == [] and assign([2.0], 3) == [0]
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        costs = (torch.rand(7, generator=g) ** 3 * 100).tolist()
        for p in (2, 3):
            best = min(max(loads(costs, o, p)) for o in itertools.product(range(p), repeat=len(costs)))
            lpt = max(loads(costs, assign(costs, p), p))
            assert lpt <= (4 / 3 - 1 / (3 * p)) * best + 1e-9  # Graham's bound
    with pytest.raises(ValueError, match="positive integer"):
        assign([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        assign([1.0, -1.0], 2)


# ------------------------------------------------------------------ single process
def test_local_distributor_is_a_no_op():
    d = LocalDistributor()
    assert isinstance(d, Distributor) and (d.world_size, d.rank) == (1, 0)
    ts = [torch.randn(3, dtype=D), torch.randn(2, 2)]
    keep = [t.clone() for t in ts]
    d.all_reduce_mean_(ts)
    d.start_all_reduce_mean(ts).wait()
    rf = RunningFactors(W.kinds_blocks(), dtype=D, device="cpu", tridiagonal=False)
    rf.update(W.kinds_stats(0, slice(0, 8)), eps=0.0, backend="torch")
    pend = [t.clone() for t in rf.flat_tensors()[0]]
    extra = torch.tensor([2.0, 3.0], dtype=D)
    assert d.reduce_factors(rf, extra=extra) is extra
    assert d.start_reduce_factors(rf).wait() is None
    v = torch.tensor([1.0, math.nan])
    assert d.reduce_scalars(v) is v
    assert not d.all_finite(torch.tensor([math.inf])) and d.all_finite(True)
    d.broadcast_from_owners([[ts[0]]], [0])
    d.all_gather_directions([ts[1]], [0])
    for a, b in zip(ts, keep):
        assert torch.equal(a, b)
    for a, b in zip(rf.flat_tensors()[0], pend):
        assert torch.equal(a, b)
    assert all(v == 0 for v in d.counter.payload.values())
    with pytest.raises(ValueError, match="one rank"):
        d.broadcast_from_owners([[ts[0]]], [1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributor()


def test_rank_generators_are_distinct_and_reproducible():
    seeds = {rank_seed(s, r) for s in range(4) for r in range(64)}
    assert len(seeds) == 4 * 64 and all(0 <= x < 2 ** 63 for x in seeds)
    a = torch.rand(5, generator=rank_generator(7, 1))
    assert torch.equal(a, torch.rand(5, generator=rank_generator(7, 1)))
    assert not torch.equal(a, torch.rand(5, generator=rank_generator(7, 0)))


def test_byte_counter_wire_model():
    c = ByteCounter()
    c.add("gradient", "all_reduce", 1000, 4)
    c.add("directions", "all_gather", 400, 4)
    c.add("inverses", "broadcast", 100, 2)
    assert c.payload["gradient"] == 1000 and c.sent["gradient"] == pytest.approx(1500)
    assert c.sent["directions"] == pytest.approx(300) and c.sent["inverses"] == pytest.approx(50)
    assert c.calls["scalars"] == 0
    with pytest.raises(ValueError, match="unknown communication kind"):
        c.add("weights", "all_reduce", 1, 2)


def _train_one_process(cls, net, inverse="block_diagonal", **kw):
    model = W.make_net(net)
    pre = cls(model, **dict(W.PRE_KW, inverse=inverse, generator=torch.Generator().manual_seed(0)), **kw)
    return W.train(pre, model, model, W.batches(net), slice(0, W.M), stop=8)


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
@pytest.mark.parametrize("net,inverse", [("mlp", "block_diagonal"), ("token", "block_diagonal"),
                                         ("mlp", "block_tridiagonal")])
def test_world_one_equals_kfac_preconditioner(mode, net, inverse):
    ref = _train_one_process(KFACPreconditioner, net, inverse)
    got = _train_one_process(DistributedKFACPreconditioner, net, inverse, mode=mode,
                             distributor=LocalDistributor())
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_preconditioner_argument_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        DistributedKFACPreconditioner(W.mlp_model(), loss="softmax_cross_entropy", mode="broadcast")
    with pytest.raises(ValueError, match="factor_reduce_every"):
        DistributedKFACPreconditioner(W.mlp_model(), loss="softmax_cross_entropy", factor_reduce_every=0)
    with pytest.raises(RuntimeError, match="before the first refresh"):
        ShardedInverse(LocalDistributor(), mode="shard_inverses", kind="block_diagonal",
                       build=lambda r, w: None).apply([])


# ------------------------------------------------------------------ two processes (gloo)
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker on 2 processes once; the per-rank results."""
    pytest.importorskip("torch.distributed")
    return run_ranks("_distributed_worker.py", tmp_path_factory.mktemp("dist"), timeout=240)


def test_flat_all_reduce_is_the_mean(ranks):
    a, b = W.flat_inputs(0), W.flat_inputs(1)
    for res in ranks:
        for got, x, y in zip(res["flat"], a, b):
            torch.testing.assert_close(got, (x + y) / 2, rtol=0, atol=1e-15)
        assert res["flat_calls"] == 2  # one all-reduce per dtype (float64, float32)


def _local_factors(rows, tridiagonal=True):
    rf = RunningFactors(W.kinds_blocks(), dtype=D, device="cpu", tridiagonal=tridiagonal)
    rf.update(W.kinds_stats(0, rows), eps=0.0, backend="torch")
    rf.commit()
    rf.update(W.kinds_stats(1, rows), eps=0.5, backend="torch")
    rf.commit()
    return rf.flat_tensors("current")[0]


def test_factor_reduction_equals_the_union_batch(ranks):
    union = _local_factors(slice(0, 8))
    shard = [_local_factors(slice(0, 4)), _local_factors(slice(4, 8))]
    diag = len(union) - 1  # the loose parameter's diagonal block: the last record
    for res in ranks:
        got = res["factors"]
        assert len(got) == len(union)
        for i, (g, u, s0, s1) in enumerate(zip(got, union, *shard)):
            # always the mean of the ranks' own running averages (linearity)
            torch.testing.assert_close(g, (s0 + s1) / 2, rtol=0, atol=1e-14)
            if i != diag:  # sums over rows: the union batch's factors
                torch.testing.assert_close(g, u, rtol=0, atol=1e-14)
        # the diagonal kind squares the summed gradient: shard squares are not the union's square
        assert (got[diag] - union[diag]).abs().max() > 1e-3
        torch.testing.assert_close(res["extra"], torch.tensor([0.5, 1.0], dtype=D))
    for a, b in zip(ranks[0]["factors"], ranks[1]["factors"]):
        assert torch.equal(a, b)


def test_scalars_and_one_ranks_nan(ranks):
    for res in ranks:
        s, m = res["scalars_sum"], res["scalars_mean"]
        assert s[0] == 3.0 and math.isnan(s[1]) and s[2] == 6.0
        assert m[0] == 1.5 and math.isnan(m[1]) and m[2] == 3.0
        assert res["finite_one_bad"] is False and res["finite_all_ok"] is True


def test_broadcast_and_all_gather(ranks):
    vals = W.owner_tensors(0)
    for res in ranks:
        for ts, got, sym in zip(vals, res["broadcast"], W.SYMMETRIC):
            for t, g, s in zip(ts, got, sym):
                want = torch.triu(t) + torch.triu(t, 1).transpose(-1, -2) if s else t
                assert torch.equal(g, want)
        for t, g in zip([ts[0] for ts in W.owner_tensors(1)], res["gathered"]):
            assert torch.equal(g, t)
        # unbalanced shares: one broadcast per owner (2), no padding; the 2 "inverses" calls are the test above
        assert res["gathered_calls"] == (2, 2)
        for t, g in zip(W.balanced_directions(), res["gathered_balanced"]):
            assert torch.equal(g, t)
        # payload: the broadcasts' 22 + 43 elements, then the all-gather's 2 chunks of 18
        assert res["gathered_payload"] == (22 + 43 + 2 * 18) * 8


def _reference_trace(net):
    model = W.make_net(net)
    kw = dict(W.PRE_KW, tied_weights="kronecker_sum") if net == "tied" else W.PRE_KW
    pre = KFACPreconditioner(model, **kw, generator=torch.Generator().manual_seed(0))
    return W.train(pre, model, model, W.batches(net), slice(0, W.M))


RUNS = [("mlp", "plain"), ("mlp", "ddp"), ("token", "plain"), ("tied", "plain")]


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
@pytest.mark.parametrize("net,wrap", RUNS)
def test_world_two_half_batches_equal_world_one(ranks, net, wrap, mode):
    ref = _reference_trace(net)
    key = f"pre_{net}_{wrap}_{mode}"
    t0, t1 = ranks[0][key], ranks[1][key]
    assert len(t0) == len(ref) == W.ITERS
    for it, (a, b, r) in enumerate(zip(t0, t1, ref)):
        assert torch.equal(a, b), f"iteration {it}: parameters differ between ranks"
        err = float((a - r).abs().max())
        assert err <= 1e-10, f"iteration {it}: world 2 differs from world 1 by {err:.3e}"
    assert ranks[0][f"names_{net}_{wrap}_{mode}"] == [f"model.{i}" for i in (0, 2, 4)] if net == "mlp" else True
    if net == "tied":  # the pair (head, embedding) has one owner, and the run is world 1's
        assert "model.head" in ranks[0][f"names_{net}_{wrap}_{mode}"]


def test_tridiagonal_world_two_equals_world_one(ranks):
    model = W.mlp_model()
    pre = KFACPreconditioner(model, **dict(W.PRE_KW, inverse="block_tridiagonal"),
                             generator=torch.Generator().manual_seed(0))
    ref = W.train(pre, model, model, W.batches("mlp"), slice(0, W.M))
    for a, b, r in zip(ranks[0]["pre_tridiagonal"], ranks[1]["pre_tridiagonal"], ref):
        assert torch.equal(a, b) and float((a - r).abs().max()) <= 1e-10
    # built whole on every rank: no inverse or direction traffic
    b = ranks[0]["bytes_tridiagonal"]["payload"]
    assert b["inverses"] == 0 and b["directions"] == 0 and b["factors"] > 0


def test_bytes_by_kind(ranks):
    model = W.mlp_model()
    P = sum(p.numel() for p in model.parameters())
    sizes = [(6 + 1, 10), (10 + 1, 8), (8 + 1, 3)]  # (a, g) per block
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    refreshes = sum(1 for k in range(1, W.ITERS + 1) if k <= 3 or k % 5 == 0)
    for res in ranks:
        b = res["bytes_mlp_plain_replicate_inverses"]
        assert b["payload"]["gradient"] == W.ITERS * P * 8
        assert b["payload"]["factors"] == W.ITERS * sum(tri(a) + tri(g) for a, g in sizes) * 8
        assert b["payload"]["scalars"] == W.ITERS * 2 * 8
        assert b["payload"]["inverses"] == refreshes * sum(tri(a) + tri(g) for a, g in sizes) * 8
        assert b["payload"]["directions"] == 0
        s = res["bytes_mlp_ddp_shard_inverses"]
        assert s["payload"]["gradient"] == 0 and s["payload"]["inverses"] == 0  # DDP averaged the gradients
        owners = assign([a ** 3 + g ** 3 for a, g in sizes], 2)
        width = max(sum(g * a for (a, g), o in zip(sizes, owners) if o == r) for r in range(2))
        assert s["payload"]["directions"] == W.ITERS * 2 * width * 8


def test_fewer_factor_reductions_same_trajectory(ranks):
    ref = _reference_trace("mlp")
    for res in ranks:
        for a, r in zip(res["pre_reduce_every_4"], ref):
            assert float((a - r).abs().max()) <= 1e-10
        due = [k for k in range(1, W.ITERS + 1) if k % 4 == 0 or k <= 3 or k % 5 == 0]
        assert res["reduce_every_4_calls"] == len(due) + 1  # + the checkpoint's sync at k = 11
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["pre_reduce_every_4"], ranks[1]["pre_reduce_every_4"]))


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
def test_statistics_every_Tf_steps_world_two_equals_world_one(ranks, mode):
    """Tf = 3: world 2 on half batches follows the single-process KFACPreconditioner(Tf=3) on the
    whole batch, and the factors are reduced on the statistics steps only (k ≤ 3, k ≡ 0 mod 3)."""
    model = W.mlp_model()
    pre = KFACPreconditioner(model, **dict(W.PRE_KW, T3=6, Tf=3), generator=torch.Generator().manual_seed(0))
    ref = W.train(pre, model, model, W.batches("mlp"), slice(0, W.M))
    t0, t1 = ranks[0][f"pre_Tf3_{mode}"], ranks[1][f"pre_Tf3_{mode}"]
    assert len(t0) == len(ref) == W.ITERS
    for it, (a, b, r) in enumerate(zip(t0, t1, ref)):
        assert torch.equal(a, b), f"iteration {it}: parameters differ between ranks"
        assert float((a - r).abs().max()) <= 1e-10, f"iteration {it}: world 2 differs from world 1"
    stats_steps = [k for k in range(1, W.ITERS + 1) if k <= 3 or k % 3 == 0]
    assert all(res[f"Tf3_factor_calls_{mode}"] == len(stats_steps) for res in ranks)


def test_checkpoint_from_world_two_resumes_on_world_one(ranks):
    saved = ranks[0]["checkpoint"]
    assert saved["synced_before"] is False  # the factors were rank-local: state_dict reduced them
    state = saved["state"]
    assert state["world_size"] == 2 and len(state["generators"]) == 2
    model = W.mlp_model()
    with torch.no_grad():
        for p, v, g in zip(model.parameters(), saved["params"], saved["grads"]):
            p.copy_(v)
            p.grad = g.clone()
    pre = DistributedKFACPreconditioner(model, distributor=LocalDistributor(), seed=0, **W.PRE_KW)
    pre.load_state_dict(copy.deepcopy(state))
    assert pre.k == 12
    torch.optim.SGD(model.parameters(), lr=0.05).step()  # iteration 11's update (.grad preconditioned)
    trace = W.train(pre, model, model, W.batches("mlp"), slice(0, W.M), start=11)
    for a, r in zip(trace, ranks[0]["pre_reduce_every_4"][11:]):
        assert float((a - r).abs().max()) <= 1e-10
    with pytest.raises(ValueError, match="not a DistributedKFACPreconditioner state_dict"):
        pre.load_state_dict(KFACPreconditioner(W.mlp_model(), loss="squared_error").state_dict())


def test_a_nan_on_one_rank_rejects_the_step_on_all(ranks):
    for r, res in enumerate(ranks):
        assert res["nan_raised"] is not None, f"rank {r} did not raise"
        assert res["nan_factors_kept"] and res["nan_k"] == 3
        assert res["inf_grads_untouched"] and res["inf_k"] == 2
    assert "1 of 2 ranks" in ranks[0]["nan_raised"]
    assert "NaN or inf" in ranks[1]["nan_raised"]  # the rank that saw it raises its own error


@pytest.mark.heavy  # torchrun with 2 processes
def test_demo_distributed_under_torchrun(tmp_path):
    """The launcher example: torchrun --nproc_per_node=2 -m kfac_fast.demo --distributed."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(HERE), "python"),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "kfac_fast.demo", "--distributed", "--encoder", "784,16,4", "--max-iters", "4",
           "--dist-eval-every", "2", "--batch-size", "100", "--dist-mode", "shard_inverses", "--out", str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = (tmp_path / "demo_distributed_curves.csv").read_text().splitlines()
    assert rows[0].startswith("method,seconds,iterations,train_error") and rows[0].endswith("world_size")
    assert len(rows) == 1 + 3 and all(r.endswith(",2") for r in rows[1:])  # iterations 0, 2, 4; world 2
    assert p.stdout.count("data: ") == 1  # one header, from rank 0
