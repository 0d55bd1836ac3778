"""Which models from timm and Hugging Face transformers K-FAC trains as their users write the loop,
and what it leaves out: small random-init versions (few layers, small widths, 32×32 images,
16-token sequences; no downloads) run 5 steps with each entry point.

    python benchmarks/sweep_models.py [--models a,b] [--steps 5] [--no-autocast]

Entry points per model (targets come from the batch as the user's loss sees them):

* ``kfac``: ``kfac_fast.KFAC`` (Algorithm 2), ``opt.step(batch, targets)``;
* ``pass`` / ``hooks``: ``KFACPreconditioner(capture=...)`` attached to AdamW with a cosine
  scheduler, the plain loop ``zero_grad; loss.backward(); opt.step(); sched.step()``
  (``hooks`` with ``fisher="empirical"``, as under a Trainer);
* ``hooks_bf16`` and ``kfac_bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Recorded per model: works / the error (type and first line), the Kronecker fraction of the
trainable parameters (and in norm scale-shift, dense grouped-conv, diagonal/skipped blocks) and
what is diagonal or skipped and why (``coverage()``), the K-FAC state bytes over all trainable
parameters' bytes (``memory_report()``, after the steps), and the median iteration time of steps
2..N over the plain AdamW loop's in the same precision (1 thread; every run of a model is back to
back, so the machine's load enters each ratio alike). Writes
results/sweep_models_cpu.csv with machine and versions (one row per model and entry point).
timm is imported under tests/_torchvision_placeholder (torchvision cannot import beside CPU torch).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import kfac_fast  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402

from integration_zoo import MODELS, user_loss  # noqa: E402


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def _state_bytes(mem: dict) -> int:
    return sum(v for k, v in mem.items() if k != "params")


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _left_out(cov) -> str:
    """Diagonal / skipped entries, grouped by reason (parameters, count)."""
    groups: dict[str, list] = {}
    for e in cov.entries:
        if e.kind in ("diagonal", "skipped"):
            reason = e.reason or ""
            # the module path at the end of the reason varies per entry: group on the rest
            key = f"{e.kind}: {reason.split(' at ')[0]}"
            groups.setdefault(key, []).append(e)
    parts = []
    for key, es in sorted(groups.items(), key=lambda kv: -sum(e.params for e in kv[1])):
        names = ",".join(sorted({e.name.split(".")[-1] for e in es}))
        parts.append(f"{sum(e.params for e in es)} params [{names}] {key}")
    return " | ".join(parts)


def run_plain(make, batch_fn, steps, autocast):
    torch.manual_seed(0)
    model = make().train()
    batch, y = batch_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = user_loss(model, batch, y)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return statistics.median(times[1:]), losses


def run_entry(make, batch_fn, entry, steps, autocast):
    """One entry point: (coverage, losses, state bytes, param bytes, median step seconds)."""
    torch.manual_seed(0)
    model = make().train()
    batch, y = batch_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        if entry.startswith("kfac"):
            opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
        else:
            capture = "pass" if entry == "pass" else "hooks"
            pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture=capture,
                                               fisher="mc" if capture == "pass" else "empirical")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
            pre.attach(opt, targets=lambda b, y=y: y)
    cov = (opt if entry.startswith("kfac") else pre).coverage()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if entry.startswith("kfac"):
            with autocast():
                stats = opt.step(batch, y)
            losses.append(float(stats["loss"]))
        else:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = user_loss(model, batch, y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    mem = (opt if entry.startswith("kfac") else pre).memory_report()
    return cov, losses, _state_bytes(mem), _param_bytes(model), statistics.median(times[1:])


#: timm models at their real size (construction only: coverage and the blocks' dense sizes)
FULL_SIZE = ("resnet50", "resnext50_32x4d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny",
             "regnetx_002", "regnety_016", "vit_small_patch16_224", "deit3_small_patch16_224",
             "swin_tiny_patch4_window7_224")


def full_size_coverage(names) -> list[dict]:
    """Coverage of full-size timm models (random init, no step): Kronecker / norm / dense
    (grouped conv) / left-out fractions, and what is left out and why."""
    from integration_zoo import _timm

    timm = _timm()
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
            cov = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy").coverage()
        n = cov.trainable
        rows.append({"model": name, "trainable": n, "kron_pct": round(100 * cov.kronecker_fraction, 1),
                     "norm_pct": round(100 * cov.count("scale-shift") / n, 1),
                     "dense_pct": round(100 * cov.count("dense") / n, 1),
                     "left_pct": round(100 * cov.count("skipped") / n, 1), "left_out": _left_out(cov)})
        print({k: v for k, v in rows[-1].items()}, flush=True)
        del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-autocast", action="store_true")
    p.add_argument("--out", default="sweep_models_cpu")
    p.add_argument("--traceback", action="store_true", help="print the traceback of every failure")
    p.add_argument("--full-size", action="store_true",
                   help="only the coverage of full-size timm models (FULL_SIZE, or those of --models among them), "
                        "to results/<out>_full_size.csv")
    args = p.parse_args(argv)
    if args.full_size:  # --models picks among FULL_SIZE (default: all of them)
        rows = full_size_coverage([n for n in args.models.split(",") if n in FULL_SIZE] or FULL_SIZE)
        print()
        print_table(rows, ["model", "trainable", "kron_pct", "norm_pct", "dense_pct", "left_pct", "left_out"])
        write_csv(f"{args.out}_full_size", rows, machine_info())
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*[Ss]ome weights.*")
    entries = ["kfac", "pass", "hooks"] + ([] if args.no_autocast else ["kfac_bf16", "hooks_bf16"])
    rows = []
    for name in args.models.split(","):
        make, batch_fn = MODELS[name]
        bf16_ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        base = {}  # the plain AdamW loop, in float32 and under autocast
        for mode, ctx in (("fp32", contextlib.nullcontext), ("bf16", bf16_ctx)):
            try:
                base[mode] = (run_plain(make, batch_fn, args.steps, ctx)[0], "")
            except Exception as e:  # noqa: BLE001 - a sweep records every failure
                base[mode] = (math.nan, "plain AdamW loop: " + _err(e))
        for entry in entries:
            bf16 = entry.endswith("_bf16")
            autocast = bf16_ctx if bf16 else contextlib.nullcontext
            base_s, base_err = base["bf16" if bf16 else "fp32"]
            row = {"model": name, "entry": entry}
            try:
                cov, losses, state, params, step_s = run_entry(make, batch_fn, entry, args.steps, autocast)
                finite = all(math.isfinite(v) for v in losses)
                row.update(works="yes" if finite else "non-finite loss",
                           kron_pct=round(100 * cov.kronecker_fraction, 1),
                           norm_pct=round(100 * cov.count("scale-shift") / cov.trainable, 1),
                           dense_pct=round(100 * cov.count("dense") / cov.trainable, 1),
                           left_pct=round(100 * (cov.count("diagonal") + cov.count("skipped")) / cov.trainable, 1),
                           trainable=cov.trainable,
                           loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                           state_over_params=round(state / params, 2),
                           step_ms=round(1e3 * step_s, 1),
                           adamw_ms=round(1e3 * base_s, 1),
                           step_ratio=round(step_s / base_s, 2) if math.isfinite(base_s) else "",
                           left_out=_left_out(cov), error=base_err)
            except Exception as e:  # noqa: BLE001
                row.update(works="error", error=_err(e))
                if args.traceback:
                    traceback.print_exc()
            rows.append(row)
            print({k: v for k, v in row.items() if k != "left_out"}, flush=True)
    print()
    print_table(rows, ["model", "entry", "works", "kron_pct", "norm_pct", "dense_pct", "left_pct", "state_over_params",
                       "step_ms", "adamw_ms", "step_ratio", "loss_first", "loss_last", "error"])
    print("\nleft out (diagonal under KFAC, skipped under the preconditioner):")
    seen = set()
    for r in rows:
        if r.get("left_out") and (r["model"], r["left_out"]) not in seen:
            seen.add((r["model"], r["left_out"]))
            print(f"  {r['model']} ({r['entry']}): {r['left_out']}")
    write_csv(args.out, rows, machine_info())


if __name__ == "__main__":
    main()
