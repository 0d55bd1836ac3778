"""GPU check of the sync-free step: host syncs per K-FAC iteration on CUDA, counted by
``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising CUDA call warns), ordinary and
refresh iterations separately, and the step time against SGD with each compute dtype.

    python scripts/gpu_sync_check.py  -> benchmarks/results/sync_cuda.csv
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _common import machine_info, print_table, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.demo.models import deep_autoencoder  # noqa: E402


def main():
    dev = torch.device("cuda")
    X = torch.rand(5000, 784, device=dev)
    rows = []
    for cd_name, cd in (("fp32", None), ("tf32", "tf32"), ("bf16", torch.bfloat16)):
        model = deep_autoencoder(generator=torch.Generator().manual_seed(0)).to(dev)
        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", compute_dtype=cd,
                             generator=torch.Generator(device=dev).manual_seed(0))
        gen = torch.Generator(device=dev).manual_seed(1)
        syncs = {"ordinary": [], "refresh": []}
        times = []
        for it in range(60):
            x = X[torch.randint(0, X.shape[0], (1000,), device=dev, generator=gen)]
            k = opt.k
            refresh = k % opt.config.T3 == 0 or k <= 3 or opt._unread_bound + 1 >= opt.config.max_rejections
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                t0 = time.perf_counter()
                opt.step(x, x)
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            n = sum("synchroniz" in str(m.message) for m in w)
            if it >= 5:
                syncs["refresh" if refresh else "ordinary"].append(n)
                times.append(t2 - t0)
        sgd_model = deep_autoencoder(generator=torch.Generator().manual_seed(0)).to(dev)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        st = []
        for it in range(30):
            x = X[torch.randint(0, X.shape[0], (1000,), device=dev, generator=gen)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sgd.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(sgd_model(x), x).backward()
            sgd.step()
            torch.cuda.synchronize()
            if it >= 5:
                st.append(time.perf_counter() - t0)
        kt = sum(times) / len(times)
        s = sorted(st)[len(st) // 2]
        rows.append({"compute_dtype": cd_name,
                     "syncs_ordinary_max": max(syncs["ordinary"] or [0]),
                     "syncs_ordinary_mean": sum(syncs["ordinary"]) / max(len(syncs["ordinary"]), 1),
                     "syncs_refresh_mean": sum(syncs["refresh"]) / max(len(syncs["refresh"]), 1),
                     "kfac_ms_amortised": 1e3 * kt, "sgd_ms_median": 1e3 * s, "kfac_over_sgd": kt / s})
    print_table(rows, list(rows[0]))
    write_csv("sync_cuda", rows, machine_info("cuda"))


if __name__ == "__main__":
    main()
