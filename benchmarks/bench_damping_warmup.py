"""Progress per iteration of ``KFACPreconditioner`` under AdamW with and without the damping
warm-up (γ_k = γ·max(1, K/k), ``damping_warmup=K``), on the race's tasks
(benchmarks/race_tasks.py), against AdamW alone.

Every variant of a seed starts from the same weights and sees the same batches; only the
preconditioner's settings differ, and they cost the same per step, so the loss after a given
number of iterations ranks them as the race's clock would. The reported loss is the task's own
evaluation (eval mode, no grad) at the given iterations, the median over seeds.

    python benchmarks/bench_damping_warmup.py --task lm --iters 50,100,200,300,400
    python benchmarks/bench_damping_warmup.py --task autoencoder --iters 10,20,40,80,120

Variants (``--variants``): ``adamw``; ``pre`` (the defaults); ``pre+damping_warmup=0`` (a
constant γ); ``pre+damping=0.1`` ... (any KFACPreconditioner keyword after ``+``).
Writes results/damping_warmup_<task>_cpu.csv (one row per task, variant, seed and iteration count) with
machine and versions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_csv  # noqa: E402
from race import _pre_kwargs  # noqa: E402
from race_tasks import make_task  # noqa: E402

import kfac_fast  # noqa: E402

LR = 3e-3  # AdamW's grid choice on every race task (results/race/<task>_lr_grid.csv)
DEFAULT_VARIANTS = "adamw,pre+damping_warmup=0,pre,pre+damping=0.1+damping_warmup=0"


def run(task_name: str, variant: str, seed: int, marks: list[int]) -> list[float]:
    """The task's evaluation loss after each of ``marks`` iterations of ``variant``, seed ``seed``."""
    task = make_task(task_name)
    torch.manual_seed(seed)
    model = task.make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    pre = None
    if variant != "adamw":
        kw = _pre_kwargs(",".join(variant.split("+")[1:]))
        pre = kfac_fast.KFACPreconditioner(model, loss=task.loss, generator=torch.Generator().manual_seed(seed),
                                           **kw)
    batches = task.batches(seed)
    out = []
    for k in range(1, max(marks) + 1):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        task.objective(model, x, y).backward()
        if pre is not None:
            pre.step(x, y)
        opt.step()
        if k in marks:
            out.append(task.evaluate(model))
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm")
    p.add_argument("--iters", default="50,100,200,300,400", help="iteration counts to evaluate at")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    marks = [int(s) for s in args.iters.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    info = machine_info()
    rows, table = [], []
    for variant in args.variants.split(","):
        curves = [run(args.task, variant, s, marks) for s in seeds]
        for s, c in zip(seeds, curves):
            for k, loss in zip(marks, c):
                rows.append({"task": args.task, "variant": variant, "seed": s, "iteration": k, "loss": loss,
                             "load_average": "%.2f" % os.getloadavg()[0]})
        row = {"variant": variant}
        for i, k in enumerate(marks):
            row[f"it {k}"] = statistics.median(c[i] for c in curves)
        table.append(row)
        print(f"{variant}: " + " ".join(f"{v:.4g}" for k, v in row.items() if k != "variant"), flush=True)
    print_table(table, ["variant"] + [f"it {k}" for k in marks])
    write_csv(f"damping_warmup_{args.task}_cpu", rows, info)
    return rows


if __name__ == "__main__":
    main()
