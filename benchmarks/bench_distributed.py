"""What does data parallelism cost and save for the K-FAC preconditioner on this CPU?
2 processes × 1 thread (gloo, each rank half the batch) against 1 process × 2 threads (the
whole batch), on the paper's MNIST autoencoder 784-1000-500-250-30 (batch m = 1000, float32,
KFACPreconditioner defaults: MC Fisher on τ₁ = 1/8 of the batch, T3 = 20, damping 0.1, under SGD
with momentum). Per-iteration time and its phases, bytes communicated per iteration by kind
(gradient, factors, inverses, directions, scalars), inverse memory per rank, for both
distributed modes; plus the primitives the cost model is calibrated on (GEMM and Cholesky-inverse
rates at 1 and 2 threads, gloo all-reduce / broadcast / all-gather time against size).

    PYTHONPATH=python python benchmarks/bench_distributed.py [--iters 40]
        → results/distributed_cpu.csv, results/distributed_cpu_calibration.csv

The timed window is whole refresh periods after a warm-up of 3 iterations (the first three
refresh every iteration): iterations 4 … 3 + iters, so with iters = 40 it holds the refreshes at
k = 20 and 40. A rank's phases are its own host wall time; a phase that waits on a collective
(``scalars``, ``gradient_wait``, ``factor_wait``, the ``*_comm`` phases) also absorbs the other
rank's lateness. The wall time per iteration is rank 0's, between barriers.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

CONFIGS = [  # (name, world, threads per process, mode)
    ("1 process x 2 threads", 1, 2, "replicate_inverses"),
    ("2 processes x 1 thread (replicate_inverses)", 2, 1, "replicate_inverses"),
    ("2 processes x 1 thread (shard_inverses)", 2, 1, "shard_inverses"),
]


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def _median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compute_calibration(threads: int) -> dict:
    """GEMM flop rate and the Cholesky-inverse cost per n³ at ``threads`` threads (float32)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 1000, generator=g), torch.randn(1000, 1000, generator=g)
    t_mm = _median_time(lambda: a @ b)
    out = {"gemm_flops_per_s": 2 * 1000 ** 3 / t_mm}
    for n in (256, 512, 1001):
        X = torch.randn(n, 2 * n, generator=g)
        S = X @ X.T / (2 * n) + 0.1 * torch.eye(n)

        def chol():
            L, _ = torch.linalg.cholesky_ex(S)
            torch.cholesky_inverse(L)

        out[f"chol_inverse_s_n{n}"] = _median_time(chol)
    out["chol_inverse_s_per_n3"] = out["chol_inverse_s_n1001"] / 1001 ** 3
    return out


def comm_calibration(d) -> dict:
    """Seconds per gloo collective against the float32 buffer size (2 ranks, this machine)."""
    import torch.distributed as dist

    out = {}
    for n in (1_000, 100_000, 1_000_000, 4_000_000):
        buf = torch.ones(n)
        chunks = [torch.empty(n // 2) for _ in range(d.world_size)]
        half = torch.ones(n // 2)
        dist.barrier()
        out[f"all_reduce_s_{n}"] = _median_time(lambda: dist.all_reduce(buf))
        dist.barrier()
        out[f"broadcast_s_{n}"] = _median_time(lambda: dist.broadcast(buf, src=0))
        dist.barrier()
        out[f"all_gather_s_{n}"] = _median_time(lambda: dist.all_gather(chunks, half))  # n elements gathered
    return out


def worker(rank: int, world: int, port: int, threads: int, mode: str, iters: int, warmup: int, batch: int,
           out_path: str) -> None:
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from kfac_fast.data import load_mnist
    from kfac_fast.distributed import LocalDistributor, TorchDistributor
    from kfac_fast.distributed_preconditioner import DistributedKFACPreconditioner
    from kfac_fast.models import deep_autoencoder

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        d = TorchDistributor()
    else:
        d = LocalDistributor()
    X, _ = load_mnist()
    model = deep_autoencoder(generator=torch.Generator().manual_seed(0))
    pre = DistributedKFACPreconditioner(model, loss="sigmoid_cross_entropy", damping=0.1, T3=20, mode=mode,
                                        distributor=d, seed=0)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    lossf = torch.nn.BCEWithLogitsLoss(reduction="sum")
    gen = torch.Generator().manual_seed(0)
    share = batch // world
    own = {"forward_backward": 0.0, "optimizer": 0.0}

    def barrier():
        if world > 1:
            dist.barrier()

    t_start = None
    for it in range(warmup + iters):
        if it == warmup:
            barrier()
            pre.timer.reset()
            d.counter.reset()
            own = {"forward_backward": 0.0, "optimizer": 0.0}
            t_start = time.perf_counter()
        idx = torch.randperm(X.shape[0], generator=gen)[:batch][rank * share:(rank + 1) * share]
        x = X.index_select(0, idx)
        t0 = time.perf_counter()
        sgd.zero_grad(set_to_none=True)
        (lossf(model(x), x) / x.shape[0]).backward()
        t1 = time.perf_counter()
        pre.step(x)
        t2 = time.perf_counter()
        sgd.step()
        t3 = time.perf_counter()
        own["forward_backward"] += t1 - t0
        own["optimizer"] += t3 - t2
    barrier()
    wall = time.perf_counter() - t_start
    phases = dict(own, **pre.timer.seconds)
    res = {
        "rank": rank, "world": world, "threads": threads, "mode": mode, "iters": iters, "batch": batch,
        "seconds_per_iteration": wall / iters,
        "phases_per_iteration": {k: v / iters for k, v in phases.items()},
        "bytes_per_iteration": {k: v / iters for k, v in d.counter.payload.items()},
        "wire_bytes_per_iteration": {k: v / iters for k, v in d.counter.sent.items()},
        "calls_per_iteration": {k: v / iters for k, v in d.counter.calls.items()},
        "inverse_bytes_held": sum(t.numel() * t.element_size() for t in pre.inverse.held_tensors()),
        "factor_bytes": sum(t.numel() * t.element_size() for t in pre.factors.tensors()),
        "params": sum(p.numel() for p in model.parameters()),
        "blocks": [[l.name, l.a_dim, l.g_dim] for l in pre.layers],
        "owners": pre.inverse.owners,
        "k": pre.k,
    }
    if world > 1:
        res["comm_calibration"] = comm_calibration(d)
        dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(res, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, threads: int, mode: str, args, tmp: str) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    outs = [os.path.join(tmp, f"w{world}_{mode}_r{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", str(r), str(world), str(port),
                               str(threads), mode, str(args.iters), str(args.warmup), str(args.batch), outs[r]],
                              env=env) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a worker of the {world}-process run failed (exit {p.returncode})")
    return [json.load(open(o)) for o in outs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=40, help="timed iterations (whole refresh periods of T3 = 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1000, help="global batch m")
    p.add_argument("--name", default="distributed_cpu")
    p.add_argument("--_worker", nargs=9, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        r, w, port, th, mode, iters, warm, batch, out = args._worker
        worker(int(r), int(w), int(port), int(th), mode, int(iters), int(warm), int(batch), out)
        return
    from _common import machine_info, print_table, write_csv

    import tempfile

    load_before = _loadavg()
    tmp = tempfile.mkdtemp(prefix="bench_dist_")
    results = {}
    for name, world, threads, mode in CONFIGS:
        print(f"running {name} ...", flush=True)
        results[name] = run_config(world, threads, mode, args, tmp)
    calib = {f"threads{t}": compute_calibration(t) for t in (1, 2)}
    load_after = _loadavg()
    torch.set_num_threads(2)
    info = machine_info()
    info.update(threads="per config", loadavg_before=load_before, loadavg_after=load_after)

    rows, table = [], []
    for name, world, threads, mode in CONFIGS:
        res = results[name]
        r0 = res[0]
        ph_names = sorted({k for r in res for k in r["phases_per_iteration"]})
        trow = {"config": name, "s/iter": r0["seconds_per_iteration"]}
        for k in ph_names:
            v = statistics.mean(r["phases_per_iteration"].get(k, 0.0) for r in res)
            rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode, metric=f"phase_s:{k}",
                             value=v))
        rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode,
                         metric="seconds_per_iteration", value=r0["seconds_per_iteration"]))
        for kind, v in r0["bytes_per_iteration"].items():
            rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode,
                             metric=f"payload_bytes:{kind}", value=v))
            rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode,
                             metric=f"wire_bytes_sent:{kind}", value=r0["wire_bytes_per_iteration"][kind]))
            trow[f"{kind} B"] = v
        for key in ("inverse_bytes_held", "factor_bytes", "params", "iters", "batch"):
            rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode, metric=key,
                             value=r0[key]))
        rows.append(dict(config=name, world=world, threads_per_process=threads, mode=mode, metric="owners",
                         value=" ".join(map(str, r0["owners"]))))
        trow["inverse MiB/rank"] = r0["inverse_bytes_held"] / 2 ** 20
        table.append(trow)
        print(f"\n{name}: phases per iteration (s, mean over ranks)")
        print_table([{"phase": k, "s": statistics.mean(r["phases_per_iteration"].get(k, 0.0) for r in res)}
                     for k in ph_names], ["phase", "s"])
    print()
    print_table(table, list(table[0].keys()))
    write_csv(args.name, rows, info)
    crow = []
    for t, c in calib.items():
        for k, v in c.items():
            crow.append(dict(what=f"{t}:{k}", value=v))
    for name, world, _, _ in CONFIGS:
        if world > 1:
            for k, v in results[name][0]["comm_calibration"].items():
                crow.append(dict(what=f"gloo2:{name}:{k}", value=v))
    write_csv(args.name + "_calibration", crow, info)


if __name__ == "__main__":
    main()
