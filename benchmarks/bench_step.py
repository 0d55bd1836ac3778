"""Where does one K-FAC iteration spend its time, and how does it compare with SGD, Adam and the
other K-FAC implementations?

Question 1 (always): one iteration of kfac_fast.KFAC split into the paper's tasks 1-8 (Sec 8) on
the MNIST deep autoencoder 784-1000-500-250-30 (mirrored, batch m = 1000, sigmoid
cross-entropy), and with ``--wide`` on a wider MLP (d = 2048), per backend (torch / native /
auto / triton), against a plain SGD step and an Adam step (forward + backward + optimizer.step)
on the same model, batch and dtype.

Amortisation: after ``--warmup`` steps the script times exactly ``--iters`` further steps, a
multiple of T3 (inverse refresh period, 20) and T1 (ρ forward, every 5), so each measured window
holds the same share of refreshes, γ-candidate steps (every T2 = 20) and ρ forwards as a long
run. Reported: the amortised mean per iteration (window total / iterations) per phase and in
total, and the median iteration (which hides the refreshes: the gap between the two is the
refresh's amortised cost).

Question 2 (``--peers``): the same model, batch and refresh period in ASDL (``asdfghjkl``,
torch) and DeepMind's ``kfac-jax`` (JAX CPU): time per iteration and the training
reconstruction error after the same number of iterations and after the same seconds, with the
paper features each peer lacks.

    PYTHONPATH=python python benchmarks/bench_step.py --quick              # smoke test
    PYTHONPATH=python python benchmarks/bench_step.py --wide --peers       # full run (CPU, ~15 min)

Writes benchmarks/results/step_<device>.csv/.png (phases) and step_peers_<device>.csv/.png.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info, print_table, time_fn, write_csv  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.config import KFACConfig  # noqa: E402
from kfac_fast.demo.data import load_mnist  # noqa: E402
from kfac_fast.demo.models import MNIST_AUTOENCODER, deep_autoencoder, reconstruction_error  # noqa: E402

PHASES = ("1-2 gradient", "3 sampled backward", "4 factor update", "5 inverse refresh", "6 precondition",
          "7 fisher quadratic", "8 rho forward")
COLORS = ("#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD", "#DD8452", "#BBBBBB")


# ---------------------------------------------------------------------------------------- problems
def wide_mlp(d: int, layers: int, generator: torch.Generator) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        lin = nn.Linear(d, d)
        with torch.no_grad():
            lin.weight.normal_(0, 1 / math.sqrt(d), generator=generator)
            lin.bias.zero_()
        mods.append(lin)
        if i < layers - 1:
            mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def make_problem(name: str, args, device) -> tuple[callable, torch.Tensor, str]:
    """(model factory, data (N, d) in [0, 1] on device, description)."""
    if name == "autoencoder":
        X, src = load_mnist()
        desc = f"deep autoencoder {'-'.join(map(str, MNIST_AUTOENCODER))} (mirrored), {src}"

        def factory():
            return deep_autoencoder(generator=torch.Generator().manual_seed(args.seed)).to(device)
    else:
        g = torch.Generator().manual_seed(args.seed)
        X = torch.rand(max(5000, args.batch), args.wide_dim, generator=g).round()  # synthetic binary data
        desc = f"wide MLP {args.wide_layers} x Linear({args.wide_dim},{args.wide_dim}), sigmoid units, synthetic data"

        def factory():
            return wide_mlp(args.wide_dim, args.wide_layers, torch.Generator().manual_seed(args.seed)).to(device)
    return factory, X.to(device), desc


def batches(X: torch.Tensor, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    while True:
        perm = torch.randperm(n, generator=g).to(X.device)
        for i in range(0, n - m + 1, m):
            yield X.index_select(0, perm[i:i + m])


def bce_mean(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-example sigmoid cross-entropy summed over outputs (KFAC's objective)."""
    return F.binary_cross_entropy_with_logits(z, x, reduction="sum") / x.shape[0]


# ---------------------------------------------------------------------------------------- question 1
def _warm_kfac(factory, X, backend: str, args, device, *, profile: bool):
    """A seeded K-FAC optimizer on a fresh model after args.warmup steps, and its batch stream."""
    torch.manual_seed(args.seed)
    model = factory()
    cfg = KFACConfig(**{**dict(T1=args.T1, T2=args.T3, T3=args.T3, factorization=args.factorization),
                        **getattr(args, "overrides", {})})
    opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", backend=backend, profile=profile, config=cfg,
                         generator=torch.Generator(device=device).manual_seed(args.seed))
    it = batches(X, args.batch, args.seed)
    for _ in range(args.warmup):
        x = next(it)
        opt.step(x, x)
    return opt, it


def time_kfac(factory, X, backend: str, args, device) -> dict:
    """Warm-up, then exactly args.iters profiled steps; per-phase amortised mean and median."""
    opt, it = _warm_kfac(factory, X, backend, args, device, profile=True)
    # an SGD step on its own model and batch right after every K-FAC step: both see the same
    # machine speed, so "mean / SGD (interleaved)" survives a shared machine's drift
    sgd_step = _baseline_stepper(factory, X, "sgd", args, device, seed=args.seed + 1)
    sgd_step()
    totals, per_phase, sgd_times = [], {p: [] for p in PHASES}, []
    n_refresh = n_rho = n_rejected = 0
    k0 = opt.k
    for _ in range(args.iters):
        x = next(it)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        st = opt.step(x, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sgd_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sgd_times.append(time.perf_counter() - t0)
        # a rejected step returns early without stats["phases"]; its partial phases are still in _phases
        ph = st.get("phases") or dict(getattr(opt, "_phases", {}))
        n_rejected += bool(st.get("rejected"))
        for p in PHASES:
            per_phase[p].append(ph.get(p, 0.0))
        n_refresh += bool(st.get("refreshed"))
        n_rho += st.get("rho") is not None
    n = len(totals)
    row = {"steps": f"k={k0}..{opt.k - 1}", "n_iters": n, "n_refresh": n_refresh, "n_rho": n_rho,
           "n_rejected": n_rejected, "SGD interleaved median [ms]": 1e3 * statistics.median(sgd_times)}
    row["mean / SGD (interleaved)"] = 1e3 * sum(totals) / n / row["SGD interleaved median [ms]"]
    mem = opt.memory_report()
    row.update({f"state {k} [MB]": v / 2 ** 20 for k, v in mem.items()})
    if device.type == "cuda":
        row.update(_time_kfac_unprofiled(factory, X, backend, args, device))
    for p in PHASES:
        row[f"{p} [ms]"] = 1e3 * sum(per_phase[p]) / n
        row[f"{p} median [ms]"] = 1e3 * statistics.median(per_phase[p])
    other = [t - sum(per_phase[p][i] for p in PHASES) for i, t in enumerate(totals)]
    row["other [ms]"] = 1e3 * sum(other) / n
    row["total mean [ms]"] = 1e3 * sum(totals) / n
    row["total median [ms]"] = 1e3 * statistics.median(totals)
    return row


def _time_kfac_unprofiled(factory, X, backend: str, args, device) -> dict:
    """On CUDA the phase timer synchronises around every phase; the same window again with
    ``profile=False`` gives the true amortised time, and CUDA's sync debug mode counts the
    host-device synchronisations per step."""
    import warnings

    opt, it = _warm_kfac(factory, X, backend, args, device, profile=False)
    xs = [next(it) for _ in range(args.iters)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in xs:
        opt.step(x, x)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    # one more refresh period with the sync counter on (not timed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            n_sync = 0
            for x in xs[: args.T3]:
                opt.step(x, x)
                n_sync += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    return {"unprofiled mean [ms]": 1e3 * total / len(xs), "syncs / step": syncs / max(n_sync, 1)}


def _baseline_stepper(factory, X, which: str, args, device, *, seed: int):
    """One forward + backward + optimizer step of SGD-Nesterov or Adam per call."""
    torch.manual_seed(args.seed)
    model = factory()
    if which == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    it = batches(X, args.batch, seed)

    def step():
        x = next(it)
        opt.zero_grad(set_to_none=True)
        bce_mean(model(x), x).backward()
        opt.step()

    return step


def time_baseline(factory, X, which: str, args, device) -> dict:
    step = _baseline_stepper(factory, X, which, args, device, seed=args.seed)
    r = time_fn(step, device=device, warmup=args.warmup, repeats=min(args.iters, 20))
    return {"n_iters": r["n"], "total mean [ms]": None, "total median [ms]": 1e3 * r["median_s"],
            "min [ms]": 1e3 * r["min_s"]}


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``--configs``: KFACConfig overrides per K-FAC run, ';' between runs, ',' between fields
    ("Tq=1;Tq=5,T1=1"); each run's text labels its row ("" is the script's own settings)."""
    out = []
    for part in text.split(";"):
        kv = {}
        for item in filter(None, (x.strip() for x in part.split(","))):
            k, _, v = item.partition("=")
            kv[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
        out.append((part.strip(), kv))
    return out


def phases_section(args, device, info) -> None:
    backends = []
    status = kfac_fast.available_backends()
    for b in args.backends.split(","):
        if b == "auto":
            backends.append((b, ""))
            continue
        s = status[b]
        if not s.available:
            backends.append((b, f"skipped: {s.reason}"))
        elif b == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            backends.append((b, "skipped: triton needs a CUDA device (or TRITON_INTERPRET=1, the slow interpreter)"))
        else:
            backends.append((b, ""))
    problems = [p for p in args.problems.split(",") if p] + (["wide"] if args.wide and "wide" not in args.problems else [])
    rows = []
    for prob in problems:
        factory, X, desc = make_problem(prob, args, device)
        print(f"\n== {prob}: {desc}; batch m={args.batch}, float32, {args.warmup} warm-up steps then "
              f"{args.iters} timed (T3={args.T3}, T1={args.T1})", flush=True)
        base = {}
        for which in ("sgd", "adam"):
            r = time_baseline(factory, X, which, args, device)
            r["total mean [ms]"] = r["total median [ms]"]
            base[which] = r["total median [ms]"]
            rows.append(dict(model=prob, method=which.upper(), backend="torch", **r, note=(
                "SGD(lr, momentum=0.9, nesterov)" if which == "sgd" else "Adam") +
                ": forward+backward+step, mean of the medians before and after the K-FAC runs"))
            print(f"  {which}: {r['total median [ms]']:.1f} ms", flush=True)
        saved_iters = args.iters
        if prob == "wide":
            args.iters = args.wide_iters
        for (b, skip), (cfg_text, overrides) in [(bk, c) for c in parse_configs(args.configs) for bk in backends]:
            args.overrides = overrides
            if skip:
                rows.append(dict(model=prob, method="KFAC", backend=b, config=cfg_text, note=skip))
                print(f"  KFAC[{b}]: {skip}", flush=True)
                continue
            try:
                r = time_kfac(factory, X, b, args, device)
            except Exception as exc:  # record why, keep going
                rows.append(dict(model=prob, method="KFAC", backend=b, config=cfg_text,
                                 note=f"failed: {type(exc).__name__}: {exc}"))
                print(f"  KFAC[{b}] failed: {exc}", flush=True)
                continue
            r["note"] = "amortised mean over a window of whole refresh periods; median iteration"
            rows.append(dict(model=prob, method="KFAC", backend=b, config=cfg_text, **r))
            print(f"  KFAC[{b}] {cfg_text}: mean {r['total mean [ms]']:.1f} ms, median {r['total median [ms]']:.1f} ms; "
                  f"interleaved SGD {r['SGD interleaved median [ms]']:.1f} ms -> {r['mean / SGD (interleaved)']:.2f}x", flush=True)
        args.iters = saved_iters
        # the baselines again after the K-FAC runs: a machine whose speed drifts (shared cores)
        # moves both; ratios use the mean of the before and after medians
        for r in rows:
            if r["model"] == prob and r["method"] in ("SGD", "ADAM"):
                again = time_baseline(factory, X, r["method"].lower(), args, device)["total median [ms]"]
                r["median before [ms]"], r["median after [ms]"] = r["total median [ms]"], again
                r["total median [ms]"] = r["total mean [ms]"] = 0.5 * (r["median before [ms]"] + again)
                base[r["method"].lower()] = r["total median [ms]"]
                print(f"  {r['method'].lower()} again: {again:.1f} ms (ratios use "
                      f"{r['total median [ms]']:.1f})", flush=True)
        for r in rows:
            if r["model"] == prob and r.get("total mean [ms]") is not None:
                r["mean / SGD"] = r["total mean [ms]"] / base["sgd"]
                r["median / SGD"] = r["total median [ms]"] / base["sgd"]
            if r["model"] == prob and r.get("unprofiled mean [ms]") is not None:
                r["unprofiled / SGD"] = r["unprofiled mean [ms]"] / base["sgd"]
    cols = ["model", "method", "backend", "config"] + [f"{p} [ms]" for p in PHASES] + [
        "other [ms]", "total mean [ms]", "total median [ms]", "mean / SGD", "median / SGD",
        "SGD interleaved median [ms]", "mean / SGD (interleaved)"] + (
        ["unprofiled mean [ms]", "unprofiled / SGD", "syncs / step"] if device.type == "cuda" else [])
    print()
    short = {c: c.replace(" [ms]", "") for c in cols}
    print_table([{short[c]: r.get(c) for c in cols} for r in rows], [short[c] for c in cols])
    write_csv(f"step_{device.type}{args.suffix}", rows, dict(info, load_avg=_load_note(args), batch=args.batch, T3=args.T3,
                                                T1=args.T1))
    plot_phases(rows, problems, os.path.join(RESULTS_DIR, f"step_{device.type}{args.suffix}.png"), info, args)


def plot_phases(rows, problems, path, info, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 5.8), squeeze=False)
    segs = list(PHASES) + ["other"]
    for ax, prob in zip(axes[0], problems):
        rs = [r for r in rows if r["model"] == prob and r.get("total mean [ms]") is not None]
        labels = [f"{r['method']}" + (f"\n{r['backend']}" if r["method"] == "KFAC" else "") for r in rs]
        xs = range(len(rs))
        bottom = [0.0] * len(rs)
        for si, seg in enumerate(segs):
            vals = []
            for r in rs:
                vals.append((r.get(f"{seg} [ms]") or 0.0) if r["method"] == "KFAC" else 0.0)
            ax.bar(xs, vals, bottom=bottom, color=COLORS[si], label=seg, width=0.6, edgecolor="white", lw=0.5)
            bottom = [b + v for b, v in zip(bottom, vals)]
        base = [0.0 if r["method"] == "KFAC" else r["total median [ms]"] for r in rs]
        ax.bar(xs, base, bottom=bottom, color="#5a5a5a", hatch="//", edgecolor="white", lw=0.5, width=0.6,
               label="whole SGD / Adam step (median)")
        bottom = [b + v for b, v in zip(bottom, base)]
        missing = [f"KFAC[{r['backend']}]: {r['note']}" for r in rows
                   if r["model"] == prob and r.get("total mean [ms]") is None and r.get("note")]
        if missing:
            ax.text(0.0, -0.13, "\n".join(m[:95] for m in missing), transform=ax.transAxes, fontsize=7,
                    va="top", color="#aa0000")
        sgd = next(r["total median [ms]"] for r in rs if r["method"] == "SGD")
        for x, r, top in zip(xs, rs, bottom):
            ax.text(x, top, f"{top:.0f} ms\n{top / sgd:.1f}× SGD", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=9)
        ax.set_ylabel("ms per iteration (K-FAC: amortised mean)")
        ax.set_ylim(0, max(bottom) * 1.18)
        ax.set_title(f"{prob}, batch {args.batch}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left", title="paper Sec 8 task", title_fontsize=8)
    where = (f"{info['device']}, torch {info['torch']}" if info.get("device", "cpu") != "cpu"
             else f"{info['cpu']},\n{info['threads']} threads, torch {info['torch']}")
    fig.suptitle(f"One K-FAC iteration by task (T3={args.T3}, T1={args.T1}) — {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------- question 2
MISSING = {
    "kfac_fast": "none of the listed (block-diagonal inverse used here; block-tridiagonal available)",
    "ASDL": ("no sigmoid/Bernoulli Fisher (loss_type is cross_entropy=softmax or mse only), so the empirical "
             "Fisher is used; no exact-Fisher re-scaling (Sec 6.4); no K-FAC momentum (Sec 7; torch SGD "
             "momentum instead); no LM lambda (Sec 6.5); no gamma adaptation (fixed damping, Sec 6.6); "
             "no block-tridiagonal (Sec 4.3); no tau1/tau2 subsets; learning rate is a user hyper-parameter"),
    "kfac-jax": ("no block-tridiagonal (Sec 4.3; block-diagonal curvature blocks only); no separate gamma or "
                 "greedy gamma search (Sec 6.6: preconditioner damping = l2 + lambda*precon_damping_mult); "
                 "no tau1/tau2 subsets (factors and the exact-Fisher quadratic use the whole batch); "
                 "has re-scaling, momentum, LM lambda"),
}


class PausableClock:
    def __init__(self):
        self.elapsed = 0.0

    def run(self, fn):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        return out, dt


def train_run(name: str, step_fn, eval_fn, args) -> dict:
    """Steps until both ``equal_iters`` iterations and ``equal_seconds`` of optimizer time are reached.

    Returns error at equal iterations, at equal seconds, per-iteration times, the curve.
    """
    clock = PausableClock()
    curve = [(0, 0.0, eval_fn())]
    times = []
    err_iters = err_secs = None
    secs_at = iters_at = None
    i = 0
    eval_every = max(1, args.equal_iters // 5)
    while i < args.equal_iters or clock.elapsed < args.equal_seconds:
        _, dt = clock.run(step_fn)
        i += 1
        times.append(dt)
        if i == args.equal_iters:
            err_iters = eval_fn()
            curve.append((i, clock.elapsed, err_iters))
        if err_secs is None and clock.elapsed >= args.equal_seconds:
            err_secs, secs_at, iters_at = eval_fn(), clock.elapsed, i
            curve.append((i, clock.elapsed, err_secs))
        elif i % eval_every == 0 and i != args.equal_iters:
            curve.append((i, clock.elapsed, eval_fn()))
        if i > 100000:
            break
    w = args.warmup
    window = times[w:w + args.iters] if len(times) >= w + args.iters else times[w:]
    return {"peer": name, "iters_run": i, "time mean [ms]": 1e3 * sum(window) / max(1, len(window)),
            "time median [ms]": 1e3 * statistics.median(window) if window else None,
            "timing window": f"iterations {w + 1}..{w + len(window)}",
            f"error @ {args.equal_iters} it": err_iters, "error @ s": err_secs, "s measured": secs_at,
            "iters @ s": iters_at, "curve": curve}


def run_kfac_fast(factory, X, args, device) -> dict:
    torch.manual_seed(args.seed)
    model = factory()
    cfg = KFACConfig(T1=args.T1, T2=args.T3, T3=args.T3, factorization=args.factorization)
    opt = kfac_fast.KFAC(model, loss="sigmoid_cross_entropy", backend="auto", config=cfg,
                         generator=torch.Generator(device=device).manual_seed(args.seed))
    it = batches(X, args.batch, args.seed)

    def step():
        x = next(it)
        opt.step(x, x)

    r = train_run("kfac_fast", step, lambda: reconstruction_error(model, X), args)
    r["settings"] = (f"KFAC defaults: block_diagonal, lambda_init={cfg.lambda_init}, eta={cfg.weight_decay}, "
                     f"T1={cfg.T1}, T2={cfg.T2}, T3={cfg.T3}, tau1={cfg.tau1}, tau2={cfg.tau2}, backend=auto")
    return r


def run_asdl(factory, X, args, device) -> dict:
    import asdl  # the module installed by the `asdfghjkl` 0.1a5 wheel
    import torch.cuda.nvtx as nvtx

    if not torch.cuda.is_available():  # ASDL wraps its work in nvtx.range, which raises on CPU-only torch
        nvtx.range_push = lambda *a, **k: 0
        nvtx.range_pop = lambda *a, **k: 0

    torch.manual_seed(args.seed)
    model = factory()
    m = args.batch
    config = asdl.PreconditioningConfig(data_size=m, damping=args.asdl_damping, ema_decay=0.05,
                                        preconditioner_upd_interval=args.T3, preconditioner_warmup_steps=3,
                                        curvature_upd_interval=1)
    gm = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
    opt = torch.optim.SGD(model.parameters(), lr=args.asdl_lr, momentum=0.9, weight_decay=1e-5)
    it = batches(X, m, args.seed)

    def step():
        x = next(it)
        opt.zero_grad(set_to_none=True)
        dummy = gm.setup_model_call(model, x)
        # ASDL forces reduction="sum" and divides the gradients by data_size = m
        gm.setup_loss_call(F.binary_cross_entropy_with_logits, dummy, x)
        gm.forward_and_backward()
        opt.step()

    r = train_run("ASDL", step, lambda: reconstruction_error(model, X), args)
    r["settings"] = (f"asdfghjkl {_version('asdfghjkl')} KfacGradientMaker(fisher_type='fisher_emp'), damping="
                     f"{args.asdl_damping} (pi-factored), curvature every step (ema 0.95), inverse every "
                     f"{args.T3} (+ first 3), torch SGD lr={args.asdl_lr} momentum=0.9 wd=1e-5; nvtx no-op shim on CPU torch")
    return r


def run_kfac_jax(factory, X, args, device) -> dict:
    import jax
    import jax.numpy as jnp
    import haiku as hk
    import kfac_jax
    import numpy as np
    import optax

    torch.manual_seed(args.seed)
    model = factory()
    spec = []  # (out_features, sigmoid after?)
    mods = list(model)
    for i, mod in enumerate(mods):
        if isinstance(mod, nn.Linear):
            spec.append((mod.out_features, i + 1 < len(mods) and isinstance(mods[i + 1], nn.Sigmoid)))

    def forward(x):
        h = x
        for j, (out, sig) in enumerate(spec):
            h = hk.Linear(out, name=f"lin{j}")(h)
            if sig:
                h = jax.nn.sigmoid(h)
        return h

    net = hk.without_apply_rng(hk.transform(forward))
    lins = [mod for mod in mods if isinstance(mod, nn.Linear)]
    params = {f"lin{j}": {"w": jnp.asarray(l.weight.detach().cpu().numpy().T), "b": jnp.asarray(l.bias.detach().cpu().numpy())}
              for j, l in enumerate(lins)}  # same initial weights as the torch model
    eta = 1e-5

    def loss_fn(p, batch):
        logits = net.apply(p, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        nll = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1))
        return nll + 0.5 * eta * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=eta,
        use_adaptive_learning_rate=True, use_adaptive_momentum=True, use_adaptive_damping=True,
        initial_damping=1.0, damping_adaptation_interval=args.T1, damping_adaptation_decay=0.95,
        inverse_update_period=args.T3, curvature_ema=0.95, estimation_mode="fisher_gradients",
        num_burnin_steps=0, multi_device=False)
    Xn = jnp.asarray(X.cpu().numpy())
    it = batches(X, args.batch, args.seed)
    rng = jax.random.PRNGKey(args.seed)
    state = opt.init(params, rng, jnp.asarray(next(batches(X, args.batch, args.seed)).cpu().numpy()))
    # JIT compilation outside the clock: throw-away steps from copies of the start point (kfac-jax
    # donates its arguments) covering both compiled variants (with / without the damping update).
    p_c, s_c = jax.tree_util.tree_map(jnp.array, params), jax.tree_util.tree_map(jnp.array, state)
    t0 = time.perf_counter()
    xb = jnp.asarray(next(batches(X, args.batch, args.seed + 1)).cpu().numpy())
    for j in range(args.T1 + 1):
        p_c, s_c, _ = opt.step(p_c, s_c, jax.random.PRNGKey(999 + j), batch=xb, global_step_int=j)
    jax.block_until_ready(p_c)
    compile_s = time.perf_counter() - t0
    holder = {"p": params, "s": state, "i": 0}

    def step():
        xb = jnp.asarray(next(it).cpu().numpy())
        p, s, _ = opt.step(holder["p"], holder["s"], jax.random.fold_in(rng, holder["i"]), batch=xb,
                           global_step_int=holder["i"])
        jax.block_until_ready(p)
        holder.update(p=p, s=s, i=holder["i"] + 1)

    def err():
        total = 0.0
        for a in range(0, Xn.shape[0], 2500):
            xb = Xn[a:a + 2500]
            total += float(jnp.sum((jax.nn.sigmoid(net.apply(holder["p"], xb)) - xb) ** 2))
        return total / Xn.shape[0]

    r = train_run("kfac-jax", step, err, args)
    r["settings"] = (f"kfac-jax {_version('kfac-jax')} / jax {jax.__version__} CPU: adaptive lr+momentum+damping, "
                     f"initial_damping=1.0, l2_reg={eta}, inverse_update_period={args.T3}, damping every {args.T1} "
                     f"(decay 0.95^{args.T1}), curvature_ema=0.95, estimation_mode=fisher_gradients, "
                     f"num_burnin_steps=0; JIT compile {compile_s:.1f} s excluded from the clock")
    return r


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


def peers_section(args, device, info) -> None:
    factory, X, desc = make_problem("autoencoder", args, device)
    print(f"\n== peers on the {desc}; batch m={args.batch}; refresh period {args.T3}; error = training "
          f"reconstruction error on all {X.shape[0]} images, clock paused while evaluating", flush=True)
    rows = []
    for name, fn in (("kfac_fast", run_kfac_fast), ("ASDL", run_asdl), ("kfac-jax", run_kfac_jax)):
        if name not in args.peer_list.split(","):
            continue
        print(f"  running {name} ...", flush=True)
        try:
            r = fn(factory, X, args, device)
        except Exception as exc:
            tb = traceback.format_exc(limit=3).strip().splitlines()
            r = {"peer": name, "note": f"could not run: {type(exc).__name__}: {exc} | {tb[-3] if len(tb) > 2 else ''}"}
            print(f"  {name} failed: {exc}", flush=True)
        r["missing paper features"] = MISSING[name]
        rows.append(r)
        if "time mean [ms]" in r:
            print(f"  {name}: {r['time mean [ms]']:.1f} ms/it mean, {r['time median [ms]']:.1f} median; error "
                  f"{r[f'error @ {args.equal_iters} it']:.2f} @ {args.equal_iters} it, {r['error @ s']:.2f} @ "
                  f"{r['s measured']:.1f} s ({r['iters @ s']} it)", flush=True)
    cols = ["peer", "time mean [ms]", "time median [ms]", f"error @ {args.equal_iters} it", "error @ s",
            "s measured", "iters @ s"]
    print()
    print_table(rows, cols)
    for r in rows:
        print(f"  {r['peer']}: {r.get('settings', r.get('note', ''))}\n    lacks: {r['missing paper features']}")
    out = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    write_csv(f"step_peers_{device.type}{args.suffix}", out, dict(info, load_avg=_load_note(args), batch=args.batch, T3=args.T3,
                                                     equal_iters=args.equal_iters, equal_seconds=args.equal_seconds))
    plot_peers(rows, os.path.join(RESULTS_DIR, f"step_peers_{device.type}{args.suffix}.png"), info, args)


def plot_peers(rows, path, info, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if "curve" not in r:
            continue
        its, secs, errs = zip(*r["curve"])
        axes[0].plot(its, errs, marker="o", ms=3, label=r["peer"])
        axes[1].plot(secs, errs, marker="o", ms=3, label=r["peer"])
    axes[0].axvline(args.equal_iters, color="grey", ls=":", lw=1)
    axes[1].axvline(args.equal_seconds, color="grey", ls=":", lw=1)
    axes[0].set_xlabel("iterations")
    axes[1].set_xlabel("optimizer seconds (evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("training reconstruction error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST autoencoder, batch {args.batch}, refresh period {args.T3} — {info['cpu']}, "
                 f"{info['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _load_note(args) -> str:
    end = os.getloadavg()
    return f"{args.load_note}; {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} at end (1/5/15 min, 2 cores)"


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=5, help="untimed K-FAC steps first (k<=3 always refresh)")
    ap.add_argument("--iters", type=int, default=40, help="timed steps; must be a multiple of T3 and T1")
    ap.add_argument("--T3", type=int, default=20)
    ap.add_argument("--T1", type=int, default=5)
    ap.add_argument("--backends", default="torch,native,auto,triton")
    ap.add_argument("--wide", action="store_true", help="also time a wider MLP")
    ap.add_argument("--factorization", default="auto", choices=["auto", "eigh", "cholesky"],
                    help="damped factor inverses of the block-diagonal inverse (KFACConfig.factorization)")
    ap.add_argument("--problems", default="autoencoder", help="comma list of autoencoder,wide (--wide adds wide)")
    ap.add_argument("--suffix", default=None, help="CSV/PNG name suffix (default: '_quick' with --quick, else '')")
    ap.add_argument("--wide-dim", type=int, default=2048)
    ap.add_argument("--wide-layers", type=int, default=3)
    ap.add_argument("--wide-iters", type=int, default=20, help="timed K-FAC steps on the wide MLP (multiple of T3)")
    ap.add_argument("--no-phases", action="store_true", help="skip question 1")
    ap.add_argument("--peers", action="store_true", help="also run ASDL and kfac-jax (question 2)")
    ap.add_argument("--peer-list", default="kfac_fast,ASDL,kfac-jax")
    ap.add_argument("--equal-iters", type=int, default=50)
    ap.add_argument("--equal-seconds", type=float, default=60.0)
    ap.add_argument("--asdl-lr", type=float, default=0.1)
    ap.add_argument("--asdl-damping", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="", help="KFACConfig overrides per K-FAC run, ';' between runs, e.g. "
                    "'Tq=1;Tq=5' (each run on every backend)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.iters, args.T3, args.T1 = 100, 2, 10, 10, 5
        args.wide_dim, args.wide_layers, args.wide_iters = 256, 2, 10
        args.equal_iters, args.equal_seconds = 10, 3.0
    for name in ("iters", "wide_iters"):
        v = getattr(args, name)
        if v % args.T3 or v % args.T1:
            ap.error(f"--{name.replace('_', '-')} ({v}) must be a multiple of T3 ({args.T3}) and T1 ({args.T1})")
    if args.suffix is None:
        args.suffix = "_quick" if args.quick else ""
    if args.threads == 1 and "XLA_FLAGS" not in os.environ:  # kfac-jax on one thread too
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()
    args.load_note = f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at start" + (" (quick)" if args.quick else "")
    info = machine_info(device)
    print(f"machine: {info}\nload average (1/5/15 min): {args.load_note}")
    if not args.no_phases:
        phases_section(args, device, info)
    if args.peers:
        peers_section(args, device, info)


if __name__ == "__main__":
    main()
