"""What does one K-FAC iteration cost on the architecture tasks, against SGD, and which block
kinds pay for it?

Tasks (the models and batches of ``python -m kfac_fast.demo --task cnn|transformer``): the
residual CNN with BatchNorm on 28×28 MNIST (batch 128) and the 2-layer causal transformer LM on
the packaged text (batch 32 × 64 tokens).

Reported per task:
  * one ``KFAC.step`` (defaults) split into the paper's tasks 1-8 (Sec 8; ``profile=True``),
    amortised over ``--iters`` steps (a multiple of T3 = 20, so refreshes are included), against
    one SGD-momentum step (forward + backward + ``optimizer.step``) on the same model and batch,
    the two interleaved (``--rounds`` alternations of a K-FAC window and an SGD window);
  * per block kind (Kronecker: Linear / Conv2d; Embedding; norm scale-and-shift; diagonal): the
    factor update of one batch's statistics and the inverse build, timed on that kind's
    blocks alone (median of repeats).

    PYTHONPATH=python python benchmarks/bench_step_arch.py            # ~3 min on 2 cores
    PYTHONPATH=python python benchmarks/bench_step_arch.py --quick    # smoke test

Writes benchmarks/results/step_arch_cpu.csv (phases) and step_arch_blocks_cpu.csv (per kind).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.curvature.inverses import build_block_inverse  # noqa: E402
from kfac_fast.curvature.running import RunningFactors, snapshot  # noqa: E402
from kfac_fast.curvature.statistics import BatchStatistics, sampled_statistics  # noqa: E402

PHASES = ("1-2 gradient", "3 sampled backward", "4 factor update", "5 inverse refresh", "6 precondition",
          "7 fisher quadratic", "8 rho forward")


def make_task(name: str, quick: bool):
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        from kfac_fast.demo.data import load_mnist_images
        from kfac_fast.demo.models_cnn import small_resnet

        X, y, _ = load_mnist_images()
        m = 32 if quick else 128
        return (lambda: small_resnet(1, 10, seed=0)), X[:m], y[:m], f"SmallResNet (BatchNorm), MNIST 28x28, batch {m}"
    from kfac_fast.demo.data import load_text_corpus, padded_lm_batch
    from kfac_fast.demo.models_lm import causal_transformer_lm

    corpus = load_text_corpus()
    m, T = (8, 32) if quick else (32, 64)
    x, t = padded_lm_batch(corpus.tokens, m, T, generator=g)
    V = len(corpus.vocab)
    return ((lambda: causal_transformer_lm(V, T, seed=0)), x, t,
            f"causal transformer LM (2 layers, d=64), batch {m} x up to {T} tokens, padded")


def _ce(z, y):
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=-100)


def phases(task: str, args, info) -> list[dict]:
    factory, x, y, desc = make_task(task, args.quick)
    torch.manual_seed(0)
    model = factory()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", profile=True, generator=torch.Generator().manual_seed(0))
    sgd_model = factory()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step():
        sgd.zero_grad()
        _ce(sgd_model(x), y).backward()
        sgd.step()

    for _ in range(args.warmup):
        opt.step(x, y)
        sgd_step()
    kfac_ms, sgd_ms, tot = [], [], {p: 0.0 for p in PHASES}
    n_k = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            s = opt.step(x, y)
            for p, v in s["phases"].items():
                tot[p] += v
        kfac_ms.append((time.perf_counter() - t0) / args.iters * 1e3)
        n_k += args.iters
        t0 = time.perf_counter()
        for _ in range(args.iters):
            sgd_step()
        sgd_ms.append((time.perf_counter() - t0) / args.iters * 1e3)
    k, sg = statistics.median(kfac_ms), statistics.median(sgd_ms)
    rows = [dict(task=task, what="KFAC step (amortised)", ms=k, ratio_to_sgd=k / sg, setting=desc),
            dict(task=task, what="SGD-momentum step", ms=sg, ratio_to_sgd=1.0, setting=desc)]
    for p in PHASES:
        rows.append(dict(task=task, what=f"  {p}", ms=tot[p] / n_k * 1e3, ratio_to_sgd=tot[p] / n_k * 1e3 / sg,
                         setting=desc))
    return rows, (model, opt, x, y, desc)


def kind_of(block) -> str:
    return {"LinearBlock": "Linear", "Conv2dBlock": "Conv2d", "EmbeddingBlock": "Embedding",
            "ScaleShiftBlock": "norm scale-shift", "DiagonalBlock": "diagonal"}.get(type(block).__name__,
                                                                                 type(block).__name__)


def per_kind(task: str, state, args) -> list[dict]:
    model, opt, x, y, desc = state
    blocks = opt.layers
    m = x.shape[0]
    idx = torch.arange(max(1, m // 8))
    stats, _ = sampled_statistics(model, blocks, x[idx], opt.loss, fisher="mc", targets=y[idx],
                                  generator=torch.Generator().manual_seed(1))
    rows = []
    kinds = sorted({kind_of(b) for b in blocks})
    for kind in kinds:
        sel = [i for i, b in enumerate(blocks) if kind_of(b) == kind]
        sub = [blocks[i] for i in sel]
        st = BatchStatistics(a=[stats.a[i] for i in sel], g=[stats.g[i] for i in sel], u=[stats.u[i] for i in sel],
                             n_terms=stats.n_terms)
        rf = RunningFactors(sub, dtype=torch.float32, device="cpu", tridiagonal=False)
        rf.update(st, eps=0.0, backend="auto")
        rf.commit()
        upd = time_fn(lambda: rf.update(st, eps=0.5, backend="auto"), warmup=1, repeats=args.repeats)
        recs = snapshot(rf.current)
        inv = time_fn(lambda: build_block_inverse("block_diagonal", recs, damping=0.1, backend="auto",
                                                  factorization="cholesky"), warmup=1, repeats=args.repeats)
        params = sum(p.numel() for b in sub for p in b.params())
        rows.append(dict(task=task, kind=kind, blocks=len(sub), params=params,
                         factor_update_ms=upd["median_s"] * 1e3, inverse_build_ms=inv["median_s"] * 1e3,
                         setting=desc))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="cnn,transformer")
    ap.add_argument("--iters", type=int, default=20, help="steps per window (a multiple of T3 = 20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved K-FAC / SGD windows")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="step_arch_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.rounds, args.warmup, args.repeats = 2, 1, 1, 1
    torch.set_num_threads(args.threads)
    info = machine_info()
    prow, krow = [], []
    for task in args.tasks.split(","):
        rows, state = phases(task, args, info)
        prow += rows
        krow += per_kind(task, state, args)
    print_table(prow, ["task", "what", "ms", "ratio_to_sgd"])
    print()
    print_table(krow, ["task", "kind", "blocks", "params", "factor_update_ms", "inverse_build_ms"])
    if not args.quick:
        print(write_csv(args.name, prow, info))
        print(write_csv(args.name.replace("step_arch", "step_arch_blocks"), krow, info))


if __name__ == "__main__":
    main()
