"""One rank of the 2-process gloo checks of KFAC (tests/test_distributed_kfac.py).

    python tests/_distributed_kfac_worker.py RANK WORLD PORT OUTDIR

Writes what it observed to OUTDIR/rank{RANK}.pt; the test process compares ranks with each other
and with single-process runs. Data come from generators seeded per scenario, so the test
process can rebuild every rank's inputs.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

D = torch.float64
ITERS = 20
M = 32  # rows per rank


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def data(seed: int, rows: int = M):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, dtype=D, generator=g)
    y = torch.randint(0, 3, (rows,), generator=g)
    return x, y


CONFIGS = [("block_diagonal", True, "replicate_inverses"), ("block_diagonal", False, "replicate_inverses"),
           ("block_tridiagonal", True, "replicate_inverses"), ("block_diagonal", True, "shard_inverses"),
           ("block_diagonal", True, "replicated_work")]


def same_batch_run(inverse, momentum, mode="replicate_inverses"):
    """Every rank the same batch and the same generator seed: the world-1 trajectory."""
    from kfac_fast import KFAC

    model = make_model()
    opt = KFAC(model, loss="softmax_cross_entropy", inverse=inverse, momentum=momentum, T3=5, T2=10,
               generator=torch.Generator().manual_seed(0), distributed_mode=mode)
    x, y = data(1)
    traj = []
    for _ in range(ITERS):
        s = opt.step(x, y)
        traj.append([p.detach().clone() for p in model.parameters()] + [torch.tensor(s["lambda_"], dtype=D)])
    return traj


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from kfac_fast import KFAC
    import kfac_fast.curvature.losses as statistics  # sampled_statistics imports sample_targets from here per call

    res = {}
    # 1. the same batch and seed on every rank
    for inverse, momentum, mode in CONFIGS:
        res[f"same/{inverse}/{momentum}/{mode}"] = same_batch_run(inverse, momentum, mode)

    # 2. shards with the default per-rank streams: identical parameters on every rank
    torch.manual_seed(1234)  # the common seed rank 0 broadcasts (other ranks' global RNG may differ)
    if rank:
        torch.manual_seed(99)
    model = make_model()
    opt = KFAC(model, loss="softmax_cross_entropy", T3=5, T2=10)
    x, y = data(10 + rank)
    first = None
    for it in range(ITERS):
        s = opt.step(x, y)
        first = s["loss"] if first is None else first
    res["shards/params"] = [p.detach().clone() for p in model.parameters()]
    res["shards/loss"] = (first, s["loss"])
    res["shards/lambda"] = opt.lambda_
    state = opt.state_dict()  # a collective: the generators of both ranks
    res["shards/state_k"] = state["k"]
    res["shards/n_generators"] = len(state["rank_generators"])
    opt2 = KFAC(make_model(), loss="softmax_cross_entropy", T3=5, T2=10)
    opt2.load_state_dict(state)
    res["shards/resumed_same_stream"] = torch.equal(opt2.generator.get_state(), opt.generator.get_state())
    res["shards/inverse_type"] = type(opt.inverse).__name__
    V = [torch.ones(l.g_dim, l.a_dim, dtype=D) for l in opt.layers]
    res["shards/resumed_apply_equal"] = all(torch.equal(a, b) for a, b in zip(opt.inverse.apply(V),
                                                                              opt2.inverse.apply(V)))
    if rank == 0:
        torch.save(state, os.path.join(out, "kfac_state.pt"))

    # 3. a NaN on rank 1 only: both ranks reject the step, θ stays, then both continue
    model = make_model()
    opt = KFAC(model, loss="softmax_cross_entropy", T3=5, T2=10, generator=torch.Generator().manual_seed(rank))
    x, y = data(20 + rank)
    flags = []
    for it in range(8):
        xb = x.clone()
        if it == 6 and rank == 1:
            xb[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        s = opt.step(xb, y)
        flags.append((bool(s["rejected"]), all(torch.equal(a, b) for a, b in zip(before, model.parameters()))))
    res["nan/flags"] = flags
    res["nan/params"] = [p.detach().clone() for p in model.parameters()]

    # 4. MC factors: the reduced factors equal the factors of the union of the ranks' S₁ with their
    # sampled targets (k = 1: ε = 0, the factors are the batch estimate)
    drawn = []
    real = statistics.sample_targets

    def spy(loss, z, generator=None, like=None):
        y_s = real(loss, z, generator, like=like)
        drawn.append(y_s.clone())
        return y_s

    import kfac_fast.phases.statistics as statistics_phase  # where the step calls sampled_statistics

    batches = []
    real_stats = statistics_phase.sampled_statistics

    def spy_stats(model, blocks, batch, *a, **kw):
        batches.append(batch.clone())  # S₁ (a permutation of the rows with tau1 = 1)
        return real_stats(model, blocks, batch, *a, **kw)

    statistics.sample_targets = spy
    statistics_phase.sampled_statistics = spy_stats
    model = make_model()
    opt = KFAC(model, loss="softmax_cross_entropy", tau1=1.0, generator=torch.Generator().manual_seed(7 + rank))
    x, y = data(30 + rank)
    opt.step(x, y)
    statistics.sample_targets = real
    statistics_phase.sampled_statistics = real_stats
    res["mc/x"], res["mc/y_sampled"] = batches[0], drawn[0]
    res["mc/factors"] = [(f.A.clone(), f.G.clone()) for f in opt.factors.current]

    # 5. a DistributedDataParallel-wrapped model (block names and parameters of the plain one)
    torch.manual_seed(5)
    net = make_model()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = KFAC(ddp, loss="softmax_cross_entropy", T3=5, T2=10, generator=torch.Generator().manual_seed(rank))
    x, y = data(40 + rank)
    for _ in range(6):
        opt.step(x, y)
    res["ddp/names"] = [l.name for l in opt.layers]
    # BatchNorm under DDP: rank 0's running statistics reach every rank before each gradient pass
    torch.manual_seed(6)
    bn_net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    opt_bn = KFAC(nn.parallel.DistributedDataParallel(bn_net), loss="softmax_cross_entropy", T3=5, T2=10,
                  generator=torch.Generator().manual_seed(rank))
    seen = []
    bn_net[1].register_forward_pre_hook(lambda m, a: seen.append(m.running_mean.clone()))
    firsts, afters = [], []
    for _ in range(3):
        seen.clear()
        opt_bn.step(x, y)
        firsts.append(seen[0])  # the gradient pass's forward: after the broadcast
        afters.append(bn_net[1].running_mean.clone())  # after this rank's own update
    res["ddp/bn_at_gradient_pass"] = firsts
    res["ddp/bn_after_step"] = afters
    res["ddp/params"] = [p.detach().clone() for p in net.parameters()]

    # 6. KFACPreconditioner under torch.distributed is the data-parallel one
    from kfac_fast import KFACPreconditioner

    pre = KFACPreconditioner(make_model(), loss="softmax_cross_entropy")
    res["pre/type"] = type(pre).__name__
    try:
        KFACPreconditioner(make_model(), loss="softmax_cross_entropy", capture="hooks")
        res["pre/hooks_error"] = None
    except ValueError as exc:
        res["pre/hooks_error"] = str(exc)

    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
