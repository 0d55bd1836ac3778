"""KFACPreconditioner(Tf=...): statistics on the first 3 steps and every Tf-th, the other steps
precondition with the inverse of the last statistics step."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kfac_fast import KFACPreconditioner

from dense import mlp


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_statistics_every_Tf_steps(capture):
    model = mlp([4, 6, 3], nn.Tanh)
    gen = torch.Generator().manual_seed(0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", Tf=4, T3=4, capture=capture, step_size=None,
                             fisher="empirical", generator=gen)
    updated = []
    for k in range(1, 11):
        x, y = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in (model[0], model[2])]
        before = None if pre.factors is None else pre.factors.current[0].A.clone()
        inverse = pre.inverse
        pre.step(x, y) if capture == "pass" else pre.step(targets=y)
        changed = before is None or not torch.equal(before, pre.factors.current[0].A)
        updated.append(changed)
        if not changed:  # preconditioned with the previous inverse, unchanged
            assert pre.inverse is inverse
            expected = inverse.apply(raw)
            torch.testing.assert_close(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1), expected[0])
    assert updated == [True, True, True, True, False, False, False, True, False, False], updated


def test_Tf_validation():
    with pytest.raises(ValueError, match="Tf must be a positive integer"):
        KFACPreconditioner(mlp([2, 2]), loss="softmax_cross_entropy", Tf=0)


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
def test_Tf_in_the_data_parallel_preconditioner_on_one_process(mode):
    """DistributedKFACPreconditioner(Tf=4) on a world of one follows KFACPreconditioner(Tf=4) (the
    2-process check is in test_distributed.py)."""
    from kfac_fast.distributed import LocalDistributor
    from kfac_fast.preconditioner import DistributedKFACPreconditioner

    traces = []
    for cls, extra in ((KFACPreconditioner, {}), (DistributedKFACPreconditioner,
                                                  dict(mode=mode, distributor=LocalDistributor()))):
        model = mlp([4, 6, 3], nn.Tanh)
        pre = cls(model, loss="softmax_cross_entropy", Tf=4, T3=8, fisher="empirical",
                  generator=torch.Generator().manual_seed(0), **extra)
        gen = torch.Generator().manual_seed(1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        trace = []
        for k in range(1, 13):
            x, y = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(x, y)
            sgd.step()
            trace.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        traces.append(trace)
    for k, (a, b) in enumerate(zip(*traces), start=1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=f"step {k}")


@pytest.mark.parametrize("T3,want", [(20, 10), (5, 5), (7, 7), (30, 10), (12, 6), (1, 1)])
def test_default_Tf_is_the_largest_divisor_of_T3_up_to_10(T3, want):
    pre = KFACPreconditioner(mlp([2, 2]), loss="softmax_cross_entropy", T3=T3)
    assert pre.Tf == want and T3 % pre.Tf == 0
    assert KFACPreconditioner(mlp([2, 2]), loss="softmax_cross_entropy", T3=T3, Tf=1).Tf == 1
