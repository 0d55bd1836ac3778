"""Which J·v provider should the exact-Fisher products (α, µ: Sec 6.4, 7; ρ's model: Sec 6.5)
use per model? One linearized pass with n directions (KFAC uses n = 2: Δ and δ₀), as
``kfac_fast.curvature.linearize.jvp(..., provider=...)`` runs it, on

  * the paper's MNIST deep autoencoder (784-1000-500-250-30, mirrored; an ``nn.Sequential``:
    the hand-written ``sequential`` path must stay the default there),
  * a small residual CNN with BatchNorm in training mode (``kfac_fast.demo.models_cnn.small_resnet``
    on 28×28 inputs),
  * a small causal transformer LM whose attention is ``F.scaled_dot_product_attention``
    (tests/sdpa_models.py), where plain forward-mode AD fails on the fused kernel.

Providers: ``sequential`` (MLP only), ``forward`` (the path KFAC used before; fails on SDPA),
``forward_math`` (forward-mode inside ``sdpa_kernel(MATH)``), ``reverse_over_reverse``.
Rounds interleave the providers; each entry is the median over rounds of the per-round median.

    PYTHONPATH=python python benchmarks/bench_jvp_paths.py            # ~2 min, 1 thread
    PYTHONPATH=python python benchmarks/bench_jvp_paths.py --quick

Writes benchmarks/results/jvp_paths_cpu.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _common import machine_info, print_table, time_fn, write_csv  # noqa: E402
from sdpa_models import SDPATransformerLM, lm_batch  # noqa: E402

from kfac_fast.curvature import find_blocks  # noqa: E402
from kfac_fast.curvature import linearize  # noqa: E402
from kfac_fast.demo.models import deep_autoencoder  # noqa: E402
from kfac_fast.demo.models_cnn import small_resnet  # noqa: E402


def _directions(blocks, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[b.to_matrix(*[torch.randn(p.shape, generator=g) for p in b.params()]) for b in blocks]
            for _ in range(n)]


def problems(quick: bool):
    torch.manual_seed(0)
    rows = 64 if quick else 256
    ae = deep_autoencoder(generator=torch.Generator().manual_seed(0))
    yield "mlp_autoencoder", ae, torch.rand(rows, 784)
    cnn = small_resnet().train()
    yield "cnn_bn", cnn, torch.randn(16 if quick else 64, 1, 28, 28)
    lm = SDPATransformerLM(vocab=64, T=32, d=64, heads=4, layers=2)
    yield "sdpa_transformer", lm, lm_batch(8 if quick else 32, 32, 64)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--directions", type=int, nargs="+", default=[2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    rows = []
    for name, model, x in problems(args.quick):
        blocks = find_blocks(model)
        for n in args.directions:
            dirs = _directions(blocks, n)
            names = list(linearize.PROVIDERS)
            times: dict[str, list[float]] = {p: [] for p in names}
            failed: dict[str, str] = {}
            for _ in range(rounds):
                for p in names:
                    if p in failed:
                        continue
                    try:
                        out = linearize.jvp(model, blocks, x, dirs, provider=p)
                    except ValueError:  # the sequential path does not apply to this model
                        failed[p] = "n/a"
                        continue
                    except (NotImplementedError, RuntimeError) as err:  # a missing derivative
                        failed[p] = "fails: " + type(err).__name__
                        continue
                    del out
                    r = time_fn(lambda: linearize.jvp(model, blocks, x, dirs, provider=p), warmup=1, repeats=3)
                    times[p].append(r["median_s"])
            linearize.jvp(model, blocks, x, dirs)  # settles the automatic choice for this model
            auto = linearize.provider_for(model, blocks, x)
            best = min((statistics.median(t) for t in times.values() if t), default=float("nan"))
            for p in names:
                t = times[p]
                med = statistics.median(t) if t else None
                rows.append({"model": name, "directions": n, "provider": p,
                             "median_ms": None if med is None else 1e3 * med,
                             "vs_best": None if med is None else med / best,
                             "status": failed.get(p, "ok" if t else "n/a"),
                             "chosen": "yes" if p == auto else ""})
    cols = ["model", "directions", "provider", "median_ms", "vs_best", "status", "chosen"]
    print_table(rows, cols)
    info = machine_info()
    write_csv("jvp_paths_cpu" + ("_quick" if args.quick else ""), rows, info)


if __name__ == "__main__":
    main()
