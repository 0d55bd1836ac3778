"""How much memory does the Conv2d factor-A update need, with and without the im2col patch matrix?

The layer set is every conv of ResNet-18 at 224x224 input (torchvision layout, 20 layers):
the 7x7/2 stem on 3 channels at 224, the 3x3 convs on 64@56, 128@28, 256@14, 512@7 (with
the stride-2 first convs of stages 2-4) and the three 1x1/2 downsample convs; float32
inputs and factors, no bias (``homogeneous=False``, as in ResNet; ``--homogeneous`` adds it).

Variants, each measured in a fresh subprocess (one update of all layers):

``ref``     :func:`conv_factor_update_ref`: full ``F.unfold`` per layer, then ``addmm``.
``torch``   ``conv_factor_update(backend="torch")``: chunked unfold (4 MiB chunks).
``triton``  ``conv_factor_update(backend="triton")`` in the Triton *interpreter* on CPU
            (``TRITON_INTERPRET=1``), tiles of 256 to keep the interpreted program count
            down. The interpreter is slow, so it runs at ``--triton-batch`` (default 1).

Memory is reported two ways: ``peak_rss_MiB``, the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs just before the update) over its resident set
before it, which sees every allocation (numpy temporaries of the interpreter included);
and ``alloc_peak_MiB``, the high-water mark of live bytes in PyTorch's CPU allocator from
``torch.profiler`` (profile_memory=True), which sees only tensors. ``patch_max_MiB`` is the
analytic size of the largest layer's patch matrix (m·R·C·kh·kw·4 bytes), i.e. what any
full-unfold implementation must hold at least once.

Timing (``--time-batch``, default 32): ref and chunked torch alternate in one process,
median of ``--repeats``.

    PYTHONPATH=python python benchmarks/bench_conv_memory.py   → results/conv_factor_memory_cpu.csv
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

# (name, C_in, input H = W, kernel, stride, padding)
RESNET18 = (
    [("conv1", 3, 224, 7, 2, 3)]
    + [(f"layer1.{b}.conv{c}", 64, 56, 3, 1, 1) for b in (0, 1) for c in (1, 2)]
    + [item for s, (cin, hw) in enumerate([(64, 56), (128, 28), (256, 14)], start=2) for item in (
        (f"layer{s}.0.conv1", cin, hw, 3, 2, 1),
        (f"layer{s}.0.downsample", cin, hw, 1, 2, 0),
        (f"layer{s}.0.conv2", 2 * cin, hw // 2, 3, 1, 1),
        (f"layer{s}.1.conv1", 2 * cin, hw // 2, 3, 1, 1),
        (f"layer{s}.1.conv2", 2 * cin, hw // 2, 3, 1, 1))]
)

MiB = 2 ** 20


def _out(hw, k, s, p):
    return (hw + 2 * p - k) // s + 1


def patch_bytes(batch: int, homogeneous: bool) -> list[int]:
    return [batch * _out(hw, k, s, p) ** 2 * (c * k * k + int(homogeneous)) * 4 for _, c, hw, k, s, p in RESNET18]


# ---------------------------------------------------------------------------------------
# Workers (run in a fresh subprocess each)
# ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _setup(batch: int, homogeneous: bool):
    import torch

    torch.manual_seed(0)
    xs, Fs = [], []
    for _, c, hw, k, s, p in RESNET18:
        xs.append(torch.empty(batch, c, hw, hw).normal_())  # filled in place: no temporaries
        n = c * k * k + int(homogeneous)
        Fs.append(torch.zeros(n, n))
    geo = dict(kernel_size=[k for *_, k, s, p in RESNET18], stride=[s for *_, s, p in RESNET18],
               padding=[p for *_, p in RESNET18], dilation=1)
    scale = [1.0 / (batch * _out(hw, k, s, p) ** 2) for _, c, hw, k, s, p in RESNET18]
    return xs, Fs, geo, scale


def _run(variant: str, xs, Fs, geo, scale, homogeneous: bool) -> None:
    from kfac_fast.ops import conv_factor_update, conv_factor_update_ref
    from kfac_fast.ops.conv_factor import config_override

    if variant == "ref":
        conv_factor_update_ref(Fs, xs, **geo, eps=0.95, scale=scale, homogeneous=homogeneous)
    elif variant == "torch":
        conv_factor_update(Fs, xs, **geo, eps=0.95, scale=scale, homogeneous=homogeneous, backend="torch")
    elif variant == "triton":
        with config_override(dict(BLOCK=256, BLOCK_K=256, num_warps=4, num_stages=1)):
            conv_factor_update(Fs, xs, **geo, eps=0.95, scale=scale, homogeneous=homogeneous, backend="triton")
    else:
        raise ValueError(variant)


def worker_memory(variant: str, batch: int, homogeneous: bool, threads: int) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    import kfac_fast
    from kfac_fast.backends import triton_interpret

    assert os.path.realpath(kfac_fast.__file__).startswith(os.path.realpath(ROOT)), kfac_fast.__file__
    if variant == "triton":
        assert triton_interpret(), "the triton variant runs the interpreter: TRITON_INTERPRET=1"
    xs, Fs, geo, scale = _setup(batch, homogeneous)
    # Warm-up on tiny layers with every (kernel, stride, padding) of the set, under the
    # profiler: code pages, BLAS and profiler buffers, the interpreter's parse are then
    # resident before the measurement and do not count as the update's memory.
    kinds = sorted({(k, s, p) for *_, k, s, p in RESNET18})
    tiny_x = [torch.randn(1, 2, 9, 9) for _ in kinds]
    tiny_F = [torch.zeros(2 * k * k + int(homogeneous), 2 * k * k + int(homogeneous)) for k, _, _ in kinds]
    tiny_geo = dict(kernel_size=[k for k, _, _ in kinds], stride=[s for _, s, _ in kinds],
                    padding=[p for _, _, p in kinds], dilation=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):
        _run(variant, tiny_x, tiny_F, tiny_geo, [1.0] * len(kinds), homogeneous)
    del tiny_x, tiny_F
    gc.collect()
    rss0 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _run(variant, xs, Fs, geo, scale, homogeneous)
    wall = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    # Live-byte high-water mark of the tensor allocator from the profiler's memory events.
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nb in mem:
        live += nb
        peak = max(peak, live)
    finite = all(bool(torch.isfinite(F).all()) for F in Fs)
    checksum = float(sum(F.double().sum() for F in Fs))
    return dict(peak_rss_MiB=(hwm - rss0) / 1024, alloc_peak_MiB=peak / MiB, rss_before_MiB=rss0 / 1024,
                wall_s=wall, finite=finite, checksum=checksum)


def worker_time(batch: int, homogeneous: bool, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    xs, Fs, geo, scale = _setup(batch, homogeneous)
    small = [x[:1] for x in xs]
    for v in ("ref", "torch"):  # warm-up on one example
        _run(v, small, Fs, geo, [1.0] * len(Fs), homogeneous)
    times = {"ref": [], "torch": []}
    for _ in range(repeats):
        for v in ("ref", "torch"):
            t0 = time.perf_counter()
            _run(v, xs, Fs, geo, scale, homogeneous)
            times[v].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="batch of the ref / torch memory runs")
    ap.add_argument("--triton-batch", type=int, default=1, help="batch of the interpreted Triton run "
                    "(the ref and torch runs are repeated at it for comparison); 0 skips Triton")
    ap.add_argument("--time-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--homogeneous", action="store_true")
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="conv_factor_memory_cpu")
    a = ap.parse_args()

    if a.worker == "memory":
        print(json.dumps(worker_memory(a.variant, a.batch, a.homogeneous, a.threads)))
        return
    if a.worker == "time":
        print(json.dumps(worker_time(a.batch, a.homogeneous, a.threads, a.repeats)))
        return

    sys.path.insert(0, HERE)
    import torch

    torch.set_num_threads(a.threads)
    from _common import machine_info, print_table, write_csv

    info = machine_info()
    common = ["--threads", str(a.threads)] + (["--homogeneous"] if a.homogeneous else [])
    rows = []
    runs = [(a.batch, v) for v in ("ref", "torch")]
    if a.triton_batch:
        runs += [(a.triton_batch, v) for v in ("ref", "torch", "triton")]
    for batch, variant in runs:
        print(f"memory: {variant} at batch {batch} ...", flush=True)
        r = _subprocess(["--worker", "memory", "--variant", variant, "--batch", str(batch)] + common)
        pb = patch_bytes(batch, a.homogeneous)
        rows.append(dict(kind="memory", variant=variant, batch=batch, layers=len(RESNET18),
                         peak_rss_MiB=round(r["peak_rss_MiB"], 1), alloc_peak_MiB=round(r["alloc_peak_MiB"], 1),
                         patch_max_MiB=round(max(pb) / MiB, 1), patch_total_MiB=round(sum(pb) / MiB, 1),
                         rss_before_MiB=round(r["rss_before_MiB"], 1), wall_s=round(r["wall_s"], 2),
                         finite=r["finite"], checksum=r["checksum"],
                         note="Triton interpreter on CPU, BLOCK 256" if variant == "triton" else ""))
    for r in rows:
        base = next(b for b in rows if b["variant"] == "ref" and b["batch"] == r["batch"])
        r["rss_vs_ref"] = round(r["peak_rss_MiB"] / base["peak_rss_MiB"], 4)
        r["alloc_vs_ref"] = round(r["alloc_peak_MiB"] / base["alloc_peak_MiB"], 4)
        r["rss_vs_patch_max"] = round(r["peak_rss_MiB"] / r["patch_max_MiB"], 4)
    print_table(rows, ["variant", "batch", "peak_rss_MiB", "alloc_peak_MiB", "patch_max_MiB", "rss_vs_ref",
                       "alloc_vs_ref", "rss_vs_patch_max", "wall_s", "checksum"])

    if a.repeats:
        print(f"time: ref vs torch at batch {a.time_batch}, {a.repeats} interleaved repeats ...", flush=True)
        t = _subprocess(["--worker", "time", "--batch", str(a.time_batch), "--repeats", str(a.repeats)] + common)
        trows = []
        for v in ("ref", "torch"):
            trows.append(dict(kind="time", variant=v, batch=a.time_batch, layers=len(RESNET18),
                              median_s=round(statistics.median(t[v]), 3), min_s=round(min(t[v]), 3),
                              max_s=round(max(t[v]), 3), repeats=len(t[v])))
        for r in trows:
            r["speedup_vs_ref"] = round(trows[0]["median_s"] / r["median_s"], 3)
        print_table(trows, ["variant", "batch", "median_s", "min_s", "max_s", "repeats", "speedup_vs_ref"])
        rows += trows
    write_csv(a.out, rows, info)


if __name__ == "__main__":
    main()
