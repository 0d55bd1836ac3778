"""A fixed-length K-FAC trajectory compared with numbers committed in the repository
(tests/data/autoencoder_trajectory.json): the quick stand-in for the 2000-iteration soak.

Algorithm 2 with the default configuration (momentum, λ by the LM rule every iteration, γ by
the greedy rule every T2, inverse refreshes every T3, step rejection by ρ) trains a small
float64 autoencoder with sigmoid cross-entropy for 120 iterations on closed-form data (no
dataset package, no RNG for the data; the model's initial weights and K-FAC's subsets and
sampled targets come from seeded torch generators). Every iteration's loss, λ, γ and rejection
must match the committed ones: to 1e-7 relative (float64 round-off from a different BLAS or
thread count stays orders of magnitude below; any change to what the step computes — a rule,
a factor, a damping, the sampling — moves them far more), and the rejections exactly.

After an intended change of behaviour, regenerate the numbers (and say why in the commit):

    PYTHONPATH=python python tests/test_trajectory_regression.py --write
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import torch
from torch import nn

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "autoencoder_trajectory.json")
ITERS = 120
ROWS, BATCH, DIMS = 512, 64, (24, 16, 6, 16, 24)
RTOL = 1e-7


def _data() -> torch.Tensor:
    """(ROWS, 24) intensities in (0, 1): smooth "strokes" with a per-row frequency and phase."""
    n = torch.arange(ROWS, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(DIMS[0], dtype=torch.float64).unsqueeze(0)
    freq = 0.15 + 0.35 * torch.frac(n * 0.6180339887498949)
    phase = 6.283185307179586 * torch.frac(n * 0.4142135623730951)
    return 0.5 + 0.45 * torch.sin(freq * j + phase) * torch.cos(0.3 * j * torch.frac(n * 0.7320508075688772))


def _model() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=torch.float64) / math.sqrt(a))
            lin.bias.zero_()
        layers.append(lin)
        if i < len(DIMS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def run(backend: str = "auto") -> dict:
    from kfac_fast import KFAC

    torch.manual_seed(0)
    X = _data()
    model = _model()
    opt = KFAC(model, loss="sigmoid_cross_entropy", backend=backend, generator=torch.Generator().manual_seed(0))
    out = {"loss": [], "lambda": [], "gamma": [], "rejected": []}
    for k in range(ITERS):
        rows = torch.arange(k * BATCH, (k + 1) * BATCH) % ROWS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = opt.step(X[rows], X[rows])
        out["loss"].append(float(s["loss"]))
        out["lambda"].append(float(s["lambda_"]))
        out["gamma"].append(float(s["gamma"]))
        out["rejected"].append(bool(s["rejected"]))
    return out


def test_trajectory_matches_the_committed_numbers():
    with open(DATA) as f:
        want = json.load(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and a loaded machine hurts it least
    try:
        got = run()
    finally:
        torch.set_num_threads(threads)
    assert len(want["loss"]) == ITERS
    for key in ("loss", "lambda", "gamma"):
        for k, (a, b) in enumerate(zip(got[key], want[key])):
            assert abs(a - b) <= RTOL * abs(b), f"{key} at iteration {k + 1}: {a!r}, committed {b!r}"
    assert got["rejected"] == want["rejected"]
    # the run trains (a trajectory that never moved would make the comparison weak)
    assert want["loss"][-1] < 0.9 * want["loss"][0]


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = run()
    if "--write" in sys.argv:
        with open(DATA, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    print(f"loss {res['loss'][0]:.6f} -> {res['loss'][-1]:.6f}, λ {res['lambda'][-1]:.3g}, γ {res['gamma'][-1]:.3g}, "
          f"{sum(res['rejected'])} rejected")
