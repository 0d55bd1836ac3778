"""Launch a test worker script on two gloo processes and read back each rank's saved results
(``<out>/rank<r>.pt``): the one launcher the data-parallel tests share."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, out, *, timeout: float, world: int = 2) -> list:
    """Run ``tests/<worker>`` as ranks 0..world-1 (args: rank, world, port, out), one intra-op
    thread each; fail with the rank's log on a non-zero exit or after ``timeout`` seconds."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(HERE), "python"),
                                           os.environ.get("PYTHONPATH", "")]))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), str(r), str(world), port, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {world}-process gloo worker {worker} timed out ({timeout:.0f} s)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(os.path.join(str(out), f"rank{r}.pt"), weights_only=False) for r in range(world)]
