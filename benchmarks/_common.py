"""Shared benchmark utilities: timing (warm-up, median of repeats), machine/version
record, a printed table and long-format CSV under benchmarks/results/.

Every benchmark answers one question and reports each candidate as a ratio to its
plain-PyTorch baseline.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0) -> dict:
    """Median/min/max wall time of ``fn()`` in seconds after ``warmup`` calls.

    On CUDA the device is synchronised around every call (times include the kernels).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_total = 0.0
    while len(times) < repeats or t_total < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        t_total += dt
        if len(times) > 10 * repeats:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def machine_info(device="cpu") -> dict:
    """Machine, versions and date recorded with every CSV row."""
    info = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "none"
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import kfac_fast

        info["kfac_fast_native"] = kfac_fast.build_info().get("cuda", "none")
    except Exception:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_csv(name: str, rows: Iterable[dict], info: dict, *, out_dir: str = RESULTS_DIR) -> str:
    """Append-free write of ``rows`` (each merged with ``info``) to <out_dir>/<name>.csv
    (default results/)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [dict(r, **info) for r in rows]
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    path = os.path.join(out_dir, f"{name}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return path
