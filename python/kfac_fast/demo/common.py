"""What every demo shares: a pausable wall clock (evaluation is not charged to a method), a
progress bar and the machine description written beside every measured curve."""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time

import torch


class Clock:
    """Wall clock that can be paused (evaluation is not charged to the method)."""

    def __init__(self):
        self.elapsed = 0.0
        self._t = None

    def start(self):
        self._t = time.perf_counter()

    def pause(self):
        self.elapsed += time.perf_counter() - self._t
        self._t = None


def progress(total: float, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=round(total), desc=desc, unit="s", file=sys.stdout, leave=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s {postfix}")
    except ImportError:  # pragma: no cover
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str) -> dict:
    """Where and when the curves were measured: appended to every CSV row (after the data columns)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": f"{_cpu_model()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": f"{device} ({name})" if dev.type == "cuda" else str(dev),
    }
