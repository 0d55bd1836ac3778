"""One rank of the 2-process gloo check that a non-finite statistic on one rank rejects the step
on every rank (tests/test_distributed_finite_flags.py).

    python tests/_distributed_finite_flags_worker.py RANK WORLD PORT OUTDIR

Rank 1's model turns its hidden activations to NaN in the sampled-target pass of one ordinary
iteration only (recognised by its batch: the τ₁m rows of S₁ with autograd on), so the objective
h stays finite on both ranks and only rank 1's statistics are non-finite.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

D = torch.float64
M = 8  # rows per rank
TAU1 = 0.5
POISON_STEP = 4  # an ordinary iteration: k > 3 and not a multiple of T3


class Poison(nn.Module):
    """NaN out while ``armed`` on a grad-enabled pass over the S₁ rows; counts what it poisoned."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.fired = 0

    def forward(self, h):
        if self.armed and torch.is_grad_enabled() and h.shape[0] == round(TAU1 * M):
            self.fired += 1
            return h * float("nan")
        return h


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), Poison(), nn.Tanh(), nn.Linear(6, 3)).to(D)


def data(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(M, 4, dtype=D, generator=g), torch.randint(0, 3, (M,), generator=g)


def factors(opt):
    state = opt.state_dict()["factors"]  # None before the first step
    return [] if state is None else [v.clone() for rec in state["factors"] for v in rec.values()
                                     if isinstance(v, torch.Tensor)]


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    import warnings

    from kfac_fast import KFAC

    warnings.simplefilter("ignore", RuntimeWarning)
    model = make_model()
    opt = KFAC(model, loss="softmax_cross_entropy", T3=10, T2=10, tau1=TAU1)
    x, y = data(rank)
    res = {"steps": []}
    for k in range(1, 7):
        armed = rank == 1 and k == POISON_STEP
        model[1].armed = armed
        before = ([p.detach().clone() for p in model.parameters()], factors(opt))
        s = opt.step(x, y)
        model[1].armed = False
        after = ([p.detach().clone() for p in model.parameters()], factors(opt))
        res["steps"].append({"k": s["k"], "code": int(s["reject_code"]), "loss": float(s["loss"]),
                             "before": before, "after": after})
    res["fired"] = model[1].fired
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
