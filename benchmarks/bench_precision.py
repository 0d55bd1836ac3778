"""What does ``compute_dtype`` cost in accuracy and buy in time?

1. The relative error ‖Δ − Δ₆₄‖/‖Δ₆₄‖ of the preconditioned direction Δ = F̆⁻¹∇h (and F̂⁻¹∇h)
   against float64 from the same factors, per compute dtype, on the MNIST autoencoder's real
   factors after ``--warm`` K-FAC iterations (batch 1000). Also the error of one factor update.
2. The demo (autoencoder, KFAC defaults, batch 1000): training reconstruction error after the
   same iterations and after the same seconds, fp32 against bf16 (and fp16) curvature, methods
   interleaved one iteration each in turn (a shared machine's speed drifts).

    PYTHONPATH=python python benchmarks/bench_precision.py --threads 2
    -> results/precision_<device>.csv, results/precision_<device>_training.csv
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info, print_table, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.curvature.block_inverse import BlockInverse  # noqa: E402
from kfac_fast.curvature.running import snapshot  # noqa: E402
from kfac_fast.demo.data import load_mnist  # noqa: E402
from kfac_fast.demo.models import deep_autoencoder, reconstruction_error  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rel(got, want) -> float:
    num = sum(float(((a.double() - b) ** 2).sum()) for a, b in zip(got, want)) ** 0.5
    return num / max(sum(float((b ** 2).sum()) for b in want) ** 0.5, 1e-300)


def direction_errors(X, args, device) -> list[dict]:
    rows = []
    for kind in ("block_diagonal", "block_tridiagonal"):
        model = deep_autoencoder(generator=torch.Generator().manual_seed(0)).to(device)
        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", inverse=kind,
                             generator=torch.Generator(device=device).manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.warm):
            x = X[torch.randint(0, X.shape[0], (args.batch,), generator=gen)].to(device)
            opt.step(x, x)
        x = X[torch.randint(0, X.shape[0], (args.batch,), generator=gen)].to(device)
        z = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        V = [l.to_matrix(*grads[2 * i: 2 * i + 2]).double() for i, l in enumerate(opt.layers)]
        facs64 = snapshot(opt.factors.current, dtype=torch.float64)
        exact = BlockInverse(facs64, kind=kind, damping=opt.gamma, backend="torch",
                             factorization="eigh")
        want = exact.apply(V)
        facs32 = snapshot(opt.factors.current, dtype=torch.float32)
        for name, cd in DTYPES.items():
            inv = BlockInverse(facs32, kind=kind, damping=opt.gamma, backend=args.backend,
                               factorization="cholesky" if kind == "block_diagonal" else "eigh")
            inv.compute_dtype = cd
            got = inv.apply([v.float() for v in V])
            rows.append({"quantity": f"direction {kind}", "compute_dtype": name, "rel_error_vs_fp64": _rel(got, want),
                         "gamma": opt.gamma, "k": opt.k})
        # one factor update of the first layer's Ā from the batch, per dtype
        a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=device)], 1)
        wantA = a.T @ a / x.shape[0]
        for name, cd in DTYPES.items():
            F = torch.zeros_like(wantA, dtype=torch.float32)
            kfac_fast.ops.factor_update([F], [x if cd is None else x.to(cd)], eps=0.0, scale=1.0 / x.shape[0],
                                        homogeneous=True, backend=args.backend)
            rows.append({"quantity": f"factor A0 update ({kind} run)", "compute_dtype": name,
                         "rel_error_vs_fp64": _rel([F], [wantA]), "k": opt.k})
    return rows


def training(X, args, device) -> list[dict]:
    """Interleaved: one K-FAC iteration per variant in turn until each has run ``--iters`` or
    ``--budget`` seconds; the error at the common iteration count and at equal seconds."""
    variants = {}
    for name in args.train_dtypes.split(","):
        model = deep_autoencoder(generator=torch.Generator().manual_seed(args.seed)).to(device)
        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", compute_dtype=DTYPES[name], backend=args.backend,
                             generator=torch.Generator(device=device).manual_seed(args.seed))
        variants[name] = {"model": model, "opt": opt, "t": 0.0, "it": 0, "gen": torch.Generator().manual_seed(1),
                          "trace": []}
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < args.budget * len(variants):
        busy = False
        for name, v in variants.items():
            if v["it"] >= args.iters or v["t"] >= args.budget:
                continue
            busy = True
            x = X[torch.randint(0, X.shape[0], (args.batch,), generator=v["gen"])].to(device)
            t0 = time.perf_counter()
            v["opt"].step(x, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            v["t"] += time.perf_counter() - t0
            v["it"] += 1
            if v["it"] % args.eval_every == 0:
                v["trace"].append((v["it"], v["t"], reconstruction_error(v["model"], X)))
        if not busy:
            break
    common_it = min(v["it"] for v in variants.values())
    common_t = min(v["t"] for v in variants.values())
    rows = []
    for name, v in variants.items():
        at_it = [e for it, _, e in v["trace"] if it <= common_it]
        at_t = [e for _, t, e in v["trace"] if t <= common_t]
        rows.append({"compute_dtype": name, "iterations": v["it"], "seconds": v["t"],
                     "ms_per_iteration": 1e3 * v["t"] / max(v["it"], 1),
                     "error_at_common_iterations": at_it[-1] if at_it else None,
                     "common_iterations": common_it,
                     "error_at_equal_seconds": at_t[-1] if at_t else None, "equal_seconds": common_t})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--warm", type=int, default=30, help="K-FAC iterations before measuring the direction error")
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per variant (training part)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--train-dtypes", default="fp32,bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    X, src = load_mnist()
    info = dict(machine_info(args.device), data=src, batch=args.batch, backend=args.backend)
    rows = direction_errors(X, args, device)
    print_table(rows, ["quantity", "compute_dtype", "rel_error_vs_fp64", "k"])
    write_csv(f"precision_{device.type}", rows, info)
    if not args.skip_training:
        tr = training(X, args, device)
        print_table(tr, ["compute_dtype", "iterations", "ms_per_iteration", "common_iterations",
                         "error_at_common_iterations", "equal_seconds", "error_at_equal_seconds"])
        write_csv(f"precision_{device.type}_training", tr, info)


if __name__ == "__main__":
    main()
