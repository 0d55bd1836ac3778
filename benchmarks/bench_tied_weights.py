"""Tied weights on the tiny random GPT2LMHeadModel of tests/test_integrations.py: the
Kronecker-sum block of the shared wte/lm_head weight (curvature/blocks/tied.py) against the
fallback any other sharing gets (the weight refused by both blocks: a diagonal block under
``unsupported="diagonal"``, left to the outer optimizer under KFACPreconditioner's default "skip").

    python benchmarks/bench_tied_weights.py [--rounds 5] [--iters 10]

Per variant: the Kronecker coverage; the time of one KFACPreconditioner training iteration
(forward, backward, ``pre.step``, AdamW; capture "pass", fisher "empirical"; median over
interleaved rounds, 1 thread; the mean includes the inverse refreshes every T3 = 20 steps); and
the loss after 20 steps of KFAC and of KFACPreconditioner + AdamW (lr 1e-3), as
tests/test_integrations.py trains them (and KFAC's on the same GPT-2 untied). Then, on a 1-layer
float64 GPT-2 (V = 32, d = 16) with the exact Fisher of the shared weight, how close each
approximation's damped direction is to the exact natural gradient (results/tied_weights_exact_cpu.csv). The fallback is today's code with the tied pair
(the default ``tied_weights="unsupported"``), in the same process. Writes
results/tied_weights_cpu.csv with machine and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import kfac_fast  # noqa: E402
from _common import machine_info, print_table, write_csv  # noqa: E402
import test_integrations as T  # noqa: E402

VARIANTS = {"kronecker_sum": {"tied_weights": "kronecker_sum"}, "fallback_skip": {"unsupported": "skip"},
            "fallback_diagonal": {"unsupported": "diagonal"}}


def _patched(variant: str):
    """No patch: ``tied_weights=`` selects the pair (kept so the call sites read as before)."""
    return contextlib.nullcontext()


def _preconditioner(variant):
    torch.manual_seed(0)
    model = T._gpt2()
    with _patched(variant), warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture="pass", fisher="empirical",
                                           **VARIANTS[variant])
    return model, pre, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _iteration(model, pre, opt, x, y) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(**x).logits.flatten(0, -2), y.flatten(), ignore_index=-100)
    loss.backward()
    pre.step(x, y)
    opt.step()
    return loss.item()


def _exact_comparison() -> list[dict]:
    """On a 1-layer float64 GPT-2 (V = 32, d = 16, dropout off): the exact Fisher of the shared
    W from the output Jacobian, and per damping λ the cosine of each approximation's direction
    (F_approx + λI)⁻¹∇ with the exact (F + λI)⁻¹∇, and uᵀFu / uᵀF_approx u along it."""
    import transformers
    from kfac_fast.curvature.batch_factors import block_factors

    torch.manual_seed(0)
    V, d, m, T = 32, 16, 4, 8
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=d, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, V, (m, T))
    y = ids.roll(-1, 1)

    def logits(W):
        return torch.func.functional_call(model, {"lm_head.weight": W}, (ids,), strict=False).logits

    W = model.lm_head.weight.detach().clone()
    J = torch.autograd.functional.jacobian(logits, W).reshape(m * T, V, V * d)
    P = logits(W).detach().softmax(-1).reshape(m * T, V)
    H = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    Fx = torch.einsum("nai,nab,nbj->ij", J, H, J) / (m * T)
    Wl = W.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(logits(Wl).reshape(-1, V), y.reshape(-1)), Wl)
    g = g.reshape(-1)
    recs = block_factors(model, {"input_ids": ids}, "softmax_cross_entropy", fisher="exact")
    head = next(r for r in recs if r.name.endswith("lm_head"))
    emb = next(r for r in recs if r.name.endswith("wte"))
    approx = {"kronecker_sum": torch.kron(head.G, head.A) + torch.kron(torch.diag(emb.A), emb.G),
              "head_kronecker_only": torch.kron(head.G, head.A), "exact_diagonal": torch.diag(Fx.diagonal())}
    rows = []
    eye = torch.eye(V * d, dtype=torch.float64)
    for lam in (1e-1, 1e-2, 1e-3):
        ref = torch.linalg.solve(Fx + lam * eye, g)
        for name, M in approx.items():
            u = torch.linalg.solve(M + lam * eye, g)
            rows.append({"approximation": name, "damping": lam, "cos_with_exact": float(u @ ref / u.norm() / ref.norm()),
                         "uFu_over_uMu": float(u @ Fx @ u / (u @ M @ u))})
    return rows


def _untied_kfac_losses(x, y) -> list[float]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    kfac = kfac_fast.KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    return [float(kfac.step(x, y)["loss"]) for _ in range(20)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = T._lm_batch()
    rows = {v: {"variant": v} for v in VARIANTS}
    runs = {}
    for v in VARIANTS:
        model, pre, opt = _preconditioner(v)
        rows[v]["kronecker_fraction"] = pre.coverage().kronecker_fraction
        rows[v]["pre_loss_0"] = _iteration(model, pre, opt, x, y)  # warm-up: first steps refresh
        runs[v] = (model, pre, opt)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):  # interleaved
        for v in VARIANTS:
            for _ in range(args.iters):
                t0 = time.perf_counter()
                _iteration(*runs[v], x, y)
                times[v].append(time.perf_counter() - t0)
    for v in VARIANTS:
        rows[v]["pre_iter_median_ms"] = 1e3 * statistics.median(times[v])
        rows[v]["pre_iter_mean_ms"] = 1e3 * statistics.fmean(times[v])
        # the 20-step losses from a fresh model, as the integration tests train
        model, pre, opt = _preconditioner(v)
        losses = [_iteration(model, pre, opt, x, y) for _ in range(20)]
        rows[v]["pre_adamw_loss_1"], rows[v]["pre_adamw_loss_20"] = losses[0], losses[-1]
        torch.manual_seed(0)
        model = T._gpt2()
        with _patched(v), warnings.catch_warnings():
            warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
            kw = {} if v == "fallback_skip" else VARIANTS[v]  # KFAC's default is unsupported="diagonal"
            kfac = kfac_fast.KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0),
                                  **kw)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = [float(kfac.step(x, y)["loss"]) for _ in range(20)]
        rows[v]["kfac_loss_1"], rows[v]["kfac_loss_20"] = losses[0], losses[-1]
        # how far 20 KFAC steps moved the shared weight and everything else
        moved = {n: float((p.detach() - w0[n]).pow(2).sum()) for n, p in model.named_parameters()}
        rows[v]["kfac_dW_norm"] = moved.pop("transformer.wte.weight") ** 0.5
        rows[v]["kfac_d_others_norm"] = sum(moved.values()) ** 0.5
    out = [rows[v] for v in VARIANTS]
    cols = ["variant", "kronecker_fraction", "pre_iter_median_ms", "pre_iter_mean_ms", "pre_adamw_loss_1",
            "pre_adamw_loss_20", "kfac_loss_1", "kfac_loss_20", "kfac_dW_norm", "kfac_d_others_norm"]
    print_table(out, cols)
    info = machine_info()
    info["load_1min"] = os.getloadavg()[0]
    write_csv("tied_weights_cpu", out, info)
    untied = _untied_kfac_losses(x, y)
    print(f"untied GPT-2 (tie_word_embeddings=False), KFAC loss step 1 -> 20: {untied[0]:.4g} -> {untied[-1]:.4g}")
    exact = _exact_comparison()
    exact.append({"approximation": "untied_gpt2_kfac_loss_20", "damping": None, "cos_with_exact": None,
                  "uFu_over_uMu": untied[-1]})
    print_table(exact, ["approximation", "damping", "cos_with_exact", "uFu_over_uMu"])
    write_csv("tied_weights_exact_cpu", exact, info)


if __name__ == "__main__":
    main()
