"""Where does one K-FAC iteration spend its time on the architecture demos, and how does λ move?

For each task of ``python -m kfac_fast.demo --task cnn|transformer`` (same model, batch size and
data): ``--iters`` iterations of kfac_fast.KFAC with its defaults and ``profile=True`` (a
multiple of T3 = 20 after ``--warmup`` steps, so refreshes are amortised as in a long run), each
followed by one plain SGD step (forward + backward + step) on a copy of the model and the same
batch, so the ratio uses times measured under the same machine load. Also the λ, γ, α, µ of the
last iteration (the damping K-FAC still uses at the iteration counts the demo reaches in 60 s).

    PYTHONPATH=python python benchmarks/profile_arch_step.py --threads 1   # -> results/arch_step_cpu.csv
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.demo import tasks as demo_tasks  # noqa: E402


def profile_task(name: str, args) -> dict:
    targs = demo_tasks.build_parser().parse_args(["--task", name, "--threads", str(args.threads)])
    task = demo_tasks.make_task(targs)
    model = task.make_model()
    sgd_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.0)  # lr 0: same cost, the copy stays at θ₀
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", profile=True, generator=torch.Generator().manual_seed(0))
    batches = task.batches(0)
    phases, kfac_t, sgd_t, stats = Counter(), [], [], {}
    for k in range(args.warmup + args.iters):
        x, y = next(batches)
        t0 = time.perf_counter()
        stats = opt.step(x, y)
        t1 = time.perf_counter()
        sgd.zero_grad(set_to_none=True)
        demo_tasks._ce(sgd_model(x), y).backward()
        sgd.step()
        t2 = time.perf_counter()
        if k >= args.warmup:
            kfac_t.append(t1 - t0), sgd_t.append(t2 - t1)
            phases.update(stats.get("phases", {}))
    n = len(kfac_t)
    sgd_ms = 1e3 * statistics.median(sgd_t)
    row = {"task": name, "iterations": n, "kfac_ms_mean": 1e3 * sum(kfac_t) / n,
           "kfac_ms_median": 1e3 * statistics.median(kfac_t), "sgd_ms_median": sgd_ms,
           "ratio_mean_over_sgd": sum(kfac_t) / n * 1e3 / sgd_ms}
    for phase, total in sorted(phases.items()):
        row[f"ms {phase}"] = 1e3 * total / n
    row.update({"k_last": args.warmup + n, "lambda_last": stats.get("lambda_"), "gamma_last": stats.get("gamma"),
                "alpha_last": stats.get("alpha"), "mu_last": stats.get("mu"), "batch": task.batch_size})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="cnn,transformer")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="arch_step_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [profile_task(t.strip(), args) for t in args.tasks.split(",") if t.strip()]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table(rows, cols)
    write_csv(args.name, rows, machine_info())
    return rows


if __name__ == "__main__":
    main()
