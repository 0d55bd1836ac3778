"""What does data parallelism cost and save for the K-FAC preconditioner on this CPU?
2 processes × 1 thread (gloo, each rank half the batch) against 1 process × 2 threads (the
whole batch), on the paper's MNIST autoencoder 784-1000-500-250-30 (batch m = 1000, float32,
KFACPreconditioner defaults: MC Fisher on τ₁ = 1/8 of the batch, T3 = 20, damping 0.1, under SGD
with momentum). Per-iteration time and its phases, bytes communicated per iteration by kind
(gradient, factors, inverses, directions, scalars), inverse memory per rank, for both
distributed modes; plus the primitives the cost model is calibrated on (GEMM and Cholesky-inverse
rates at 1 and 2 threads, measured between the rounds in the same conditions, and gloo
all-reduce / broadcast / all-gather time against size).

    PYTHONPATH=python python benchmarks/bench_distributed.py [--rounds 2 --period 20]
        → results/distributed_cpu.csv, results/distributed_cpu_calibration.csv

One launch of 2 processes runs every configuration in turn, ``--rounds`` times ``--period``
iterations each (interleaved: a shared machine's drifting load hits them alike; rank 1 waits in
a barrier while rank 0 runs the one-process configurations, 1 × 1 thread included as the
reference for both), after a warm-up of 3 iterations each (the first three refresh every
iteration). A period of T3 = 20 holds exactly one refresh, so the means are over whole refresh
periods. Reported: the median over the rounds of the per-iteration time and of each phase (a
load spike on a shared machine spoils one round, not the result); the means are in the CSV too.
A rank's phases are its own host wall time; a phase that waits on a collective
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
    ("1 process x 1 thread", 1, 1, "replicate_inverses"),
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


def comm_calibration(dist) -> dict:
    """Seconds per gloo collective against the float32 buffer size (2 ranks, this machine)."""
    out = {}
    for n in (1_000, 100_000, 1_000_000, 4_000_000):
        buf = torch.ones(n)
        chunks = [torch.empty(n // 2) for _ in range(dist.get_world_size())]
        half = torch.ones(n // 2)
        dist.barrier()
        out[f"all_reduce_s_{n}"] = _median_time(lambda: dist.all_reduce(buf))
        dist.barrier()
        out[f"broadcast_s_{n}"] = _median_time(lambda: dist.broadcast(buf, src=0))
        dist.barrier()
        out[f"all_gather_s_{n}"] = _median_time(lambda: dist.all_gather(chunks, half))  # n elements gathered
    return out


class Config:
    """One configuration's model, preconditioner and accumulated measurements on this rank."""

    def __init__(self, name, world, threads, mode, rank, dist_world, X, batch):
        from kfac_fast.distributed import LocalDistributor, TorchDistributor
        from kfac_fast.preconditioner import DistributedKFACPreconditioner
        from kfac_fast.demo.models import deep_autoencoder

        self.name, self.world, self.threads, self.mode = name, world, threads, mode
        self.active = world > 1 or rank == 0
        self.rank = rank if world > 1 else 0
        self.X, self.batch, self.share = X, batch, batch // world
        if not self.active:
            return
        self.d = TorchDistributor() if world > 1 else LocalDistributor()
        self.model = deep_autoencoder(generator=torch.Generator().manual_seed(0))
        # Tf=1: statistics and a factor reduction every step, as the cost model counts them
        self.pre = DistributedKFACPreconditioner(self.model, loss="sigmoid_cross_entropy", damping=0.1, T3=20, Tf=1,
                                                 mode=mode, distributor=self.d, seed=0)
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.lossf = torch.nn.BCEWithLogitsLoss(reduction="sum")
        self.gen = torch.Generator().manual_seed(0)
        self.own = {"forward_backward": 0.0, "optimizer": 0.0}
        self.wall, self.iters, self.rounds, self.round_phases, self._cum = 0.0, 0, [], [], None

    def reset(self):
        self.pre.timer.reset()
        self.d.counter.reset()
        self.own = {"forward_backward": 0.0, "optimizer": 0.0}
        self.wall, self.iters, self.rounds, self.round_phases, self._cum = 0.0, 0, [], [], None

    def run(self, n: int, timed: bool) -> None:
        import torch.distributed as dist

        torch.set_num_threads(self.threads)
        if self.world > 1:
            dist.barrier()
        t_start = time.perf_counter()
        for _ in range(n):
            idx = torch.randperm(self.X.shape[0], generator=self.gen)[:self.batch]
            x = self.X.index_select(0, idx[self.rank * self.share:(self.rank + 1) * self.share])
            t0 = time.perf_counter()
            self.sgd.zero_grad(set_to_none=True)
            (self.lossf(self.model(x), x) / x.shape[0]).backward()
            t1 = time.perf_counter()
            self.pre.step(x)
            t2 = time.perf_counter()
            self.sgd.step()
            t3 = time.perf_counter()
            self.own["forward_backward"] += t1 - t0
            self.own["optimizer"] += t3 - t2
        if self.world > 1:
            dist.barrier()
        dt = time.perf_counter() - t_start
        if timed:
            self.wall += dt
            self.iters += n
            self.rounds.append(dt / n)
            now = dict(self.own, **self.pre.timer.seconds)
            prev = self._cum if self._cum is not None else {}
            self.round_phases.append({k: (v - prev.get(k, 0.0)) / n for k, v in now.items()})
            self._cum = now

    def result(self) -> dict:
        it = self.iters
        phases = dict(self.own, **self.pre.timer.seconds)
        return {
            "name": self.name, "rank": self.rank, "world": self.world, "threads": self.threads, "mode": self.mode,
            "iters": it, "batch": self.batch, "seconds_per_iteration": statistics.median(self.rounds),
            "seconds_per_iteration_mean": self.wall / it,
            "seconds_per_iteration_by_round": self.rounds,
            # medians over the rounds (a load spike on the shared machine hits one round)
            "phases_per_iteration": {k: statistics.median(r.get(k, 0.0) for r in self.round_phases) for k in phases},
            "phases_per_iteration_mean": {k: v / it for k, v in phases.items()},
            "bytes_per_iteration": {k: v / it for k, v in self.d.counter.payload.items()},
            "wire_bytes_per_iteration": {k: v / it for k, v in self.d.counter.sent.items()},
            "calls_per_iteration": {k: v / it for k, v in self.d.counter.calls.items()},
            "inverse_bytes_held": sum(t.numel() * t.element_size() for t in self.pre.inverse.held_tensors()),
            "factor_bytes": sum(t.numel() * t.element_size() for t in self.pre.factors.tensors()),
            "params": sum(p.numel() for p in self.model.parameters()),
            "blocks": [[l.name, l.a_dim, l.g_dim] for l in self.pre.layers],
            "owners": self.pre.inverse.owners, "k": self.pre.k,
        }


def worker(rank: int, port: int, rounds: int, period: int, warmup: int, batch: int, out_path: str) -> None:
    """Both ranks: every configuration in turn, ``rounds`` times ``period`` iterations each
    (interleaved, so a shared machine's drifting load hits all of them alike); rank 1 waits in a
    barrier while rank 0 runs the one-process configurations."""
    import torch.distributed as dist

    from kfac_fast.demo.data import load_mnist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    X, _ = load_mnist()
    cfgs = [Config(n, w, t, m, rank, 2, X, batch) for n, w, t, m in CONFIGS]
    for c in cfgs:  # warm-up: the first 3 iterations refresh every time
        if c.active:
            c.run(warmup, timed=False)
            c.reset()
        dist.barrier()
    calib: dict = {}
    for _ in range(rounds):
        for c in cfgs:
            if c.active:
                c.run(period, timed=True)
            dist.barrier()
        # the compute primitives, in the same conditions: rank 0 alone at 1 and 2 threads, then
        # both ranks at 1 thread at once (as in the 2-process runs)
        for threads, both in ((1, False), (2, False), (1, True)):
            if rank == 0 or both:
                for k, v in compute_calibration(threads).items():
                    calib.setdefault(f"{'both' if both else 'alone'}_threads{threads}:{k}", []).append(v)
            dist.barrier()
    res = {"configs": [c.result() for c in cfgs if c.active],
           "compute_calibration": {k: statistics.median(v) for k, v in calib.items()}}
    torch.set_num_threads(1)
    res["comm_calibration"] = comm_calibration(dist)
    dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(res, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(args, tmp: str) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    outs = [os.path.join(tmp, f"r{r}.json") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", str(r), str(port),
                               str(args.rounds), str(args.period), str(args.warmup), str(args.batch), outs[r]],
                              env=env) for r in range(2)]
    for p in procs:
        if p.wait(timeout=3600) != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    return [json.load(open(o)) for o in outs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration")
    p.add_argument("--period", type=int, default=20, help="iterations per round (T3 = 20: one refresh each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1000, help="global batch m")
    p.add_argument("--name", default="distributed_cpu")
    p.add_argument("--_worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        r, port, rounds, period, warm, batch, out = args._worker
        worker(int(r), int(port), int(rounds), int(period), int(warm), int(batch), out)
        return
    import tempfile

    from _common import machine_info, print_table, write_csv

    load_before = _loadavg()
    per_rank = run_all(args, tempfile.mkdtemp(prefix="bench_dist_"))
    load_after = _loadavg()
    info = machine_info()
    info.update(threads="per config", loadavg_before=load_before, loadavg_after=load_after)
    print(f"load average before {load_before}, after {load_after}")

    rows, table = [], []
    for name, world, threads, mode in CONFIGS:
        res = [c for r in per_rank for c in r["configs"] if c["name"] == name]
        r0 = res[0]
        base = dict(config=name, world=world, threads_per_process=threads, mode=mode)
        ph_names = sorted({k for r in res for k in r["phases_per_iteration"]})
        trow = {"config": name, "s/iter": r0["seconds_per_iteration"],
                "rounds": " ".join(f"{v:.3f}" for v in r0["seconds_per_iteration_by_round"])}
        for k in ph_names:
            rows.append(dict(base, metric=f"phase_s:{k}",
                             value=statistics.mean(r["phases_per_iteration"].get(k, 0.0) for r in res)))
        rows.append(dict(base, metric="seconds_per_iteration", value=r0["seconds_per_iteration"]))
        rows.append(dict(base, metric="seconds_per_iteration_mean", value=r0["seconds_per_iteration_mean"]))
        rows.append(dict(base, metric="seconds_per_iteration_by_round",
                         value=" ".join(f"{v:.4f}" for v in r0["seconds_per_iteration_by_round"])))
        for kind, v in r0["bytes_per_iteration"].items():
            rows.append(dict(base, metric=f"payload_bytes:{kind}", value=v))
            rows.append(dict(base, metric=f"wire_bytes_sent:{kind}", value=r0["wire_bytes_per_iteration"][kind]))
            trow[f"{kind} B"] = v
        for key in ("inverse_bytes_held", "factor_bytes", "params", "iters", "batch"):
            rows.append(dict(base, metric=key, value=r0[key]))
        rows.append(dict(base, metric="owners", value=" ".join(map(str, r0["owners"]))))
        trow["inverse MiB/rank"] = r0["inverse_bytes_held"] / 2 ** 20
        table.append(trow)
        print(f"\n{name}: phases per iteration (s, mean over ranks)")
        print_table([{"phase": k, "s": statistics.mean(r["phases_per_iteration"].get(k, 0.0) for r in res)}
                     for k in ph_names], ["phase", "s"])
    print()
    print_table(table, list(table[0].keys()))
    write_csv(args.name, rows, info)
    crow = [dict(what=k, value=v) for k, v in per_rank[0]["compute_calibration"].items()]
    crow += [dict(what=f"gloo2:{k}", value=v) for k, v in per_rank[0]["comm_calibration"].items()]
    write_csv(args.name + "_calibration", crow, info)


if __name__ == "__main__":
    main()
