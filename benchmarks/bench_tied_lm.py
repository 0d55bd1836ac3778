"""Tied weights on a language model with held-out evaluation: the race's SDPA GPT-style LM
(benchmarks/race_tasks.py, Python's reference docs as characters) with its output layer tied to
the token embedding, trained by ``KFAC`` and by ``KFACPreconditioner`` attached to AdamW
(lr 3e-3, weight decay 0.01), with the shared weight as

* ``kronecker_sum``: the tied pair's Kronecker-sum block (``tied_weights="kronecker_sum"``,
  curvature/blocks/tied.py);
* ``diagonal``: the default ``tied_weights="unsupported"`` with ``unsupported="diagonal"`` for both
  classes (the exact diagonal Fisher over both uses);
* ``kronecker_sum_bounded``: the sum block with ``max_block_dim=80`` so the head's V-side factor
  (V = 97) is a diagonal, as a 32k-50k vocabulary's is under the default bound;
* ``untied``: the same LM with its own head (both uses separate Kronecker blocks);

and AdamW alone on the tied model. Reports the evaluation loss (nats per character on 256 fixed
sequences, eval mode) after ``--iters`` iterations, 3 seeds (model, batches and K-FAC's generator),
1 thread.

    python benchmarks/bench_tied_lm.py [--iters 250] [--seeds 0,1,2]

Writes results/tied_lm_cpu.csv with machine and versions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kfac_fast  # noqa: E402
import race_tasks as R  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402

VARIANTS = ("kronecker_sum", "diagonal", "kronecker_sum_bounded", "untied")


def _model(task, variant: str, seed: int) -> nn.Module:
    m = task.make_model(seed)
    if variant != "untied":
        m.head = nn.Linear(m.tok.embedding_dim, m.tok.num_embeddings, bias=False)
        m.head.weight = m.tok.weight
    return m


def run(task, method: str, variant: str, seed: int, iters: int) -> dict:
    torch.manual_seed(seed)  # K-FAC's subsets and sampled targets draw from a generator seeded from it
    m = _model(task, variant, seed)
    kw = {} if variant in ("diagonal", "untied") else {"tied_weights": "kronecker_sum"}
    if variant == "kronecker_sum_bounded":
        kw["max_block_dim"] = 80
    batches = task.batches(seed)
    if method == "kfac":
        opt = kfac_fast.KFAC(m, loss="softmax_cross_entropy", **kw)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
        if method == "preconditioner+adamw":
            pre = kfac_fast.KFACPreconditioner(m, loss="softmax_cross_entropy", unsupported="diagonal", **kw)
            pre.attach(opt)
    t0 = time.perf_counter()
    for _ in range(iters):
        x, y = next(batches)
        if method == "kfac":
            opt.step(x, y)
        else:
            opt.zero_grad(set_to_none=True)
            task.objective(m, x, y).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    return {"method": method, "variant": variant, "seed": seed, "iters": iters,
            "eval_loss": round(float(task.evaluate(m)), 4), "train_seconds": round(seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=250)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="kfac,preconditioner+adamw,adamw")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    task = R.lm_task()
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            # AdamW alone runs once on the tied model (the variants are K-FAC's treatments of it)
            for variant in args.variants.split(",") if method != "adamw" else ["diagonal"]:
                row = run(task, method, variant, seed, args.iters)
                if method == "adamw":
                    row["variant"] = "tied (no K-FAC)"
                print(row, flush=True)
                rows.append(row)
    print_table(rows, ["method", "variant", "seed", "iters", "eval_loss", "train_seconds"])
    info = machine_info()
    info["load_average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(write_csv("tied_lm_cpu", rows, info))


if __name__ == "__main__":
    main()
