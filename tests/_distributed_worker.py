"""One rank of the 2-process gloo checks in test_distributed.py (run as a script by the test).

    python tests/_distributed_worker.py RANK WORLD PORT OUTDIR

Every scenario writes what it observed to OUTDIR/rank{RANK}.pt; the test process compares with
independent single-process computations. Data are drawn from generators seeded per scenario so
the test process can rebuild every rank's inputs.
"""
import datetime
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

D = torch.float64
ITERS = 20
M = 16  # the global batch; each of the 2 ranks takes M/2 rows


# ------------------------------------------------------------------ shared with the test process
def flat_inputs(rank: int) -> list:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, 4, dtype=D, generator=g), torch.randn(5, dtype=D, generator=g),
            torch.randn(2, 2, generator=g), torch.randn(7, dtype=D, generator=g)]


class Kinds(nn.Module):
    """Every block kind: an Embedding (diagonal Ā), two adjacent Linear (tridiagonal link), a
    LayerNorm (2×2 dense blocks) and a loose parameter (diagonal kind)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 3)
        self.ln = nn.LayerNorm(3)
        self.extra = nn.Parameter(torch.zeros(2, 2))


def kinds_blocks():
    from kfac_fast.curvature.blocks import find_blocks

    torch.manual_seed(0)
    return find_blocks(Kinds().to(D), unsupported="diagonal")


def kinds_stats(step: int, rows: slice, *, diag_sum=None):
    """Global statistics of ``step`` restricted to ``rows`` (m = 8 global rows)."""
    from kfac_fast.curvature.statistics import BatchStatistics

    g = torch.Generator().manual_seed(200 + step)
    m = 8
    tok = torch.randint(0, 7, (m,), generator=g)
    ge, a1, g1 = torch.randn(m, 4, dtype=D, generator=g), torch.randn(m, 4, dtype=D, generator=g), \
        torch.randn(m, 5, dtype=D, generator=g)
    a2, g2 = torch.randn(m, 5, dtype=D, generator=g), torch.randn(m, 3, dtype=D, generator=g)
    u = torch.randn(m, 3, 2, dtype=D, generator=g)
    per_row = torch.randn(m, 4, dtype=D, generator=g)  # per-example gradients of the loose parameter
    s = per_row[rows].sum(0).reshape(1, 4, 1)
    n = len(range(m)[rows])
    return BatchStatistics(a=[tok[rows], a1[rows], a2[rows], None, None], g=[ge[rows], g1[rows], g2[rows], None, None],
                           u=[None, None, None, u[rows], s], n_terms=n)


def owner_tensors(step: int) -> list:
    g = torch.Generator().manual_seed(300 + step)
    return [[torch.randn(4, 4, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)],
            [torch.randn(2, 3, 3, dtype=D, generator=g)],
            [torch.randn(5, 5, dtype=D, generator=g)],
            [torch.randn(6, dtype=D, generator=g)]]


def balanced_directions() -> list:
    g = torch.Generator().manual_seed(500)
    return [torch.randn(3, 3, dtype=D, generator=g), torch.randn(9, dtype=D, generator=g),
            torch.randn(3, 3, dtype=D, generator=g), torch.randn(9, dtype=D, generator=g)]


OWNERS = [0, 1, 1, 0]
SYMMETRIC = [[True, False], [True], [False], [False]]


def mlp_model():
    from dense import mlp

    return mlp([6, 10, 8, 3], nn.Tanh, seed=0)


class TokenNet(nn.Module):
    """(m,) token ids -> (m, 11) logits: Embedding (diagonal Ā), LayerNorm (dense 2×2 blocks), Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.ln = nn.LayerNorm(6)
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 11)

    def forward(self, t):
        return self.l2(torch.tanh(self.l1(self.ln(self.emb(t)))))


class TiedNet(TokenNet):
    """TokenNet with a bias-free head sharing the embedding's weight (a Kronecker-sum pair)."""

    def __init__(self):
        super().__init__()
        self.l2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(self.ln(self.emb(t)))))))


def batches(net: str) -> list:
    g = torch.Generator().manual_seed(400)
    out = []
    for _ in range(ITERS):
        if net in ("token", "tied"):
            x = torch.randint(0, 11, (M,), generator=g)
            y = torch.randint(0, 11, (M,), generator=g)
        else:
            x = torch.randn(M, 6, dtype=D, generator=g)
            y = torch.randint(0, 3, (M,), generator=g)
        out.append((x, y))
    return out


def make_net(net: str):
    return {"token": TokenNet, "tied": TiedNet}.get(net, mlp_model)().to(D)


# Tf=1: these scenarios count the factor traffic of every iteration
PRE_KW = dict(loss="softmax_cross_entropy", damping=0.1, fisher="empirical", tau1=1.0, T3=5, Tf=1, backend="torch")


def train(pre, model, params_model, data, rows, *, start=0, stop=ITERS, hook=None):
    """SGD on ``rows`` of each batch; returns the parameters after every iteration."""
    sgd = torch.optim.SGD(params_model.parameters(), lr=0.05)
    trace = []
    for it in range(start, stop):
        x, y = data[it]
        x, y = x[rows], y[rows]
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step(x, y)
        if hook is not None:
            hook(it, pre)
        sgd.step()
        trace.append(torch.cat([p.detach().flatten() for p in params_model.parameters()]).clone())
    return trace


# ------------------------------------------------------------------ the rank's scenarios
def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from kfac_fast.curvature.running import RunningFactors
    from kfac_fast.distributed import TorchDistributor
    from kfac_fast.preconditioner import DistributedKFACPreconditioner

    res = {}
    d = TorchDistributor()
    half = slice(rank * M // 2, (rank + 1) * M // 2)

    # flat all-reduce (two dtypes in one call)
    ts = flat_inputs(rank)
    d.all_reduce_mean_(ts)
    res["flat"] = ts
    res["flat_calls"] = d.counter.calls["gradient"]

    # factor reduction, sync and async, two steps of the ε-average
    blocks = kinds_blocks()
    rf = RunningFactors(blocks, dtype=D, device="cpu", tridiagonal=True)
    rows = slice(rank * 4, (rank + 1) * 4)
    rf.update(kinds_stats(0, rows), eps=0.0, backend="torch")
    d.reduce_factors(rf)
    rf.commit()
    rf.update(kinds_stats(1, rows), eps=0.5, backend="torch")
    h = d.start_reduce_factors(rf, extra=torch.tensor([float(rank), 1.0], dtype=D))
    res["extra"] = h.wait()
    rf.commit()
    res["factors"] = [t.clone() for t in rf.flat_tensors("current")[0]]

    # scalars: one rank's NaN is every rank's
    vec = torch.tensor([1.0 + rank, math.nan if rank == 1 else 2.0, 3.0], dtype=D)
    res["scalars_sum"] = d.reduce_scalars(vec, op="sum")
    res["scalars_mean"] = d.reduce_scalars(vec, op="mean")
    res["finite_one_bad"] = d.all_finite(torch.tensor([1.0, math.inf if rank == 1 else 0.0]))
    res["finite_all_ok"] = d.all_finite(True)

    # broadcast from owners, all-gather of directions
    vals = owner_tensors(0)
    blocks_bc = [[t.clone() if OWNERS[i] == rank else torch.zeros_like(t) for t in ts]
                 for i, ts in enumerate(vals)]
    d.broadcast_from_owners(blocks_bc, OWNERS, symmetric=SYMMETRIC)
    res["broadcast"] = blocks_bc
    dirs_vals = [ts[0] for ts in owner_tensors(1)]
    dirs = [v.clone() if OWNERS[i] == rank else torch.full_like(v, math.nan) for i, v in enumerate(dirs_vals)]
    d.all_gather_directions(dirs, OWNERS)  # shares 22 and 43 elements: per-owner broadcasts
    res["gathered"] = dirs
    res["gathered_calls"] = (d.counter.calls["directions"], d.counter.calls["inverses"])
    bal = balanced_directions()
    dirs = [v.clone() if OWNERS[i] == rank else torch.full_like(v, math.nan) for i, v in enumerate(bal)]
    d.all_gather_directions(dirs, OWNERS)  # equal shares: one padded all-gather
    res["gathered_balanced"] = dirs
    res["gathered_payload"] = d.counter.payload["directions"]

    # the preconditioner: plain and DDP-wrapped, both modes, 20 iterations
    from torch.nn.parallel import DistributedDataParallel

    for net in ("mlp", "token", "tied"):
        data = batches(net)
        wraps = ("plain", "ddp") if net == "mlp" else ("plain",)
        for wrap in wraps:
            for mode in ("replicate_inverses", "shard_inverses"):
                model = make_net(net)
                run_model = DistributedDataParallel(model) if wrap == "ddp" else model
                kw = dict(PRE_KW, tied_weights="kronecker_sum") if net == "tied" else PRE_KW
                pre = DistributedKFACPreconditioner(run_model, mode=mode, seed=0, **kw)
                trace = train(pre, run_model, model, data, half)
                res[f"pre_{net}_{wrap}_{mode}"] = trace
                res[f"names_{net}_{wrap}_{mode}"] = [l.name for l in pre.layers]
                res[f"bytes_{net}_{wrap}_{mode}"] = pre.distributor.counter.snapshot()

    # the tridiagonal inverse: built whole on every rank (replicated work)
    model = mlp_model()
    pre = DistributedKFACPreconditioner(model, mode="shard_inverses", seed=0,
                                        **dict(PRE_KW, inverse="block_tridiagonal"))
    res["pre_tridiagonal"] = train(pre, model, model, batches("mlp"), half)
    res["bytes_tridiagonal"] = pre.distributor.counter.snapshot()

    # statistics every Tf = 3 steps (T3 = 6): factor traffic on statistics steps only
    for mode in ("replicate_inverses", "shard_inverses"):
        model = mlp_model()
        pre = DistributedKFACPreconditioner(model, mode=mode, seed=0, **dict(PRE_KW, T3=6, Tf=3))
        res[f"pre_Tf3_{mode}"] = train(pre, model, model, batches("mlp"), half)
        res[f"Tf3_factor_calls_{mode}"] = pre.distributor.counter.calls["factors"]

    # fewer factor reductions, with a checkpoint taken while the factors are rank-local
    data = batches("mlp")
    model = mlp_model()
    pre = DistributedKFACPreconditioner(model, mode="replicate_inverses", seed=0, factor_reduce_every=4, **PRE_KW)
    saved = {}

    def checkpoint(it, p):
        if it == 10:  # after iteration k = 11: no reduction then (11 % 4, 11 % 5 != 0)
            saved["synced_before"] = p._synced
            saved["state"] = p.state_dict()
            saved["params"] = [q.detach().clone() for q in model.parameters()]
            saved["grads"] = [q.grad.detach().clone() for q in model.parameters()]

    res["pre_reduce_every_4"] = train(pre, model, model, data, half, hook=checkpoint)
    res["reduce_every_4_calls"] = pre.distributor.counter.calls["factors"]
    res["checkpoint"] = saved

    # a NaN on one rank: rank 1's sampled pass sees a NaN input; both ranks raise, nothing committed
    model = mlp_model()
    pre = DistributedKFACPreconditioner(model, mode="shard_inverses", seed=0,
                                        **dict(PRE_KW, fisher="mc"))
    x, y = batches("mlp")[0]
    x = x[half]
    for it in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y[half]).backward()
        if it < 2:
            pre.step(x)
            continue
        before = [t.clone() for t in pre.factors.flat_tensors("current")[0]]
        bad = x.clone()
        if rank == 1:
            bad[0, 0] = math.nan
        try:
            pre.step(bad)
            res["nan_raised"] = None
        except FloatingPointError as exc:
            res["nan_raised"] = str(exc)
        after = pre.factors.flat_tensors("current")[0]
        res["nan_factors_kept"] = all(torch.equal(a, b) for a, b in zip(before, after))
        res["nan_k"] = pre.k

    # non-finite gradients on rank 1 only (the user averages nothing: average_gradients=False): both skip
    model = mlp_model()
    pre = DistributedKFACPreconditioner(model, mode="replicate_inverses", seed=0, average_gradients=False, **PRE_KW)
    x, y = batches("mlp")[0]
    model.zero_grad()
    nn.functional.cross_entropy(model(x[half]), y[half]).backward()
    if rank == 1:
        model[0].weight.grad[0, 0] = math.inf
    raw = [p.grad.clone() for p in model.parameters()]
    pre.step(x[half], y[half])
    res["inf_grads_untouched"] = all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))
    res["inf_k"] = pre.k

    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
