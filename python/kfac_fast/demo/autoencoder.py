"""Main job: train the paper's MNIST deep autoencoder with K-FAC and with its baselines for
the same wall-clock budget (paper Sec 13), print a table and plot error against time/iterations.

    python -m kfac_fast.demo                      # defaults: 90 s per method, batch 1000
    python -m kfac_fast.demo --budget 300 --inverse block_tridiagonal --methods kfac,sgd,adam
    python -m kfac_fast.demo --task cnn           # the architecture demos (kfac_fast.demo.tasks):
    python -m kfac_fast.demo --task transformer   # ResNet on MNIST, transformer LM on text
    torchrun --nproc_per_node=2 -m kfac_fast.demo --distributed   # data-parallel (gloo), see run_distributed

Reported error: training reconstruction error, the mean over the training cases of the squared
error summed over pixels (Hinton & Salakhutdinov 2006), measured on the whole training set with
the clock stopped.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

import kfac_fast
from kfac_fast.config import KFACConfig
from .common import Clock, machine_info, progress
from .data import load_mnist
from .models import MNIST_AUTOENCODER, deep_autoencoder, reconstruction_error


@dataclass
class Run:
    method: str
    times: list = field(default_factory=list)
    iters: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    note: str = ""


def _train(method: str, step_fn, model, X, *, budget, batch_size, gen, eval_every: float,
           max_iters: int | None = None) -> Run:
    run = Run(method)
    clock = Clock()
    bar = progress(budget, f"{method:>24s}")
    err = reconstruction_error(model, X)
    run.times.append(0.0), run.iters.append(0), run.errors.append(err)
    next_eval, it, n = eval_every, 0, X.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    while clock.elapsed < budget and (max_iters is None or it < max_iters):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = X.index_select(0, idx)
        clock.start()
        note = step_fn(x, it)
        clock.pause()
        it += 1
        if note:
            run.note = note
        if clock.elapsed >= next_eval or clock.elapsed >= budget or it == max_iters:
            err = reconstruction_error(model, X)
            run.times.append(clock.elapsed), run.iters.append(it), run.errors.append(err)
            next_eval = clock.elapsed + eval_every
            if bar is not None:
                bar.n = min(round(clock.elapsed), bar.total)
                bar.set_postfix_str(f"iter {it}, error {err:.2f}")
                bar.refresh()
            if not math.isfinite(err):
                run.note = "diverged"
                break
    if bar is not None:
        bar.close()
    return run


def run_kfac(X, args, *, inverse: str, momentum: bool = True) -> Run:
    gen = torch.Generator().manual_seed(args.seed)
    model = deep_autoencoder(args.encoder, generator=torch.Generator().manual_seed(args.seed)).to(X.device)
    make = {"default": KFACConfig, "paper": KFACConfig.paper,
            # the paper's rules with λ₀ = 1: this package's earlier defaults, before step rejection
            "paper-rules": lambda **kw: KFACConfig.paper(**dict({"lambda_init": 1.0}, **kw))}[args.preset]
    cfg = make(inverse=inverse, momentum=momentum, **({"lambda_init": args.lambda_init} if args.lambda_init else {}))
    opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", config=cfg, backend=args.backend,
                         generator=torch.Generator(device=X.device).manual_seed(args.seed))

    def step(x, it):
        opt.step(x, x)

    name = f"K-FAC {'tridiag' if inverse == 'block_tridiagonal' else 'blkdiag'}{'' if momentum else ' no-mom'}"
    return _train(name, step, model, X, budget=args.budget, batch_size=args.batch_size, gen=gen,
                  eval_every=args.eval_every, max_iters=args.max_iters)


def sutskever_momentum(t: int, mu_max: float) -> float:
    """µ_t = min(1 − 2^(−1 − log2(⌊t/250⌋ + 1)), µ_max) (Sutskever et al. 2013)."""
    return min(1.0 - 2.0 ** (-1.0 - math.log2(t // 250 + 1)), mu_max)


def _run_first_order(X, args, name: str, make_opt, before_step=None) -> Run:
    """A baseline: ``make_opt(params)`` on the same model, data order and loss as K-FAC."""
    gen = torch.Generator().manual_seed(args.seed)
    model = deep_autoencoder(args.encoder, generator=torch.Generator().manual_seed(args.seed)).to(X.device)
    opt = make_opt(model.parameters())
    lossf = nn.BCEWithLogitsLoss(reduction="sum")

    def step(x, it):
        if before_step is not None:
            before_step(opt, it)
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), x) / x.shape[0]
        loss.backward()
        opt.step()

    return _train(name, step, model, X, budget=args.budget, batch_size=args.batch_size, gen=gen,
                  eval_every=args.eval_every, max_iters=args.max_iters)


def run_sgd(X, args) -> Run:
    def schedule(opt, it):
        for g in opt.param_groups:
            g["momentum"] = sutskever_momentum(it, args.sgd_mu_max)

    return _run_first_order(
        X, args, "SGD-Nesterov",
        lambda params: torch.optim.SGD(params, lr=args.sgd_lr, momentum=0.5, nesterov=True), schedule)


def run_adam(X, args) -> Run:
    return _run_first_order(X, args, "Adam", lambda params: torch.optim.Adam(params, lr=args.adam_lr))


def run_distributed(X, args) -> Run:
    """Data-parallel training under ``torchrun`` (gloo): the autoencoder wrapped in
    DistributedDataParallel, :class:`~kfac_fast.preconditioner.DistributedKFACPreconditioner`
    (``--dist-mode``) under SGD with momentum 0.9; each rank takes its contiguous share of every
    batch of ``--batch-size`` (so the global batch is the one-process batch). Runs
    ``--max-iters`` iterations (default 50: a wall-clock budget would let the ranks' clocks
    disagree on when to stop); rank 0 evaluates every ``--dist-eval-every`` iterations and
    writes ``demo_distributed_curves.csv``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kfac_fast.preconditioner import DistributedKFACPreconditioner

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise SystemExit("--distributed needs the torchrun environment: torchrun --nproc_per_node=2 -m "
                             "kfac_fast.demo --distributed")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
    share = args.batch_size // world
    model = deep_autoencoder(args.encoder, generator=torch.Generator().manual_seed(args.seed)).to(X.device)
    ddp = DistributedDataParallel(model)
    pre = DistributedKFACPreconditioner(ddp, loss="sigmoid_cross_entropy", damping=args.pre_damping,
                                        mode=args.dist_mode, backend=args.backend, seed=args.seed)
    sgd = torch.optim.SGD(model.parameters(), lr=args.pre_lr, momentum=0.9)
    lossf = nn.BCEWithLogitsLoss(reduction="sum")
    gen = torch.Generator().manual_seed(args.seed)  # the same data order on every rank
    run = Run(f"KFACPreconditioner+SGD, {world} ranks ({args.dist_mode})")
    n, iters = X.shape[0], args.max_iters or 50
    perm, pos, clock = torch.randperm(n, generator=gen), 0, Clock()
    for it in range(iters + 1):
        if rank == 0 and (it % args.dist_eval_every == 0 or it == iters):
            err = reconstruction_error(model, X)
            run.times.append(clock.elapsed), run.iters.append(it), run.errors.append(err)
            print(f"iteration {it:4d}  {clock.elapsed:7.1f} s  training error {err:.2f}", flush=True)
        if it == iters:
            break
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos + rank * share: pos + (rank + 1) * share]
        pos += args.batch_size
        x = X.index_select(0, idx)
        clock.start()
        sgd.zero_grad(set_to_none=True)
        (lossf(ddp(x), x) / x.shape[0]).backward()
        pre.step(x)
        sgd.step()
        clock.pause()
    if rank == 0:
        c = pre.distributor.counter.snapshot()["payload"]
        print("bytes per iteration on rank 0 (payload): " +
              ", ".join(f"{k} {v / iters:.3g}" for k, v in c.items()) + " (gradient: DDP's, not counted)")
    return run


def _table(runs: list[Run]) -> str:
    rows = [("method", "iterations", "seconds", "train error", "best error")]
    for r in runs:
        rows.append((r.method + (f" ({r.note})" if r.note else ""), str(r.iters[-1]), f"{r.times[-1]:.1f}",
                     f"{r.errors[-1]:.2f}", f"{min(e for e in r.errors if math.isfinite(e)):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(runs: list[Run], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        axes[0].plot(r.times, r.errors, label=r.method)
        axes[1].plot(r.iters, r.errors, label=r.method)
    for ax, xl in zip(axes, ("seconds (training only)", "iterations")):
        ax.set_xlabel(xl)
        ax.set_ylabel("training reconstruction error")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CSV_COLUMNS = ["method", "seconds", "iterations", "train_error"]


def main(argv=None) -> list[Run]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="autoencoder", choices=["autoencoder", "cnn", "transformer"],
                   help="autoencoder (default, this page); cnn / transformer: see "
                        "`python -m kfac_fast.demo --task cnn --help`")
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per method (default 90)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--inverse", default="block_diagonal",
                   choices=["block_diagonal", "block_tridiagonal", "both"])
    p.add_argument("--methods", default="kfac,sgd,adam", help="comma list of kfac, kfac-nomom, sgd, adam")
    p.add_argument("--max-iters", type=int, default=None, help="stop each method after this many iterations")
    p.add_argument("--preset", default="default", choices=["default", "paper", "paper-rules"],
                   help="'paper': λ₀ = 150 and the paper's other settings; 'paper-rules': the same with λ₀ = 1 "
                        "(the defaults before step rejection)")
    p.add_argument("--lambda-init", type=float, default=None)
    p.add_argument("--sgd-lr", type=float, default=0.01)
    p.add_argument("--sgd-mu-max", type=float, default=0.99)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=float, default=5.0, help="seconds of training between evaluations")
    p.add_argument("--out", default="kfac_demo", help="folder for the PNG plot and CSV")
    p.add_argument("--encoder", default=None, help="encoder widths, e.g. 784,1000,500,250,30 (default: the paper's)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel KFACPreconditioner+SGD under torchrun (gloo); see run_distributed")
    p.add_argument("--dist-mode", default="replicate_inverses", choices=["replicate_inverses", "shard_inverses"])
    p.add_argument("--dist-eval-every", type=int, default=10, help="--distributed: iterations between evaluations")
    p.add_argument("--pre-damping", type=float, default=0.1, help="--distributed: the preconditioner's damping")
    p.add_argument("--pre-lr", type=float, default=1e-3, help="--distributed: SGD learning rate")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)  # the start of the run, with the threads it uses
    X, source = load_mnist()
    X = X.to(args.device)
    if args.encoder:
        args.encoder = tuple(int(v) for v in args.encoder.split(","))
        if args.encoder[0] != X.shape[1]:
            p.error(f"--encoder must start with the input size {X.shape[1]}")
    else:
        args.encoder = MNIST_AUTOENCODER if X.shape[1] == 784 else (64, 128, 64, 32, 8)
    if not (args.distributed and os.environ.get("RANK", "0") != "0"):  # one header under torchrun
        print(f"data: {source}; autoencoder {'-'.join(map(str, args.encoder))} (mirrored), batch {args.batch_size}, "
              + (f"{args.max_iters or 50} iterations" if args.distributed else f"{args.budget:.0f} s per method")
              + f" on {args.device}")
        for info in kfac_fast.available_backends().values():
            print(f"  backend {info}")
    if args.distributed:
        run = run_distributed(X, args)
        import torch.distributed as dist

        if dist.get_rank() == 0 and run.iters:
            print()
            print(_table([run]))
            os.makedirs(args.out, exist_ok=True)
            csv_path = os.path.join(args.out, "demo_distributed_curves.csv")
            with open(csv_path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(CSV_COLUMNS + list(machine) + ["world_size"])
                for t, i, e in zip(run.times, run.iters, run.errors):
                    w.writerow([run.method, f"{t:.3f}", i, f"{e:.4f}"] + list(machine.values()) + [dist.get_world_size()])
            print(f"\nwrote {csv_path}")
        dist.destroy_process_group()
        return [run]
    runs = []
    inverses = ["block_diagonal", "block_tridiagonal"] if args.inverse == "both" else [args.inverse]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method == "kfac":
            runs += [run_kfac(X, args, inverse=inv) for inv in inverses]
        elif method == "kfac-nomom":
            runs += [run_kfac(X, args, inverse=inv, momentum=False) for inv in inverses]
        elif method == "sgd":
            runs.append(run_sgd(X, args))
        elif method == "adam":
            runs.append(run_adam(X, args))
        else:
            p.error(f"unknown method {method!r}")
    print()
    print(_table(runs))
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "demo_curves.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + list(machine))
        for r in runs:
            for t, i, e in zip(r.times, r.iters, r.errors):
                w.writerow([r.method, f"{t:.3f}", i, f"{e:.4f}"] + list(machine.values()))
    png = os.path.join(args.out, "demo_error.png")
    _plot(runs, png, f"MNIST deep autoencoder ({source}), batch {args.batch_size}")
    print(f"\nwrote {png} and {csv_path}")
    return runs
