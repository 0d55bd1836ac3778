"""Question: how much faster is each grouped Triton kernel family than its plain-PyTorch
reference (per-layer matmul loops), over whole networks?

Layer sets:
    mnist_ae   784-1000-500-250-30-250-500-1000-784 (factor sizes 785, 1001, 501, 251, 31, ...;
               G sizes 1000, 500, 250, 30, ...)
    square_d   4 square layers of width d, d in 512, 1024, 2048, 4096
at batch m in 128, 1024, 4096. Per (layer set, m) and kernel family one row per candidate
with the median time and ``speedup`` = t_reference / t_candidate.

Precision policy: both sides run the same precision. Default fp32 with TF32 *off*
(torch.backends.cuda.matmul.allow_tf32 = False; the Triton kernels follow the same flag,
so ``--tf32`` turns it on for both). ``--dtype bf16|fp16`` feeds 16-bit inputs to both;
both accumulate in fp32 (the reference upcasts, the kernel uses 16-bit tensor-core dots).

Usage:
    python benchmarks/bench_kernels.py                 # full sweep on CUDA, CSV to results/
    python benchmarks/bench_kernels.py --quick         # one batch size, fewer repeats
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --quick
                                                       # plumbing check only: interpreter timings
                                                       # mean nothing and are never written
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_csv  # noqa: E402

# kfac_fast.ops imports triton, so it is imported in main() after TRITON_INTERPRET is settled.

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_sets(quick: bool, tiny: bool) -> dict[str, list[tuple[int, int]]]:
    """name -> [(d_in, d_out)] per layer (d_in without the homogeneous coordinate)."""
    if tiny:
        w = [20, 9, 33, 12]
        return {"tiny": list(zip(w[:-1], w[1:]))}
    w = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    sets = {"mnist_ae": list(zip(w[:-1], w[1:]))}
    for d in ((512, 2048) if quick else (512, 1024, 2048, 4096)):
        sets[f"square_{d}"] = [(d, d)] * 4
    return sets


def _rel_err(out, ref) -> float:
    num = max(((o.double() - r.double()).abs().max().item() for o, r in zip(out, ref)), default=0.0)
    den = max((r.double().abs().max().item() for r in ref), default=1.0)
    return num / max(den, 1e-30)


def _cfg_name(cfg: dict) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}/w{cfg['num_warps']}/s{cfg['num_stages']}"


def _with_config(cfg, fn):
    from kfac_fast.ops._grouped_gemm import config_override

    def run():
        with config_override(cfg):
            fn()
    return run


# Tile configs tried by --sweep (BLOCK_M = BLOCK_N so symmetric launches can use them too).
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bm, BLOCK_K=bk, num_warps=w, num_stages=st)
         for bm, bk, w, st in [(64, 32, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3),
                               (128, 64, 8, 4), (256, 64, 8, 3)]]


def bench_family(name, layers, m, dtype, device, timing, sweep=()):
    """Rows for one (layer set, batch): each family, reference then Triton."""
    from kfac_fast.ops import (cross_factor_update, eigen_precondition, factor_update, rank_m_is_cheaper,
                               rank_m_precondition, sandwich)

    dev = torch.device(device)
    rows = []
    L = len(layers)
    d_in = [a for a, _ in layers]
    d_out = [b for _, b in layers]

    def add(family, flops, fns, reset=None):
        # Triton candidates: the default config, plus each --sweep config.
        if sweep:
            for cfg in sweep:
                fn, result = fns["triton"]
                try:  # a config may not fit (shared memory for fp32 tiles): skip it, say so
                    _with_config(cfg, fn)()
                except Exception as exc:  # noqa: BLE001 - triton raises several resource errors
                    print(f"# {family}: config {_cfg_name(cfg)} skipped: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                fns[f"triton[{_cfg_name(cfg)}]"] = (_with_config(cfg, fn), result)
        times = {cand: time_fn(fn, device=device, **timing)["median_s"] for cand, (fn, _) in fns.items()}
        # Correctness from one call each on the same state (timing loops mutate in-place outputs).
        outs = {}
        for cand, (fn, result) in fns.items():
            if reset is not None:
                reset()
            fn()
            outs[cand] = [t.clone() for t in result()]
        for cand, t in times.items():
            rows.append(dict(layers=name, m=m, family=family, candidate=cand, median_ms=t * 1e3,
                             speedup=times["torch"] / t, gflops=flops / t / 1e9,
                             rel_err=_rel_err(outs[cand], outs["torch"]) if cand != "torch" else 0.0,
                             rank_m_cheaper=all(rank_m_is_cheaper(m, do, di + 1) for di, do in layers)))

    # 1. factor_update: Ā_{i-1,i-1} (d_in+1) and G_{i,i} (d_out) of every layer in one call.
    X = [torch.randn(m, d, device=dev).to(dtype) for d in d_in]
    Gm = [torch.randn(m, d, device=dev).to(dtype) for d in d_out]
    inputs = X + Gm
    hs = [True] * L + [False] * L
    F_ref = [torch.zeros(x.shape[1] + h, x.shape[1] + h, device=dev) for x, h in zip(inputs, hs)]
    F_tri = [f.clone() for f in F_ref]

    def reset_F():
        for f, g in zip(F_ref, F_tri):
            f.zero_()
            g.zero_()

    kw = dict(eps=0.95, scale=0.05 / m, homogeneous=hs)
    flops = sum(2 * m * f.shape[0] ** 2 for f in F_ref)
    add("factor_update", flops, {
        "torch": (lambda: factor_update(F_ref, inputs, backend="torch", **kw), lambda: F_ref),
        "triton": (lambda: factor_update(F_tri, inputs, backend="triton", **kw), lambda: F_tri),
    }, reset_F)
    # same with the tau_1 subset (a quarter of the batch, scattered indices)
    idx = torch.randperm(m, device=dev)[: max(1, m // 4)]
    add("factor_update[rows=m/4 idx]", flops / 4, {
        "torch": (lambda: factor_update(F_ref, inputs, rows=idx, backend="torch", **kw), lambda: F_ref),
        "triton": (lambda: factor_update(F_tri, inputs, rows=idx, backend="triton", **kw), lambda: F_tri),
    }, reset_F)

    # 2. cross_factor_update: Ā_{i-1,i} between consecutive layers' inputs.
    if L > 1:
        Xc, Yc = X[:-1], X[1:]
        C_ref = [torch.zeros(x.shape[1] + 1, y.shape[1] + 1, device=dev) for x, y in zip(Xc, Yc)]
        C_tri = [c.clone() for c in C_ref]
        ckw = dict(eps=0.95, scale=0.05 / m, homogeneous_x=True, homogeneous_y=True)
        flops = sum(2 * m * c.numel() for c in C_ref)
        add("cross_factor_update", flops, {
            "torch": (lambda: cross_factor_update(C_ref, Xc, Yc, backend="torch", **ckw), lambda: C_ref),
            "triton": (lambda: cross_factor_update(C_tri, Xc, Yc, backend="triton", **ckw), lambda: C_tri),
        }, lambda: [c.zero_() for c in C_ref + C_tri])
    del X, Gm, inputs, F_ref, F_tri

    # 3. eigen_precondition: factored Tikhonov in the eigenbases of G (d_out) and Ā (d_in+1).
    # Timing does not depend on orthogonality, so random matrices stand in for eigenvectors.
    V = [torch.randn(do, di + 1, device=dev).to(dtype) for di, do in layers]
    QL = [(torch.randn(do, do, device=dev) / do ** 0.5).to(dtype) for do in d_out]
    QR = [(torch.randn(di + 1, di + 1, device=dev) / (di + 1) ** 0.5).to(dtype) for di in d_in]
    sL = [torch.rand(do, device=dev) for do in d_out]
    sR = [torch.rand(di + 1, device=dev) for di in d_in]
    ekw = dict(cL=0.1, cR=0.2)
    flops = sum(4 * v.numel() * (v.shape[0] + v.shape[1]) for v in V)
    res = {}
    add("eigen_precondition", flops, {
        "torch": (lambda: res.__setitem__("t", eigen_precondition(V, QL, sL, QR, sR, backend="torch", **ekw)),
                  lambda: res["t"]),
        "triton": (lambda: res.__setitem__("k", eigen_precondition(V, QL, sL, QR, sR, backend="triton", **ekw)),
                   lambda: res["k"]),
    })
    del QL, QR, sL, sR

    # 4. sandwich: the Ξᵀ pass of Sec 4.3, U_i = V_i − Ψ^Gᵀ_{i-1,i} V_{i-1} Ψ^Ā_{i-2,i-1}.
    if L > 1:
        PsiG = [(torch.randn(d_out[i - 1], d_out[i], device=dev) * 0.01).to(dtype) for i in range(1, L)]
        PsiA = [(torch.randn(d_in[i - 1] + 1, d_in[i] + 1, device=dev) * 0.01).to(dtype) for i in range(1, L)]
        Vp, Vc = V[:-1], V[1:]
        skw = dict(alpha=-1.0, V=Vc, beta=1.0, transpose_L=True)
        flops = sum(2 * g.shape[1] * g.shape[0] * w.shape[1] + 2 * g.shape[1] * a.shape[0] * a.shape[1]
                    for g, w, a in zip(PsiG, Vp, PsiA))
        add("sandwich[tridiag pass]", flops, {
            "torch": (lambda: res.__setitem__("t", sandwich(PsiG, Vp, PsiA, backend="torch", **skw)),
                      lambda: res["t"]),
            "triton": (lambda: res.__setitem__("k", sandwich(PsiG, Vp, PsiA, backend="triton", **skw)),
                       lambda: res["k"]),
        })
        del PsiG, PsiA
    del V

    # 5. rank_m_precondition: the small-batch path; "direct_torch" is the path it replaces.
    if m <= 512:
        X = [torch.randn(m, d, device=dev).to(dtype) for d in d_in]
        Gm = [torch.randn(m, d, device=dev).to(dtype) for d in d_out]
        sym = lambda n: ((lambda r: (r + r.T) / (2 * n ** 0.5))(torch.randn(n, n, device=dev))).to(dtype)  # noqa: E731
        Ainv = [sym(d + 1) for d in d_in]  # the rank-m identity needs symmetric inverses
        Ginv = [sym(d) for d in d_out]
        rkw = dict(homogeneous=True, scale=1.0 / m)

        def direct():  # the path rank-m avoids: Ginv (Gmᵀ X̄) Ainv, as a per-layer torch loop
            out = []
            for x, g, a, gi in zip(X, Gm, Ainv, Ginv):
                grad = torch.cat([g.float().T @ x.float(), g.float().sum(0)[:, None]], 1)
                out.append(torch.linalg.multi_dot([gi.float(), grad, a.float()]).mul_(1.0 / m))
            res["d"] = out

        flops = sum(2 * m * (do * do + (di + 1) ** 2 + do * (di + 1)) for di, do in layers)
        add("rank_m_precondition", flops, {
            "torch": (lambda: res.__setitem__("t", rank_m_precondition(X, Gm, Ainv, Ginv, backend="torch", **rkw)),
                      lambda: res["t"]),
            "triton": (lambda: res.__setitem__("k", rank_m_precondition(X, Gm, Ainv, Ginv, backend="triton", **rkw)),
                       lambda: res["k"]),
            "direct_torch": (direct, lambda: res["d"]),
        })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one batch size, fewer layer sets and repeats")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (accumulation is fp32)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for both torch and Triton")
    p.add_argument("--batches", type=int, nargs="*", default=None)
    p.add_argument("--sweep", action="store_true", help="also time the Triton kernels under each tile config in SWEEP")
    args = p.parse_args(argv)

    if torch.device(args.device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import
    from kfac_fast.backends import triton_interpret

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(0)
    interp = triton_interpret()
    if interp and torch.device(args.device).type == "cuda":
        sys.exit("TRITON_INTERPRET is set: unset it to benchmark on CUDA")
    batches = args.batches or ([8] if interp else ([128, 2048] if args.quick else [128, 1024, 4096]))
    timing = dict(warmup=0, repeats=1) if interp else (dict(warmup=3, repeats=10) if args.quick
                                                         else dict(warmup=5, repeats=25))
    sets = layer_sets(args.quick, tiny=interp)
    rows = []
    for name, layers in sets.items():
        for m in batches:
            rows.extend(bench_family(name, layers, m, DTYPES[args.dtype], args.device, timing,
                                     sweep=SWEEP[:1] if (args.sweep and interp) else SWEEP if args.sweep else ()))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"# device={args.device} dtype={args.dtype} tf32={args.tf32} (speedup = t_torch / t_candidate)")
    print_table(rows, ["layers", "m", "family", "candidate", "median_ms", "speedup", "gflops", "rel_err",
                       "rank_m_cheaper"])
    if interp:
        print("# Triton ran in the interpreter: timings are meaningless and no CSV was written.")
        return
    info = machine_info(args.device)
    info.update(dtype=args.dtype, tf32=args.tf32)
    write_csv(f"kernels_{torch.device(args.device).type}_{args.dtype}{'_tf32' if args.tf32 else ''}{'_sweep' if args.sweep else ''}", rows, info)


if __name__ == "__main__":
    main()
