"""Why does the eval-mode loss of a BatchNorm network rise while its training-mode loss falls?

On the race's ResNet (BatchNorm2d, batch 128) every 10 iterations: the training-mode batch loss,
the eval-mode loss on 1,000 random training images with the running statistics, the same with
statistics recomputed for the current weights (reset, then a cumulative average over 8 batches:
"recalibrated"), and the norm of one conv weight feeding a BatchNorm. A gap between "eval" and
"recalibrated" is the running statistics lagging behind the weights.

    PYTHONPATH=python python benchmarks/bn_running_stats.py
    PYTHONPATH=python python benchmarks/bn_running_stats.py --causes

Writes benchmarks/results/bn_running_stats_cpu.csv. ``--causes`` runs the preconditioner with KL
clip at SGD lr 0.1 (the largest gap above) four ways, each at Tf = 1: as is; with BatchNorm's
weight and bias left out of the preconditioner (their raw gradients restored after ``pre.step``);
with BatchNorm momentum 0.5 instead of 0.1 (running statistics with a memory of ~2 steps rather than
~10); and without SGD's momentum. It writes bn_running_stats_causes_cpu.csv.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_csv  # noqa: E402
from race_tasks import load_mnist_images, small_resnet  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.step_size import Graft, KLClip  # noqa: E402

RUNS = (("SGD", "plain", 0.03), ("SGD", "plain", 0.1), ("SGD", "plain", 0.3),
        ("KFACPreconditioner+SGD", None, 1e-3), ("KFACPreconditioner+SGD", "graft", 0.1),
        ("KFACPreconditioner+SGD", "kl", 0.1))


CAUSES = (("as is", {}), ("BN affine not preconditioned", dict(raw_bn=True)),
          ("BN momentum 0.5", dict(bn_momentum=0.5)), ("SGD without momentum", dict(sgd_momentum=0.0)))


def main(iters: int = 40, causes: bool = False):
    torch.set_num_threads(1)
    X, Y, _ = load_mnist_images()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(5))
    Xe, Ye = X[perm[-1000:]], Y[perm[-1000:]]

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(m(Xe), Ye))
        m.train()
        return loss

    def recalibrated(m):
        c = copy.deepcopy(m)
        for mod in c.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average
        with torch.no_grad():
            for i in range(0, 1024, 128):
                c(X[perm[i : i + 128]])
        return evaluate(c)

    rows = []
    runs = [("KFACPreconditioner+SGD", "kl", 0.1, name, kw) for name, kw in CAUSES] if causes else \
        [(method, rule, lr, "", {}) for method, rule, lr in RUNS]
    for method, rule, lr, variant, kw in runs:
        m = small_resnet(1, 10, seed=0)
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        for mod in bns:
            mod.momentum = kw.get("bn_momentum", mod.momentum)
        bn_params = [p for mod in bns for p in mod.parameters()]
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=kw.get("sgd_momentum", 0.9))
        pre = None
        if rule != "plain":
            step_size = {None: None, "graft": Graft(), "kl": KLClip(kappa=1e-3, lr=opt)}[rule]
            pre = kfac_fast.KFACPreconditioner(m, loss="softmax_cross_entropy", step_size=step_size, Tf=1,
                                               generator=torch.Generator().manual_seed(0))
        for k in range(1, iters + 1):
            idx = torch.randint(0, X.shape[0], (128,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(m(X[idx]), Y[idx])
            loss.backward()
            raw = [p.grad.clone() for p in bn_params] if kw.get("raw_bn") else None
            if pre is not None:
                pre.step(X[idx], Y[idx])
            if raw is not None:
                for p, r in zip(bn_params, raw):
                    p.grad.copy_(r)
            opt.step()
            if k % 10 == 0:
                rows.append({"method": method, **({"variant": variant} if causes else {}),
                             "step_size": "none" if rule is None else rule, "lr": lr,
                             "iteration": k, "batch_loss": round(float(loss), 4), "eval_loss": round(evaluate(m), 4),
                             "recalibrated_eval_loss": round(recalibrated(m), 4),
                             "conv_weight_norm": round(float(m.blocks[1].conv1.weight.norm()), 3)})
                print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_csv("bn_running_stats_causes_cpu" if causes else "bn_running_stats_cpu", rows, dict(machine_info(), load_average=f"{os.getloadavg()[0]:.2f}"))


if __name__ == "__main__":
    main(causes="--causes" in sys.argv[1:])
