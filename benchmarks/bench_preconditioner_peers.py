"""Is KFACPreconditioner faster per iteration than the pure-PyTorch K-FAC preconditioners, like
for like?

Per training iteration (zero_grad, forward, loss, backward, K-FAC preconditioning of .grad,
torch SGD step) on the same model, batch, Fisher type, damping value γ, factor update every
step with an exponential average (0.95), and inverse refresh period T3 (first 3 steps too):

  SGD                    forward + backward + SGD step (the floor)
  kfac_fast hooks        KFACPreconditioner(capture="hooks"): statistics from the user's pass;
                         MC: one extra backward through the retained graph, no second forward
  kfac_fast pass         KFACPreconditioner(tau1=1) as before: its own forward + backward
  KAISA (inverse|eigen)  kfac-pytorch's KFACPreconditioner (module hooks on the user's pass),
                         compute_method INVERSE (explicit inverses, the like-for-like of the
                         Cholesky-based inverse kfac_fast builds) and EIGEN (its default);
                         kl_clip off (kfac_fast does no clipping); empirical Fisher only
  ASDL                   asdfghjkl 0.1a5 KfacGradientMaker (its forward_and_backward does the
                         user's pass); fisher_emp, and fisher_mc for cross-entropy only
  curvlinops             KFACLinearOperator on the batch (its own forward + backward, as its
                         docs prescribe: a fresh operator per parameter state), the 0.95
                         average kept by hand, KFACInverseLinearOperator (heuristic π damping
                         with damping = γ², which is kfac_fast's factored Tikhonov exactly)
                         rebuilt every T3 steps, applied every step; Linear and Conv2d only

Tasks: the MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid cross-entropy,
batch m = 1000), the same without biases (``autoencoder-nobias``: ASDL's K-FAC always leaves
the bias out of A, the others append the homogeneous coordinate of Sec 2.1, so only here do all
of them form the same A) and the small ResNet CNN of the demos (softmax cross-entropy,
BatchNorm2d, batch 128). The methods run interleaved, one iteration of each in turn on the same batch;
after ``--warmup`` iterations ``--periods`` whole refresh periods are timed, so each window
holds one refresh per method. Reported: per method the amortised time per iteration (window
mean), its median over the periods, and the median single iteration (which hides the refresh);
ratios to KFACPreconditioner(capture="hooks").

    PYTHONPATH=python python benchmarks/bench_preconditioner_peers.py            # 1 thread, ~10 min
    PYTHONPATH=python python benchmarks/bench_preconditioner_peers.py --tasks autoencoder,autoencoder-nobias,cnn
    PYTHONPATH=python python benchmarks/bench_preconditioner_peers.py --quick    # smoke test

Writes benchmarks/results/preconditioner_peers_cpu.csv (machine, versions, threads, load).
Peers: ``pip install --no-deps asdfghjkl==0.1a5 curvlinops-for-pytorch``; KAISA (kfac-pytorch)
is not on the package index: install it from its source snapshot (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.demo.data import load_mnist  # noqa: E402
from kfac_fast.demo.models import MNIST_AUTOENCODER, deep_autoencoder  # noqa: E402

METHODS = ("SGD", "kfac_fast hooks", "kfac_fast pass", "KAISA inverse", "KAISA eigen", "ASDL", "curvlinops")


# ------------------------------------------------------------------------------------- tasks
def autoencoder_task(args):
    X, src = load_mnist()
    m = args.batch_ae
    desc = f"deep autoencoder {'-'.join(map(str, MNIST_AUTOENCODER))} (mirrored), {src}, batch {m}"

    def model():
        return deep_autoencoder(generator=torch.Generator().manual_seed(args.seed))

    def batches():
        g = torch.Generator().manual_seed(args.seed)
        while True:
            perm = torch.randperm(X.shape[0], generator=g)
            for i in range(0, X.shape[0] - m + 1, m):
                x = X[perm[i:i + m]]
                yield x, x

    return SimpleNamespace(name="autoencoder", desc=desc, model=model, batches=batches, loss="sigmoid_cross_entropy",
                           user_loss=lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0])


def autoencoder_nobias_task(args):
    """The autoencoder without biases: every method's A is then the d x d input covariance (ASDL
    always leaves the bias out of A; kfac_fast, KAISA and curvlinops append the homogeneous 1)."""
    t = autoencoder_task(args)
    make = t.model

    def model():
        net = make()
        for mod in net:
            if isinstance(mod, nn.Linear):
                mod.register_parameter("bias", None)
        return net

    t.name, t.model = "autoencoder-nobias", model
    t.desc = t.desc.replace("(mirrored)", "(mirrored, no biases)")
    return t


def cnn_task(args):
    from kfac_fast.demo.tasks import cnn_task as demo_cnn

    t = demo_cnn(SimpleNamespace(train_rows=0, device="cpu", batch_size=args.batch_cnn, seed=args.seed))

    def batches():
        return t.batches(args.seed)

    return SimpleNamespace(name="cnn", desc=t.description, model=t.make_model, batches=batches,
                           loss="softmax_cross_entropy", user_loss=lambda z, y: F.cross_entropy(z, y))


# ----------------------------------------------------------------------------------- methods
class Method:
    """One training loop: ``step(x, y)`` is one whole iteration; ``note`` says what it covers."""

    name = ""
    note = ""

    def __init__(self, task, model: nn.Module, fisher: str, args):
        self.task, self.model, self.fisher, self.args = task, model, fisher, args
        self.opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    def step(self, x, y) -> float:
        raise NotImplementedError


class SGD(Method):
    name, note = "SGD", "forward + backward + torch SGD step"

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.user_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class KfacFast(Method):
    def __init__(self, task, model, fisher, args, capture: str):
        super().__init__(task, model, fisher, args)
        self.capture = capture
        self.name = f"kfac_fast {capture}"
        # Tf=1: statistics every step, as the peers compute them
        kw = dict(loss=task.loss, damping=args.damping, fisher=fisher, T3=args.T3, backend=args.backend, Tf=1,
                  generator=torch.Generator().manual_seed(args.seed))
        if capture == "hooks":
            self.pre = kfac_fast.KFACPreconditioner(model, capture="hooks", **kw)
        else:
            self.pre = kfac_fast.KFACPreconditioner(model, tau1=1.0, **kw)
        self.note = (f"KFACPreconditioner(capture={capture!r}, fisher={fisher!r}, damping={args.damping}, T3={args.T3}, "
                     f"backend={args.backend!r}, factorization={self.pre.factorization!r}); blocks: "
                     f"{len(self.pre.layers)} ({', '.join(sorted({type(l).__name__ for l in self.pre.layers}))})")

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.user_loss(self.model(x), y)
        if self.capture == "hooks":
            loss.backward(retain_graph=self.fisher == "mc")
            self.pre.step(targets=y)
        else:
            loss.backward()
            self.pre.step(x, y)
        self.opt.step()
        return float(loss.detach())


class Kaisa(Method):
    def __init__(self, task, model, fisher, args, method: str):
        if fisher != "empirical":
            raise NotImplementedError("KAISA takes G from the user's backward only (no sampled-target Fisher)")
        import logging

        from kfac.enums import ComputeMethod
        from kfac.preconditioner import KFACPreconditioner as KaisaPre

        super().__init__(task, model, fisher, args)
        self.name = f"KAISA {method}"
        self.pre = KaisaPre(model, factor_update_steps=1, inv_update_steps=args.T3, damping=args.damping,
                            factor_decay=0.95, kl_clip=1.0, lr=args.lr,
                            compute_method=ComputeMethod.INVERSE if method == "inverse" else ComputeMethod.EIGEN,
                            loglevel=logging.DEBUG)  # the level KAISA logs its layer registry at: silent here
        # no KL clipping (kfac_fast has none): the constructor refuses None, its step() skips the clip on None
        self.pre._kl_clip = None
        self.note = (f"kfac-pytorch {_version('kfac-pytorch')} KFACPreconditioner(compute_method={method.upper()}, "
                     f"factor_update_steps=1, inv_update_steps={args.T3}, factor_decay=0.95, damping={args.damping} "
                     f"added to A and G, kl_clip=None); Linear and Conv2d only; inverse at steps 0, T3, 2T3, ...")

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.user_loss(self.model(x), y)
        loss.backward()
        self.pre.step()
        self.opt.step()
        return float(loss.detach())


class Asdl(Method):
    def __init__(self, task, model, fisher, args):
        if fisher == "mc" and task.loss != "softmax_cross_entropy":
            raise NotImplementedError("ASDL's fisher_mc has no Bernoulli (sigmoid) likelihood: only cross_entropy "
                                      "and mse")
        import asdl
        import torch.cuda.nvtx as nvtx

        if not torch.cuda.is_available():  # ASDL wraps its work in nvtx.range, which raises on CPU-only torch
            nvtx.range_push = lambda *a, **k: 0
            nvtx.range_pop = lambda *a, **k: 0
        super().__init__(task, model, fisher, args)
        self.name = "ASDL"
        self.m = args.batch_ae if task.name == "autoencoder" else args.batch_cnn
        config = asdl.PreconditioningConfig(data_size=self.m, damping=args.damping, ema_decay=0.05,
                                            preconditioner_upd_interval=args.T3, preconditioner_warmup_steps=3,
                                            curvature_upd_interval=1)
        self.gm = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp" if fisher == "empirical" else
                                         "fisher_mc", loss_type="cross_entropy", seed=args.seed)
        self.note = (f"asdfghjkl {_version('asdfghjkl')} KfacGradientMaker(fisher_type="
                     f"{'fisher_emp' if fisher == 'empirical' else 'fisher_mc'}), damping={args.damping} (added to "
                     f"A and G), curvature every step (ema_decay 0.05), inverse every {args.T3} after 3 warm-up steps; "
                     "Linear, Conv2d, BatchNorm2d (unit-wise); nvtx no-op shim on CPU torch")

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        dummy = self.gm.setup_model_call(self.model, x)
        if self.task.loss == "sigmoid_cross_entropy":  # ASDL forces reduction="sum" and divides by data_size
            self.gm.setup_loss_call(F.binary_cross_entropy_with_logits, dummy, y)
        else:
            self.gm.setup_loss_call(F.cross_entropy, dummy, y)
        _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return float(loss.detach())


class Curvlinops(Method):
    def __init__(self, task, model, fisher, args):
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

        super().__init__(task, model, fisher, args)
        self.name = "curvlinops"
        self.KFAC, self.Inv = KFACLinearOperator, KFACInverseLinearOperator
        self.params = [p for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
                       for p in mod.parameters(recurse=False)]
        # summed loss: curvlinops then scales the factors as a sum over the batch (no 1/N of kfac_fast);
        # the cost is the same
        self.loss_func = (nn.BCEWithLogitsLoss(reduction="sum") if task.loss == "sigmoid_cross_entropy"
                          else nn.CrossEntropyLoss(reduction="sum"))
        self.k, self.inv, self.avg = 1, None, None
        self.note = (f"curvlinops-for-pytorch {_version('curvlinops-for-pytorch')} KFACLinearOperator(fisher_type="
                     f"{fisher!r}, separate_weight_and_bias=False) on each batch (its own forward + backward), "
                     "factors averaged by hand (0.95), KFACInverseLinearOperator(damping=γ², "
                     f"use_heuristic_damping=True) rebuilt at k<=3 and every {args.T3}; Linear and Conv2d only")

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.user_loss(self.model(x), y)
        loss.backward()
        op = self.KFAC(self.model, self.loss_func, self.params, [(x, y)], check_deterministic=False,
                       fisher_type=self.fisher, num_data=x.shape[0], num_per_example_loss_terms=1,
                       separate_weight_and_bias=False, seed=self.args.seed + self.k)
        op.compute_kronecker_factors()
        eps = min(1.0 - 1.0 / self.k, 0.95)
        new = (op._input_covariances, op._gradient_covariances)
        if self.avg is None:
            self.avg = tuple({n: t.clone() for n, t in d.items()} for d in new)
        else:
            for avg, d in zip(self.avg, new):
                for n, t in d.items():
                    avg[n].mul_(eps).add_(t, alpha=1 - eps)
        if self.inv is None or self.k <= 3 or self.k % self.args.T3 == 0:
            op._input_covariances = {n: t.clone() for n, t in self.avg[0].items()}
            op._gradient_covariances = {n: t.clone() for n, t in self.avg[1].items()}
            self.inv = self.Inv(op, damping=self.args.damping ** 2, use_heuristic_damping=True)
        with torch.no_grad():
            out = self.inv @ [p.grad for p in self.params]
            for p, u in zip(self.params, out):
                p.grad.copy_(u)
        self.opt.step()
        self.k += 1
        return float(loss.detach())


def build(name: str, task, model, fisher, args) -> Method:
    if name == "SGD":
        return SGD(task, model, fisher, args)
    if name.startswith("kfac_fast"):
        return KfacFast(task, model, fisher, args, name.split()[1])
    if name.startswith("KAISA"):
        return Kaisa(task, model, fisher, args, name.split()[1])
    if name == "ASDL":
        return Asdl(task, model, fisher, args)
    if name == "curvlinops":
        return Curvlinops(task, model, fisher, args)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


# ------------------------------------------------------------------------------------ timing
def run(task, fisher: str, args) -> list[dict]:
    base = task.model()
    methods, rows = [], []
    for name in args.methods.split(","):
        torch.manual_seed(args.seed)
        try:
            methods.append(build(name, task, copy.deepcopy(base), fisher, args))
        except Exception as exc:  # a peer without this Fisher, or not installed
            why = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (NotImplementedError, ImportError)):
                why += " | " + traceback.format_exc(limit=2).strip().splitlines()[-1]
            rows.append({"task": task.name, "fisher": fisher, "method": name, "note": f"not run: {why}"})
            print(f"  {name}: not run ({why})", flush=True)
    n_it = args.warmup + args.periods * args.T3
    times = {m.name: [] for m in methods}
    losses = {m.name: math.nan for m in methods}
    failed = {}
    stream = task.batches()
    for it in range(n_it):
        x, y = next(stream)
        for m in methods:  # interleaved: one iteration of each method in turn, same batch
            if m.name in failed:
                continue
            try:
                holder = {}
                t = time_fn(lambda: holder.__setitem__("loss", m.step(x, y)), warmup=0, repeats=1)["median_s"]
                times[m.name].append(t)
                losses[m.name] = holder["loss"]
            except Exception as exc:
                failed[m.name] = f"failed at iteration {it + 1}: {type(exc).__name__}: {exc}"
                print(f"  {m.name}: {failed[m.name]}", flush=True)
    hooks = None
    for m in methods:
        ts = times[m.name][args.warmup:]
        if m.name in failed or len(ts) < args.T3:
            rows.append({"task": task.name, "fisher": fisher, "method": m.name, "note": failed.get(m.name, "too few")})
            continue
        periods = [ts[i:i + args.T3] for i in range(0, len(ts) - args.T3 + 1, args.T3)]
        amort = [1e3 * sum(p) / len(p) for p in periods]
        r = {"task": task.name, "fisher": fisher, "method": m.name,
             "ms/it amortised": statistics.median(amort), "ms/it amortised per period": " ".join(f"{a:.1f}" for a in amort),
             "ms/it median": 1e3 * statistics.median(ts), "iterations timed": len(ts),
             "final batch loss": losses[m.name], "note": m.note}
        if m.name == "kfac_fast hooks":
            hooks = r["ms/it amortised"]
        rows.append(r)
    for r in rows:
        if hooks and "ms/it amortised" in r:
            r["x kfac_fast hooks"] = r["ms/it amortised"] / hooks
    return rows


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="autoencoder,cnn")
    ap.add_argument("--fishers", default="empirical,mc")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--T3", type=int, default=20, help="inverse refresh period (all methods)")
    ap.add_argument("--periods", type=int, default=2, help="timed refresh periods")
    ap.add_argument("--warmup", type=int, default=4, help="untimed iterations first (the first 3 refresh)")
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, default=1e-4, help="torch SGD learning rate of every method (timing only)")
    ap.add_argument("--batch-ae", type=int, default=1000)
    ap.add_argument("--batch-cnn", type=int, default=128)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suffix", default=None, help="CSV name suffix (default '_quick' with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.quick:
        args.T3, args.periods, args.warmup, args.batch_ae, args.batch_cnn = 4, 1, 4, 100, 32
    suffix = args.suffix if args.suffix is not None else ("_quick" if args.quick else "")
    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    load_before = _load()
    tasks = {"autoencoder": autoencoder_task, "autoencoder-nobias": autoencoder_nobias_task, "cnn": cnn_task}
    rows = []
    for tname in args.tasks.split(","):
        task = tasks[tname](args)
        for fisher in args.fishers.split(","):
            print(f"\n== {task.desc}; fisher={fisher}; damping {args.damping}, T3 {args.T3}, factors every step; "
                  f"{args.threads} thread(s)", flush=True)
            out = run(task, fisher, args)
            print_table(out, ["method", "ms/it amortised", "ms/it median", "x kfac_fast hooks", "final batch loss"])
            rows += out
    info = dict(info, load_before=load_before, load_after=_load(), T3=args.T3, damping=args.damping,
                periods=args.periods, warmup=args.warmup, batch_ae=args.batch_ae, batch_cnn=args.batch_cnn,
                kfac_fast_backend=args.backend,
                versions=f"kfac-pytorch {_version('kfac-pytorch')}, asdfghjkl {_version('asdfghjkl')}, "
                         f"curvlinops-for-pytorch {_version('curvlinops-for-pytorch')}")
    write_csv(f"preconditioner_peers_cpu{suffix}", rows, info)
    return rows


if __name__ == "__main__":
    main()
