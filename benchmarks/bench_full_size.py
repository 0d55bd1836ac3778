"""K-FAC on full-size models as users take them from Hugging Face transformers and timm: does
it construct and step, what state it keeps, and what its first and later steps cost against the
base optimizer's.

    python benchmarks/bench_full_size.py [--models gpt2,llama32k,resnet50,vit_small] [--steps 11]

Models (random init, real layer sizes): GPT-2 small (124M, vocab 50257, tied embedding/head);
a Llama with 4 layers of width 512 and Llama-2's vocabulary of 32000 (untied head); timm
resnet50 and vit_small_patch16_224 at 224×224. Each runs in its own process (a model that
exhausts memory or time is reported, not fatal), 1 thread unless --threads.

Per model and entry point (AdamW alone; ``KFACPreconditioner`` attached to AdamW, capture
"pass"; ``KFAC``): seconds of step 1, 2, 3 and the median and mean of the later steps (with the
preconditioner's default ``Tf=10`` the mean over steps 4-11 holds one statistics step), peak resident
memory of the process, K-FAC state (``memory_report``) against the parameters, the Kronecker
fraction of ``coverage()``. Writes results/full_size_cpu.csv with machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("gpt2", "llama32k", "resnet50", "vit_small")
METHODS = ("adamw", "preconditioner", "kfac")


def _build(name: str):
    """(model, inputs, targets, targets_fn) for ``name``; targets_fn maps the model output's
    logits shape to the loss's targets."""
    g = torch.Generator().manual_seed(0)
    if name in ("gpt2", "llama32k"):
        import transformers
        if name == "gpt2":
            cfg = transformers.GPT2Config()  # 124M: 12 layers, width 768, vocab 50257, tied
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                           max_position_embeddings=256, tie_word_embeddings=False)
            model = transformers.LlamaForCausalLM(cfg)
        V = cfg.vocab_size
        ids = torch.randint(0, V, (4, 128), generator=g)
        from kfac_fast import causal_lm_targets
        return model, ids, causal_lm_targets(ids)
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import _torchvision_placeholder  # noqa: F401  (timm imports torchvision; the index's is a CUDA build)
    _torchvision_placeholder.install()
    import timm
    model = timm.create_model("resnet50" if name == "resnet50" else "vit_small_patch16_224", num_classes=1000)
    x = torch.randn(8, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (8,), generator=g)
    return model, x, y


def _child(name: str, method: str, steps: int, threads: int) -> dict:
    import warnings
    torch.set_num_threads(threads)
    import kfac_fast
    torch.manual_seed(0)
    model, x, y = _build(name)
    model.train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"model": name, "method": method, "params_M": round(params / 1e6, 2)}
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)

    def logits():
        out = model(x)
        return out.logits if hasattr(out, "logits") else out

    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        if method == "kfac":
            opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
            pre = opt
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            pre = None
            if method == "preconditioner":
                pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture="pass")
                pre.attach(opt)
        row["construct_s"] = round(time.perf_counter() - t0, 3)
        for _ in range(steps):
            t0 = time.perf_counter()
            if method == "kfac":
                opt.step(x, y)
            else:
                opt.zero_grad(set_to_none=True)
                z = logits()
                loss = loss_fn(z.reshape(-1, z.shape[-1]), y.reshape(-1))
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - t0)
    row.update({f"step{i + 1}_s": round(t, 3) for i, t in enumerate(times[:3])})
    row["later_median_s"] = round(statistics.median(times[3:]), 3) if len(times) > 3 else None
    row["later_mean_s"] = round(statistics.mean(times[3:]), 3) if len(times) > 3 else None
    row["peak_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if pre is not None:
        cov = pre.coverage()
        mem = pre.memory_report()
        row["kronecker_fraction"] = round(cov.kronecker_fraction, 4)
        state = sum(v for k, v in mem.items() if k != "params" and isinstance(v, (int, float)))
        row["state_over_params"] = round(state / max(mem.get("params", 1), 1), 2)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"))
    args = p.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(_child(*args.child, args.steps, args.threads)))
        return
    sys.path.insert(0, HERE)
    from _common import machine_info, print_table, write_csv
    rows = []
    for name in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", name, method, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
                if line:
                    row = json.loads(line[-1][4:])
                else:
                    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"model": name, "method": method, "error": err[:300]}
            except subprocess.TimeoutExpired:
                row = {"model": name, "method": method, "error": f"timed out after {args.timeout} s"}
            print(row, flush=True)
            rows.append(row)
    cols = ["model", "method", "params_M", "construct_s", "step1_s", "step2_s", "step3_s", "later_median_s", "later_mean_s",
            "peak_rss_GB", "kronecker_fraction", "state_over_params", "error"]
    print_table(rows, cols)
    info = machine_info()
    info["threads"] = args.threads
    print(write_csv("full_size_cpu", rows, info))


if __name__ == "__main__":
    main()
