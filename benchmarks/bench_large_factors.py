"""What do large Kronecker factors cost, with and without the ``max_block_dim`` bound and the
warm-up rule (k = 2, 3 rebuild only blocks whose largest dense factor is ≤ 1024)?

1. state: timm resnet18 (num_classes 10, 32×32 inputs, as docs/measurements.md's integration
   table): KFAC's state after one step over its parameters, unbounded and with the default
   bound; and a GPT-2-size LM head Linear(768, 50257): its factor bytes (measured with the
   bound on an Embedding → Linear(768, 50257) model; computed for the unbounded G, which does
   not fit in this machine's memory twice).
2. refresh cost per factor size: one damped factor inverse by Cholesky (the default
   factorization), float32, median of 3: what the warm-up rule's 1024 threshold trades.
3. warm-up: KFACPreconditioner (capture="pass", default τ₁ = 1/8) on timm resnet18 (1000
   classes, 224×224, batch 8): the wall time of iterations 1, 2, 3 and of an SGD step (forward,
   backward, update) for scale; Sec 8's rebuild of every block at k ≤ 3 ("sec8") against the
   warm-up rule ("rule"), with the default bound and unbounded.

    OMP_NUM_THREADS=1 PYTHONPATH=python:benchmarks python benchmarks/bench_large_factors.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import kfac_fast  # noqa: E402
from kfac_fast.curvature import inverses  # noqa: E402
from kfac_fast.curvature.factors import DEFAULT_MAX_BLOCK_DIM  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402

MB = 2 ** 20


def resnet18(num_classes: int):
    import _torchvision_placeholder

    _torchvision_placeholder.install()
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=num_classes)


def state_rows() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)  # tests/test_integrations.py's batch
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    for bound in (None, DEFAULT_MAX_BLOCK_DIM):
        model = resnet18(10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
            opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", max_block_dim=bound)
        opt.step(x, y)
        mem = opt.memory_report()
        rows.append({"what": "timm resnet18 KFAC state", "max_block_dim": str(bound),
                     "factors_MB": mem["factors"] / MB, "inverse_MB": mem["inverse"] / MB,
                     "params_MB": mem["params"] / MB,
                     "state_over_params": (mem["factors"] + mem["inverse"] + mem["delta0"]) / mem["params"],
                     "diagonal": "; ".join(f"{k}: {v}" for k, v in mem.diagonal_factors.items())})
    # the LM head: Linear(768, 50257) after an Embedding (the head's Ā is 769 dense, its G 50257)
    V, d = 50257, 768
    head_params = (V * d + V) * 4
    model = nn.Sequential(nn.Embedding(64, d), nn.Linear(d, V))
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", tau1=1.0)
    t = torch.randint(0, 64, (4,))
    yy = torch.randint(0, V, (4,))
    F.cross_entropy(model(t), yy).backward()
    pre.step(t, yy)
    head = [f for f in pre.factors.current if f.name == "model.1"][0]
    measured = 2 * (head.A.numel() + head.G.numel()) * 4  # two buffers
    rows.append({"what": "Linear(768, 50257) head factors (measured)", "max_block_dim": str(DEFAULT_MAX_BLOCK_DIM),
                 "factors_MB": measured / MB, "params_MB": head_params / MB,
                 "state_over_params": measured / head_params, "diagonal": pre.memory_report().diagonal_factors["model.1"]})
    dense = 2 * ((d + 1) ** 2 + V ** 2) * 4
    rows.append({"what": "Linear(768, 50257) head factors (computed: 2 buffers of 769² + 50257² float32)",
                 "max_block_dim": "None", "factors_MB": dense / MB, "params_MB": head_params / MB,
                 "state_over_params": dense / head_params, "diagonal": ""})
    return rows


def refresh_rows() -> list[dict]:
    import statistics

    rows = []
    for n in (512, 1024, 1152, 2304, 4608):
        X = torch.randn(2 * n, n)
        M = X.t() @ X / (2 * n)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            L, _ = torch.linalg.cholesky_ex(M + 1e-3 * torch.eye(n))
            torch.cholesky_inverse(L)
            ts.append(time.perf_counter() - t0)
        rows.append({"what": "damped factor inverse (Cholesky), float32", "n": n, "median_s": statistics.median(ts)})
        print(rows[-1], flush=True)
    return rows


def warmup_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 1000, (8,), generator=g)) for _ in range(3)]
    rows = []

    def sgd_step(model, opt, x, y):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for rep in range(repeats):  # interleaved
        model = resnet18(1000)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        sgd_step(model, opt, *data[0])
        t0 = time.perf_counter()
        for x, y in data:
            sgd_step(model, opt, x, y)
        sgd = (time.perf_counter() - t0) / len(data)
        for bound in (DEFAULT_MAX_BLOCK_DIM, None):
            for rule in ("sec8", "rule"):
                limit = 10 ** 9 if rule == "sec8" else inverses.WARMUP_REBUILD_MAX_DIM
                saved, inverses.WARMUP_REBUILD_MAX_DIM = inverses.WARMUP_REBUILD_MAX_DIM, limit
                try:
                    model = resnet18(1000)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
                        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", max_block_dim=bound,
                                                           generator=torch.Generator().manual_seed(0))
                    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                    times = []
                    for x, y in data:
                        t0 = time.perf_counter()
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        pre.step(x, y)
                        opt.step()
                        times.append(time.perf_counter() - t0)
                finally:
                    inverses.WARMUP_REBUILD_MAX_DIM = saved
                rows.append({"what": "resnet18 preconditioner warm-up", "max_block_dim": str(bound), "rule": rule,
                             "repeat": rep, "iter1_s": times[0], "iter2_s": times[1], "iter3_s": times[2],
                             "first3_s": sum(times), "sgd_step_s": sgd, "first3_over_sgd": sum(times) / sgd})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-state", action="store_true")
    p.add_argument("--skip-warmup", action="store_true")
    p.add_argument("--skip-refresh", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = dict(machine_info(), load_average=os.getloadavg()[0])
    if not args.skip_state:
        rows = state_rows()
        print_table(rows, ["what", "max_block_dim", "factors_MB", "inverse_MB", "params_MB", "state_over_params",
                           "diagonal"])
        write_csv("large_factors_state", rows, info)
    if not args.skip_refresh:
        rows = refresh_rows()
        print_table(rows, ["what", "n", "median_s"])
        write_csv("large_factors_refresh", rows, dict(info, load_average_end=os.getloadavg()[0]))
    if not args.skip_warmup:
        rows = warmup_rows(args.repeats)
        print_table(rows, ["max_block_dim", "rule", "repeat", "iter1_s", "iter2_s", "iter3_s", "first3_s",
                           "sgd_step_s", "first3_over_sgd"])
        write_csv("large_factors_warmup", rows, dict(info, load_average_end=os.getloadavg()[0]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end, 1 thread")


if __name__ == "__main__":
    main()
