"""KFACPreconditioner(capture="hooks") under activation checkpointing: the cost of one training
iteration with and without ``gradient_checkpointing_enable()`` on the tiny random Llama of
tests/integration_zoo.py (vocab 128, hidden 64, 2 layers; 8 sequences of 16 tokens; float32).

    OMP_NUM_THREADS=1 python benchmarks/bench_hooks_checkpointing.py [--rounds 5] [--iters 10]

One iteration: forward (``model(**batch).loss``), backward, ``pre.step(targets=...)`` (none for
the AdamW baseline), AdamW. Variants: AdamW alone; the preconditioner with ``fisher="empirical"``
and ``fisher="mc"`` (its sampled backward runs inside the user's); each without checkpointing,
with ``use_reentrant=False`` (transformers' default) and ``use_reentrant=True`` (empirical only:
the MC Fisher refuses it). Interleaved rounds after 3 warm-up iterations (the first three
steps refresh the inverse), 1 thread: the median time per iteration, and the median over rounds
of the within-round ratio to the same variant without checkpointing (and of the time it adds)
and to AdamW with the same checkpointing. Writes results/hooks_checkpointing_cpu.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import kfac_fast  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402
import integration_zoo as Z  # noqa: E402

VARIANTS = [  # (name, fisher or None for AdamW alone, checkpointing: None / reentrant flag)
    ("adamw", None, None), ("adamw", None, False), ("adamw", None, True),
    ("hooks_empirical", "empirical", None), ("hooks_empirical", "empirical", False),
    ("hooks_empirical", "empirical", True),
    ("hooks_mc", "mc", None), ("hooks_mc", "mc", False),
]


def _ckpt_name(reentrant) -> str:
    return "none" if reentrant is None else ("reentrant" if reentrant else "non_reentrant")


def _setup(fisher, reentrant):
    make, _ = Z.MODELS["hf_llama"]
    torch.manual_seed(0)
    model = make()
    model.train()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pre = None
    if fisher is not None:
        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks",
                                           generator=torch.Generator().manual_seed(0))
    return model, pre, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _iteration(model, pre, opt, batch, y) -> None:
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    if pre is not None:
        pre.step(targets=y)
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    batch, y = Z.causal_batch()
    runs = {}
    for name, fisher, reentrant in VARIANTS:
        model, pre, opt = _setup(fisher, reentrant)
        for _ in range(3):
            _iteration(model, pre, opt, batch, y)
        runs[(name, _ckpt_name(reentrant))] = (model, pre, opt)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for k, (model, pre, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                _iteration(model, pre, opt, batch, y)
            times[k].append((time.perf_counter() - t0) / args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a, b):  # median over rounds of the ratio within a round (robust to load drifting)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    rows = []
    for (name, ck), t in med.items():
        rows.append({"variant": name, "checkpointing": ck, "iteration_ms": 1e3 * t,
                     "vs_no_checkpointing": ratio((name, ck), (name, "none")),
                     "added_ms": 1e3 * statistics.median(x - y for x, y in zip(times[(name, ck)],
                                                                              times[(name, "none")])),
                     "vs_adamw_same_checkpointing": ratio((name, ck), ("adamw", ck)),
                     "rounds": args.rounds, "iters": args.iters, "load_avg_1min": os.getloadavg()[0]})
    print_table(rows, ["variant", "checkpointing", "iteration_ms", "vs_no_checkpointing", "added_ms",
                       "vs_adamw_same_checkpointing", "load_avg_1min"])
    write_csv("hooks_checkpointing_cpu", rows, machine_info())


if __name__ == "__main__":
    main()
