"""What does the ``max_block_dim`` bound cost in progress per iteration, and what does it save?

A factor larger than the bound is kept as its diagonal. The race's small models have no factor
near the default 4096, so the bound is scaled to make the SAME layers diagonal as the default
does on the full-size models:

  resnet  bound 512: the last stage's 3x3 convolutions with a full-width input (Ā 3·3·64 = 576),
          as 4096 does to resnet18's 3·3·512 = 4608 (its 3·3·256 = 2304 stays dense: here 288).
  lm      bound 96: the LM head's vocabulary-sized G (97), as 4096 does to a GPT-2 head's 50257;
          here the MLP's 256/257 factors become diagonal too (harsher than the default on GPT-2,
          whose 3072/3073 stay dense).

KFAC with its defaults, the same seed and batches with and without the bound; the reported loss
(race_tasks: eval mode, fixed evaluation rows) after every ``--every`` iterations, its ratio to
the unbounded run's, and the ms per iteration.

    OMP_NUM_THREADS=1 PYTHONPATH=python:benchmarks python benchmarks/bench_max_block_dim.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kfac_fast
from _common import machine_info, print_table, write_csv
from race_tasks import make_task

BOUNDS = {"resnet": 512, "lm": 96}


def run(task, bound, seed: int, iters: int, every: int) -> list[dict]:
    model = task.make_model(seed)
    opt = kfac_fast.KFAC(model, loss=task.loss, generator=torch.Generator().manual_seed(seed), max_block_dim=bound)
    data = task.batches(seed)
    rows, t_train = [], 0.0
    for k in range(1, iters + 1):
        x, y = next(data)
        t0 = time.perf_counter()
        opt.step(x, y)
        t_train += time.perf_counter() - t0
        if k % every == 0:
            rows.append({"task": task.name, "max_block_dim": "None" if bound is None else bound, "seed": seed,
                         "iteration": k, "loss": task.evaluate(model), "ms_per_iteration": 1e3 * t_train / k})
    mem = opt.memory_report()
    for r in rows:
        r["factor_bytes"] = mem["factors"]
        r["diagonal_factors"] = len(mem.diagonal_factors)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="resnet,lm")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = dict(machine_info(), load_average=os.getloadavg()[0])
    out = []
    for name in args.tasks.split(","):
        task = make_task(name)
        print(task.description)
        for seed in (int(s) for s in args.seeds.split(",")):
            base = run(task, None, seed, args.iters, args.every)  # interleaved: baseline, then bounded
            bounded = run(task, BOUNDS[name], seed, args.iters, args.every)
            for b, r in zip(base, bounded):
                b["loss_ratio"] = 1.0
                r["loss_ratio"] = r["loss"] / b["loss"]
            out += base + bounded
    print_table(out, ["task", "max_block_dim", "seed", "iteration", "loss", "loss_ratio", "ms_per_iteration",
                      "factor_bytes", "diagonal_factors"])
    summary = []
    for name in args.tasks.split(","):
        last = [r for r in out if r["task"] == name and r["iteration"] == args.iters and r["max_block_dim"] != "None"]
        summary.append({"task": name, "bound": BOUNDS[name],
                        "median_final_loss_ratio": statistics.median(r["loss_ratio"] for r in last)})
    print_table(summary, ["task", "bound", "median_final_loss_ratio"])
    print(f"load average {info['load_average']:.2f}, {info['threads']} thread(s)")
    write_csv("max_block_dim_progress", out, info)


if __name__ == "__main__":
    main()
