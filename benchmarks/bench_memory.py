"""How many bytes of state does K-FAC keep on the paper's MNIST autoencoder (784-1000-500-250-30,
batch 1000, float32)? ``KFAC.memory_report()`` after 3 steps (the first refreshes), each storage
counted once, for both inverses.

    PYTHONPATH=python python benchmarks/bench_memory.py   → results/memory_cpu.csv
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

import kfac_fast  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402
from kfac_fast.demo.models import deep_autoencoder  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 784)
    rows = []
    for inverse in ("block_diagonal", "block_tridiagonal"):
        model = deep_autoencoder(generator=torch.Generator().manual_seed(0))
        opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", inverse=inverse,
                             generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            opt.step(x, x)
        for kind, nbytes in opt.memory_report().items():
            rows.append(dict(inverse=inverse, kind=kind, bytes=nbytes, MiB=round(nbytes / 2 ** 20, 1)))
    print_table(rows, ["inverse", "kind", "bytes", "MiB"])
    write_csv("memory_cpu", rows, machine_info())


if __name__ == "__main__":
    main()
