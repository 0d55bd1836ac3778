"""Coverage, K-FAC state memory and the J·v providers on models built by other libraries
(tiny random transformers Llama and GPT-2, timm resnet18 at 32×32, a torchvision-shaped ViT on
nn.MultiheadAttention): what tests/test_integrations.py trains, measured.

    python benchmarks/bench_integration_models.py [--repeats 5]

Per model: the Kronecker fraction of the trainable parameters, the bytes of KFAC's state
(factors, inverse, δ₀) after one step against the parameters' bytes, the J·v provider KFAC
chose, and one linearized pass with KFAC's two directions per provider (median of interleaved
repeats, 1 thread; "fails" where the provider lacks a derivative). Writes
results/integration_models_cpu.csv with machine and versions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import kfac_fast  # noqa: E402
from kfac_fast.curvature import linearize  # noqa: E402
from _common import machine_info, write_csv  # noqa: E402
import test_integrations as T  # noqa: E402

PROVIDERS = ("forward", "forward_math", "reverse_over_reverse")


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default=",".join(T.MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        make, batch = T.MODELS[name]
        torch.manual_seed(0)
        model = make()
        x, y = batch()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
            opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
        cov = opt.coverage()
        opt.step(x, y)
        mem = opt.memory_report()
        chosen = linearize.chosen(model)
        # two directions (Δ and δ₀ in KFAC), each a (g_dim, a_dim) matrix per block
        g = torch.Generator().manual_seed(1)
        dirs = [[torch.randn(*l.to_matrix(*[q.detach() for q in l.params()]).shape, generator=g) * 1e-3
                 for l in opt.layers] for _ in range(2)]
        times = {}
        for prov in PROVIDERS:
            try:
                linearize.jvp(model, opt.layers, x, dirs, provider=prov)
                times[prov] = []
            except (NotImplementedError, RuntimeError):
                times[prov] = None
        for _ in range(args.repeats):  # interleaved
            for prov in PROVIDERS:
                if times[prov] is not None:
                    times[prov].append(_time(lambda: linearize.jvp(model, opt.layers, x, dirs, provider=prov), 1))
        row = {"model": name, "trainable_params": cov.trainable, "kronecker_fraction": round(cov.kronecker_fraction, 4),
               "param_MB": round(mem["params"] / 2**20, 2), "factors_MB": round(mem["factors"] / 2**20, 2),
               "inverse_MB": round(mem["inverse"] / 2**20, 2), "delta0_MB": round(mem["delta0"] / 2**20, 2),
               "state_over_params": round((mem["factors"] + mem["inverse"] + mem["delta0"]) / mem["params"], 2),
               "provider_chosen": chosen}
        for prov in PROVIDERS:
            row[f"{prov}_ms"] = "fails" if times[prov] is None else round(1e3 * statistics.median(times[prov]), 1)
        rows.append(row)
        print(row, flush=True)
    write_csv("integration_models_cpu", rows, machine_info())


if __name__ == "__main__":
    main()
