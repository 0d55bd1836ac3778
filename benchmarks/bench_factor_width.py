"""Does the homogeneous coordinate cost more than its FLOPs in the A-factor update?

Ā = E[ā āᵀ] with ā = [a; 1] (Sec 2.1) makes the update's GEMM (d+1) columns wide. On CPU BLAS
an odd width can run far slower than the aligned d (the reason ASDL, whose A leaves the bias
out, was ahead of KFACPreconditioner on the autoencoder with biases in
bench_preconditioner_peers.py). This compares, on the autoencoder's layer widths and batch:

  padded    ``ops.factor_update_ref(homogeneous=True)`` (the reference): cat([X, 1]) then
            F.addmm_(X̄ᵀ, X̄)
  aligned   ``ops.factor_update(homogeneous=True, backend="torch")``, the torch backend since
            this measurement: T = XᵀX (d × d), F[:d, :d] ← εF[:d, :d] + s·T, the last row/column
            from the column sums of X and m (checked equal to the padded result)
  bias-free ``ops.factor_update(homogeneous=False)`` on X: the cost floor (d × d only)

interleaved (padded, aligned, bias-free in turn), medians over repeats, 1 thread.

    PYTHONPATH=python python benchmarks/bench_factor_width.py     # ~1 min

Writes benchmarks/results/factor_width_cpu.csv.
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

from kfac_fast import ops  # noqa: E402
from kfac_fast.demo.models import MNIST_AUTOENCODER  # noqa: E402


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    enc = list(MNIST_AUTOENCODER)
    widths = enc + enc[-2:0:-1]  # the inputs of the 8 layers: 784 1000 500 250 30 250 500 1000
    g = torch.Generator().manual_seed(0)
    rows = []
    for d in sorted(set(widths)):
        X = torch.rand(args.batch, d, generator=g)
        Fp, Fa, Fb = torch.eye(d + 1), torch.eye(d + 1), torch.eye(d)
        eps, scale = 0.95, 0.05 / args.batch
        variants = {
            "padded": lambda: ops.factor_update_ref([Fp], [X], eps=eps, scale=scale, homogeneous=True),
            "aligned": lambda: ops.factor_update([Fa], [X], eps=eps, scale=scale, homogeneous=True, backend="torch"),
            "bias-free": lambda: ops.factor_update([Fb], [X], eps=eps, scale=scale, homogeneous=False, backend="torch"),
        }
        times = {k: [] for k in variants}
        for k, f in variants.items():  # warm-up
            f()
        for _ in range(args.repeats):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        err = float((Fp - Fa).abs().max() / Fp.abs().max())
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"d": d, "layers with this input width": widths.count(d), "padded ms": med["padded"],
                     "aligned ms": med["aligned"], "bias-free ms": med["bias-free"],
                     "padded / aligned": med["padded"] / med["aligned"], "max rel diff": err})
    total = {k: sum(r[k] * r["layers with this input width"] for r in rows)
             for k in ("padded ms", "aligned ms", "bias-free ms")}
    rows.append({"d": "autoencoder (8 layers)", **total, "padded / aligned": total["padded ms"] / total["aligned ms"]})
    print_table(rows, ["d", "layers with this input width", "padded ms", "aligned ms", "bias-free ms",
                       "padded / aligned", "max rel diff"])
    info = dict(machine_info("cpu"), batch=args.batch, repeats=args.repeats,
                load=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    write_csv("factor_width_cpu", rows, info)
    return rows


if __name__ == "__main__":
    main()
