"""How much does KFACPreconditioner add to its base optimizer's step, amortised over the
statistics period Tf and the inverse refresh period T3?

One iteration = zero_grad, forward, backward, [pre.step], opt.step on the race's ResNet
(BatchNorm, batch 128) and SDPA language model (batch 32). Candidates: SGD alone (the baseline),
KFACPreconditioner + SGD with capture="pass" at Tf = 1 (every step) and Tf = 10 (the default at T3 = 20),
and capture="hooks" (MC Fisher) at Tf = 10; T3 = 20 for all. After a warm-up of 25 steps each,
windows of 20 steps (a multiple of Tf and T3, so every window holds the same share of statistics
passes and refreshes) are timed, candidates interleaved window by window; reported: the median
window's mean step, as a ratio to SGD's.

    PYTHONPATH=python python benchmarks/bench_preconditioner_amortised.py [--repeats 5]

Writes benchmarks/results/preconditioner_amortised_cpu.csv (machine, versions, load average).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_csv  # noqa: E402
from race_tasks import make_task  # noqa: E402

import kfac_fast  # noqa: E402

CANDIDATES = {"sgd": None, "pre pass Tf=1": dict(capture="pass", Tf=1), "pre pass Tf=10": dict(capture="pass", Tf=10),
              "pre hooks Tf=10": dict(capture="hooks", Tf=10)}


def make(task, kw):
    model = task.make_model(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pre = None if kw is None else kfac_fast.KFACPreconditioner(model, loss=task.loss, T3=20, **kw,
                                                                generator=torch.Generator().manual_seed(0))
    hooks = kw is not None and kw["capture"] == "hooks"
    batches = task.batches(0)

    def step():
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        task.objective(model, x, y).backward(retain_graph=hooks)
        if pre is not None:
            pre.step(x, y) if not hooks else pre.step(targets=y)
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="resnet,lm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--warmup", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    load0 = os.getloadavg()[0]
    for name in args.tasks.split(","):
        task = make_task(name)
        steps = {c: make(task, kw) for c, kw in CANDIDATES.items()}
        for s in steps.values():
            for _ in range(args.warmup):
                s()
        times = {c: [] for c in steps}
        for _ in range(args.repeats):
            for c, s in steps.items():  # interleaved, window by window
                t0 = time.perf_counter()
                for _ in range(args.window):
                    s()
                times[c].append((time.perf_counter() - t0) / args.window)
        base = statistics.median(times["sgd"])
        for c, ts in times.items():
            rows.append({"task": name, "candidate": c, "ms_per_step": round(1e3 * statistics.median(ts), 1),
                         "ratio_to_sgd": round(statistics.median(ts) / base, 3),
                         "windows_ms": " ".join(f"{1e3 * t:.0f}" for t in ts)})
        print_table([r for r in rows if r["task"] == name], ["task", "candidate", "ms_per_step", "ratio_to_sgd",
                                                               "windows_ms"])
    load = f"{load0:.2f}-{os.getloadavg()[0]:.2f}"
    write_csv("preconditioner_amortised_cpu", rows, dict(machine_info(), load_average=load, window=args.window))


if __name__ == "__main__":
    main()
