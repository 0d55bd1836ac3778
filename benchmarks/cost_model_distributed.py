"""A cost model of data-parallel K-FAC: validated on this CPU's measurements, then
evaluated for ResNet-50 and GPT-2-small layer sets on 8 to 1024 ranks in both modes.

    PYTHONPATH=python python benchmarks/cost_model_distributed.py
        (reads results/distributed_cpu.csv and results/distributed_cpu_calibration.csv from
        bench_distributed.py) → results/cost_model_validation.csv, results/cost_model_distributed.csv,
        results/cost_model_distributed.png

What is modelled (per rank, per iteration; p ranks, K-FAC blocks i with Ā of size a_i, G of
size g_i, R_i rows per example, b examples per rank, τ₁ the statistics fraction, T_f the factor
reduction period, T3 the refresh period, w bytes per element):

* compute at a GEMM rate r: forward+backward 6·b·Σ a_i g_i R_i flops (the autoencoder; the
  cluster models take a throughput instead, below); the statistics pass the same on τ₁·b
  examples every iteration (KFACPreconditioner today), or nothing extra when the statistics are
  captured from the training pass (hooks, as KAISA: the cluster rows); the factor update
  Σ 2 (a_i² + g_i²) τ₁ b R_i every T_f; the apply Σ 2 g_i a_i (g_i + a_i) over all blocks
  (``replicate_inverses``) or the owned ones (``shard_inverses``);
* the refresh: max over ranks of Σ_owned t_inv(a_i) + t_inv(g_i), owners by LPT on n³
  (kfac_fast.distributed.assign, the same code), every T3 iterations;
* communication (α-β; the bandwidth term of ring algorithms, the latency of trees, as NCCL
  picks per size): all-reduce of S bytes 2⌈log2 p⌉α + 2(p−1)/p·S·β; all-gather of S bytes in
  total ⌈log2 p⌉α + (p−1)/p·S·β; the per-owner broadcasts Σ_r (⌈log2 p⌉α + S_r β). At p = 2
  (the validation) these are the ring formulas. Sizes: gradient 4·P (all parameters), factors
  Σ a(a+1)/2 + g(g+1)/2 elements (upper triangles) every T_f, inverses the same triangles every
  T3 (Cholesky-built; an eigendecomposition sends Q and s: n² + n each), directions every
  iteration: a padded all-gather of p·max_r Σ_owned g a elements while the shares are balanced
  (p·max ≤ 1.25·total), else one broadcast per owning rank of its Σ_owned g a elements
  (``TorchDistributor.all_gather_directions`` makes the same choice).
* the K-FAC/SGD time ratio: SGD = forward+backward + gradient all-reduce; K-FAC adds the rest
  with no overlap (an upper bound on K-FAC's extra time; with the gradient all-reduce fully
  overlapped with the backward in both, the ratio is given as the second number).

What is measured: on this CPU (2-core AMD EPYC, gloo over localhost) the GEMM rate, the
Cholesky-inverse time per n³ and the gloo α, β (fitted on 4 buffer sizes), and the phases the
model predicts (validation table). What is assumed (not measured here, stated in the output
rows): the cluster's constants, V100 fp32 throughputs and a 100 Gb/s InfiniBand network (α =
20 µs, 10 GB/s bus bandwidth), KAISA-like settings for ResNet-50 (batch 32 per GPU, factors
every 10 iterations, inverses every 100, eigendecompositions). Not modelled: overlap of
communication with compute (beyond the bound above), memory traffic (the write-back, the
optimizer step), kernel launch overheads, stragglers, the native engine, mixed precision.
"""
from __future__ import annotations

import csv
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from kfac_fast.distributed import assign  # noqa: E402

RESULTS = os.path.join(HERE, "results")
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
KAISA_RATIO = (1.75, 2.14)  # ResNet-50 K-FAC/SGD time, 16-64 V100s, as published by KAISA's authors
KAISA_RANKS = (16, 64)


# ---------------------------------------------------------------------------- layer sets
def autoencoder_layers():
    """(name, a, g, rows per example): the MNIST autoencoder's 8 Linear layers (bias: a = d_in + 1)."""
    s = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    return [(f"fc{i}", d_in + 1, d_out, 1) for i, (d_in, d_out) in enumerate(zip(s[:-1], s[1:]))]


def resnet50_layers():
    """ResNet-50 v1.5 at 224×224: 53 convolutions (a = c_in·k², no bias, R = output positions,
    KFAC-expand) and the classifier (2048 + 1 → 1000). BatchNorm is left to SGD (as KAISA)."""
    out = [("conv1", 3 * 49, 64, 112 * 112)]
    c_in, hw = 64, 56
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for blk in range(blocks):
            stride = 2 if (blk == 0 and stage > 0) else 1
            hw_out = hw // stride
            pre = f"layer{stage + 1}.{blk}"
            out.append((f"{pre}.conv1", c_in, width, hw * hw))
            out.append((f"{pre}.conv2", width * 9, width, hw_out * hw_out))
            out.append((f"{pre}.conv3", width, 4 * width, hw_out * hw_out))
            if blk == 0:
                out.append((f"{pre}.downsample", c_in, 4 * width, hw_out * hw_out))
            c_in, hw = 4 * width, hw_out
    out.append(("fc", 2048 + 1, 1000, 1))
    return out


def gpt2_small_layers(seq: int = 1024):
    """GPT-2 small: 12 blocks × (c_attn 768→2304, attn c_proj 768→768, c_fc 768→3072, mlp c_proj
    3072→768), biases (a = d_in + 1), R = seq tokens per sequence. The tied embedding / LM head
    (G would be 50257²) and the LayerNorms are left to the first-order optimizer."""
    out = []
    for i in range(12):
        out += [(f"h{i}.attn.c_attn", 769, 2304, seq), (f"h{i}.attn.c_proj", 769, 768, seq),
                (f"h{i}.mlp.c_fc", 769, 3072, seq), (f"h{i}.mlp.c_proj", 3073, 768, seq)]
    return out


MODELS = {
    # params: all trainable parameters (the gradient all-reduce); batch per rank; fwd+bwd seconds
    # per example on a V100 in fp32 (assumed: ~360 img/s for ResNet-50; GPT-2 small at 6·124M
    # flops per token plus attention ≈ 0.8 GFLOP/token at 6.3 TFLOP/s, 1024-token sequences)
    "ResNet-50": dict(layers=resnet50_layers(), params=25_557_032, batch=32, fb_s_per_example=1 / 360,
                      T_f=10, T3=100, tau1=1.0, factorization="eigh",
                      settings="KAISA-like: statistics from the training pass (hooks), factors every 10, "
                               "inverses every 100, eigendecompositions, batch 32/GPU"),
    "GPT-2-small": dict(layers=gpt2_small_layers(), params=124_439_808, batch=8,
                        fb_s_per_example=1024 * 0.8e9 / 6.3e12, T_f=10, T3=100, tau1=1.0, factorization="cholesky",
                        settings="statistics from the training pass (hooks), factors every 10, inverses every 100, "
                                 "Cholesky, 8 sequences of 1024 tokens/GPU"),
}

CLUSTER = dict(  # assumed, not measured: V100 fp32 and 100 Gb/s InfiniBand EDR
    alpha_s=20e-6, beta_s_per_byte=1 / 10e9, gemm_flops_per_s=10e12,
    chol_t0_s=0.5e-3, chol_s_per_n3=1 / 1.5e12,  # potrf + potri ≈ n³ flops at ~1.5 TFLOP/s
    eigh_t0_s=2e-3, eigh_s_per_n3=2.5e-11,  # syevd fp32, ≈ 0.2 s at n = 2048
)


# ---------------------------------------------------------------------------- the model
def tri(n: int) -> int:
    return n * (n + 1) // 2


def comm_time(kind: str, nbytes: float, p: int, alpha: float, beta: float, *, chunks: int = 1) -> float:
    if p == 1 or nbytes == 0:
        return 0.0
    hops = math.ceil(math.log2(p))
    if kind == "all_reduce":
        return 2 * hops * alpha + 2 * (p - 1) / p * nbytes * beta
    if kind == "all_gather":
        return hops * alpha + (p - 1) / p * nbytes * beta
    if kind == "broadcast":  # `chunks` broadcasts (one per owner) of nbytes in total
        return chunks * math.ceil(math.log2(p)) * alpha + nbytes * beta
    raise ValueError(kind)


def wire_bytes(kind: str, nbytes: float, p: int) -> float:
    """Bytes one rank sends (the ByteCounter's model)."""
    return {"all_reduce": 2 * (p - 1) / p, "all_gather": (p - 1) / p, "broadcast": (p - 1) / p}[kind] * nbytes


def directions_cost(shares: list[int], p: int, w: int, alpha: float, beta: float) -> tuple[float, float, str]:
    """(seconds, bytes one rank sends, how) of TorchDistributor.all_gather_directions: a padded
    all-gather while p·max ≤ PAD_LIMIT·total, else one broadcast per owning rank."""
    from kfac_fast.distributed import PAD_LIMIT

    total, width = sum(shares), max(shares)
    if p * width <= PAD_LIMIT * total:
        return (comm_time("all_gather", w * p * width, p, alpha, beta), wire_bytes("all_gather", w * p * width, p),
                "all_gather")
    owners = sum(1 for x in shares if x)
    return (comm_time("broadcast", w * total, p, alpha, beta, chunks=owners), wire_bytes("broadcast", w * total, p),
            "broadcasts")


def evaluate(layers, p: int, *, mode: str, params: int, batch: int, tau1: float, T_f: int, T3: int, w: int,
             gemm: float, t_inv, alpha: float, beta: float, factorization: str, fb_s: float | None = None,
             stats_pass: str = "extra") -> dict:
    """Per-iteration seconds by phase and bytes sent by kind, for one rank (the slowest).

    ``stats_pass``: ``"extra"`` (KFACPreconditioner today: a second forward+backward on the τ₁
    subset every iteration) or ``"hooks"`` (statistics captured from the training pass, as KAISA;
    no extra pass). The factor update and reduction run every ``T_f`` iterations."""
    costs = [a ** 3 + g ** 3 for _, a, g, _ in layers]
    owners = assign(costs, p)
    per_rank_refresh = [0.0] * p
    for (_, a, g, _), r in zip(layers, owners):
        per_rank_refresh[r] += t_inv(a) + t_inv(g)
    refresh = max(per_rank_refresh)
    rows1 = max(1, round(tau1 * batch))
    fb = fb_s if fb_s is not None else 6 * batch * sum(a * g * R for _, a, g, R in layers) / gemm
    stats = fb * rows1 / batch if stats_pass == "extra" else 0.0  # the τ₁ pass (a second pass)
    fupd = sum(2 * (a * a + g * g) * rows1 * R for _, a, g, R in layers) / gemm
    apply_all = [2 * g * a * (g + a) / gemm for _, a, g, _ in layers]
    if mode == "replicate_inverses":
        apply = sum(apply_all)
    else:
        apply = max(sum(t for t, o in zip(apply_all, owners) if o == r) for r in range(p))
    F = sum(tri(a) + tri(g) for _, a, g, _ in layers)
    inv_elems = F if factorization == "cholesky" else sum(a * a + a + g * g + g for _, a, g, _ in layers)
    share = [sum(g * a for (_, a, g, _), o in zip(layers, owners) if o == r) for r in range(p)]
    t_dirs, b_dirs, how = directions_cost(share, p, w, alpha, beta)
    t = {
        "forward_backward": fb, "statistics": stats, "factor_update": fupd / T_f, "apply": apply,
        "refresh": refresh / T3,
        "comm_gradient": comm_time("all_reduce", w * params, p, alpha, beta),
        "comm_factors": comm_time("all_reduce", w * F, p, alpha, beta) / T_f,
        "comm_inverses": (comm_time("broadcast", w * inv_elems, p, alpha, beta, chunks=min(p, len(layers))) / T3
                          if mode == "replicate_inverses" else 0.0),
        "comm_directions": t_dirs if mode == "shard_inverses" else 0.0,
        "comm_scalars": comm_time("all_reduce", 16, p, alpha, beta),
    }
    b = {
        "gradient": wire_bytes("all_reduce", w * params, p),
        "factors": wire_bytes("all_reduce", w * F, p) / T_f,
        "inverses": wire_bytes("broadcast", w * inv_elems, p) / T3 if mode == "replicate_inverses" else 0.0,
        "directions": b_dirs if mode == "shard_inverses" else 0.0,
        "scalars": wire_bytes("all_reduce", 16, p),
    }
    held = (w * inv_elems if mode == "replicate_inverses" else
            max(sum(w * (tri(a) + tri(g)) for (_, a, g, _), o in zip(layers, owners) if o == r) for r in range(p)))
    return {"seconds": t, "bytes": b, "refresh_s_per_rank": refresh, "inverse_bytes_per_rank": held,
            "owners": owners, "busy_ranks": len(set(owners)), "directions_by": how,
            "largest_block_s": max(t_inv(a) + t_inv(g) for _, a, g, _ in layers)}


# ---------------------------------------------------------------------------- calibration
def read_csv(name: str) -> list[dict]:
    with open(os.path.join(RESULTS, f"{name}.csv"), newline="") as f:
        return list(csv.DictReader(f))


def fit_alpha_beta(cal: dict, op: str) -> tuple[float, float]:
    """Least squares t = α + β·bytes over the measured float32 sizes."""
    pts = [(4 * int(k.rsplit("_", 1)[1]), v) for k, v in cal.items() if k.startswith(f"gloo2:{op}_s_")]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    beta = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return max(my - beta * mx, 0.0), beta


def validate(measured: list[dict], cal: dict) -> list[dict]:
    """The model's phases for each measured configuration against the measurement."""
    by = {}
    for r in measured:
        by.setdefault(r["config"], {})[r["metric"]] = r
    layers = autoencoder_layers()
    params = sum((a) * g for _, a, g, _ in layers)
    ar = fit_alpha_beta(cal, "all_reduce")
    rows = []
    for config, m in by.items():
        world, threads, mode = int(m["seconds_per_iteration"]["world"]), int(m["seconds_per_iteration"][
            "threads_per_process"]), m["seconds_per_iteration"]["mode"]
        key = f"{'both' if world > 1 else 'alone'}_threads{threads}"
        gemm = cal[f"{key}:gemm_flops_per_s"]
        c3 = cal[f"{key}:chol_inverse_s_per_n3"]
        batch = int(float(m["batch"]["value"])) // world
        ev = evaluate(layers, world, mode=mode, params=params, batch=batch, tau1=1 / 8, T_f=1, T3=20, w=4, gemm=gemm,
                      t_inv=lambda n: c3 * n ** 3, alpha=ar[0], beta=ar[1], factorization="cholesky")
        ph = {k: float(v["value"]) for k, v in ((k[len("phase_s:"):], v) for k, v in m.items()
                                                  if k.startswith("phase_s:"))}
        meas = {
            "forward_backward": ph.get("forward_backward", 0.0),
            "statistics": ph.get("statistics", 0.0),
            "factor_update": ph.get("factor_update", 0.0),
            "refresh": ph.get("refresh_compute", 0.0),
            "apply": ph.get("apply_compute", 0.0),
            "communication (incl. waits)": sum(ph.get(k, 0.0) for k in ("gradient_start", "gradient_wait", "scalars",
                                                                         "factor_start", "factor_wait",
                                                                         "refresh_comm", "apply_comm")),
            "write + optimizer (not modelled)": ph.get("write", 0.0) + ph.get("optimizer", 0.0),
        }
        s = ev["seconds"]
        pred = {
            "forward_backward": s["forward_backward"], "statistics": s["statistics"],
            "factor_update": s["factor_update"], "refresh": s["refresh"], "apply": s["apply"],
            "communication (incl. waits)": sum(v for k, v in s.items() if k.startswith("comm_")),
            "write + optimizer (not modelled)": 0.0,
        }
        for k in meas:
            rows.append(dict(config=config, phase=k, measured_s=meas[k], model_s=pred[k],
                             model_over_measured=(pred[k] / meas[k]) if meas[k] > 0 else None))
        tot_m = float(m["seconds_per_iteration"]["value"])
        tot_p = sum(pred.values())
        rows.append(dict(config=config, phase="iteration (wall)", measured_s=tot_m, model_s=tot_p,
                         model_over_measured=tot_p / tot_m))
        for kind in ("gradient", "factors", "inverses", "directions", "scalars"):
            mb = float(m[f"wire_bytes_sent:{kind}"]["value"])
            rows.append(dict(config=config, phase=f"bytes sent: {kind}", measured_s=mb, model_s=ev["bytes"][kind],
                             model_over_measured=(ev["bytes"][kind] / mb) if mb > 0 else None))
    return rows


# ---------------------------------------------------------------------------- main
def cluster_rows() -> list[dict]:
    c = CLUSTER
    rows = []
    for model, spec in MODELS.items():
        t_inv = ((lambda n: c["eigh_t0_s"] + c["eigh_s_per_n3"] * n ** 3) if spec["factorization"] == "eigh" else
                 (lambda n: c["chol_t0_s"] + c["chol_s_per_n3"] * n ** 3))
        for p in RANKS:
            for mode in ("replicate_inverses", "shard_inverses"):
                ev = evaluate(spec["layers"], p, mode=mode, params=spec["params"], batch=spec["batch"],
                              tau1=spec["tau1"], T_f=spec["T_f"], T3=spec["T3"], w=4, gemm=c["gemm_flops_per_s"],
                              t_inv=t_inv, alpha=c["alpha_s"], beta=c["beta_s_per_byte"],
                              factorization=spec["factorization"],
                              fb_s=spec["fb_s_per_example"] * spec["batch"], stats_pass="hooks")
                s = ev["seconds"]
                sgd = s["forward_backward"] + s["comm_gradient"]
                kfac = sum(s.values())
                # the gradient all-reduce hidden behind the backward in both (DDP's overlap)
                sgd_ov = max(s["forward_backward"], s["comm_gradient"])
                kfac_ov = kfac - sgd + sgd_ov
                rows.append(dict(
                    model=model, ranks=p, mode=mode, settings=spec["settings"],
                    iteration_s=kfac, sgd_iteration_s=sgd, kfac_over_sgd=kfac / sgd,
                    kfac_over_sgd_overlapped=kfac_ov / sgd_ov,
                    refresh_s_per_rank=ev["refresh_s_per_rank"], largest_block_refresh_s=ev["largest_block_s"],
                    busy_ranks=ev["busy_ranks"], directions_by=ev["directions_by"],
                    inverse_MiB_per_rank=ev["inverse_bytes_per_rank"] / 2 ** 20,
                    **{f"MB_sent_{k}": v / 1e6 for k, v in ev["bytes"].items()},
                    MB_sent_total=sum(ev["bytes"].values()) / 1e6,
                    **{f"s_{k}": v for k, v in s.items()},
                    assumed="V100 fp32 + 100 Gb/s IB: " + ", ".join(f"{k}={v:g}" for k, v in c.items()),
                ))
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    style = {"replicate_inverses": "-", "shard_inverses": "--"}
    colors = {"ResNet-50": "C0", "GPT-2-small": "C1"}
    for model in MODELS:
        for mode in style:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            ps = [r["ranks"] for r in rs]
            lab = f"{model}, {mode}"
            extra = [r["MB_sent_total"] - r["MB_sent_gradient"] for r in rs]
            ax[0, 0].plot(ps, extra, style[mode], color=colors[model], marker="o", label=lab)
            ax[0, 1].plot(ps, [r["refresh_s_per_rank"] for r in rs], style[mode], color=colors[model], marker="o",
                          label=lab if mode == "replicate_inverses" else None)
            ax[1, 0].plot(ps, [r["kfac_over_sgd"] for r in rs], style[mode], color=colors[model], marker="o", label=lab)
            ax[1, 1].plot(ps, [r["inverse_MiB_per_rank"] for r in rs], style[mode], color=colors[model], marker="o",
                          label=lab)
        grad = [r["MB_sent_gradient"] for r in rows if r["model"] == model and r["mode"] == "shard_inverses"]
        ax[0, 0].plot(RANKS, grad, ":", color=colors[model], label=f"{model}: gradient all-reduce (SGD's too)")
        floor = [r["largest_block_refresh_s"] for r in rows if r["model"] == model and r["mode"] == "shard_inverses"]
        ax[0, 1].plot(RANKS, floor, ":", color=colors[model], label=f"{model}: largest block alone")
    ax[1, 0].fill_between(KAISA_RANKS, *KAISA_RATIO, color="gray", alpha=0.3,
                          label="KAISA published, ResNet-50, 16-64 V100")
    titles = ["MB sent per rank per iteration: K-FAC's own (factors, inverses, directions)",
              "refresh time per rank (s, per refresh; both modes: same owners)",
              "K-FAC / SGD iteration time (no overlap)", "inverse memory per rank (MiB)"]
    for a, t in zip(ax.flat, titles):
        a.set_xscale("log", base=2)
        a.set_xlabel("ranks")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax[0, 0].set_yscale("log")
    ax[0, 1].set_yscale("log")
    ax[1, 1].set_yscale("log")
    fig.suptitle("Data-parallel K-FAC cost model (modelled, assumed V100 + 100 Gb/s IB constants; "
                 "validated on a 2-core CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from _common import machine_info, print_table, write_csv

    cal_rows = read_csv("distributed_cpu_calibration")
    cal = {r["what"]: float(r["value"]) for r in cal_rows}
    measured = read_csv("distributed_cpu")
    info = machine_info()
    c0 = cal_rows[0]
    info["measured_on"] = (f"{c0.get('cpu')} ({c0.get('date')}, load {c0.get('loadavg_before')} .. "
                           f"{c0.get('loadavg_after')})")
    a, b = fit_alpha_beta(cal, "all_reduce")
    print(f"gloo all-reduce on this machine: alpha {a * 1e6:.0f} us, {1 / b / 1e9:.2f} GB/s")
    val = validate(measured, cal)
    print_table(val, ["config", "phase", "measured_s", "model_s", "model_over_measured"])
    write_csv("cost_model_validation", val, dict(info, gloo_alpha_s=a, gloo_GB_per_s=1 / b / 1e9))
    rows = cluster_rows()
    print()
    print_table(rows, ["model", "ranks", "mode", "iteration_s", "kfac_over_sgd", "kfac_over_sgd_overlapped",
                       "refresh_s_per_rank", "busy_ranks", "inverse_MiB_per_rank", "MB_sent_gradient",
                       "MB_sent_factors", "MB_sent_inverses", "MB_sent_directions"])
    write_csv("cost_model_distributed", rows, info)
    png = os.path.join(RESULTS, "cost_model_distributed.png")
    plot(rows, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
