"""BatchNorm running statistics under K-FAC: its own passes (sampled targets on a τ₁ subset,
quadratic model, ρ) must leave them as one plain training step leaves them, so that eval mode
sees the statistics of the batches the user trained on, at the usual momentum."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kfac_fast import KFAC, KFACPreconditioner


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _buffers(model):
    return [b.clone() for b in model.buffers()]


def _plain_forward(model, x):
    """The reference: the buffers after one training-mode forward on the whole batch."""
    twin = copy.deepcopy(model)
    for m in twin.modules():  # the copy must not feed the preconditioner's capture hooks
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    twin.train()
    twin(x)
    return _buffers(twin)


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_preconditioner_leaves_batchnorm_statistics_to_your_forward(capture):
    model = _net()
    gen = torch.Generator().manual_seed(1)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", capture=capture, generator=gen)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        x, y = torch.randn(32, 1, 7, 7, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        expected = _plain_forward(model, x)
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward(retain_graph=capture == "hooks")
        pre.step(x, y) if capture == "pass" else pre.step(targets=y)
        got = _buffers(model)
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
        sgd.step()


def test_kfac_step_updates_batchnorm_statistics_once_with_the_whole_batch():
    model = _net()
    gen = torch.Generator().manual_seed(2)
    opt = KFAC(model, loss="softmax_cross_entropy", generator=gen)
    for _ in range(3):
        x, y = torch.randn(64, 1, 7, 7, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        expected = _plain_forward(model, x)
        opt.step(x, y)
        for e, g in zip(expected, _buffers(model)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_one_example_subset_with_batchnorm_names_tau1():
    # a batch of 8 and tau1 = 1/8: the statistics pass sees 1 example, which BatchNorm1d in
    # training mode cannot normalise; the error names the subset and the fix, not only torch's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"subset of 1 example.*at least 2/tau1 examples or raise tau1"):
        pre.step(x, y)
    KFACPreconditioner(model, loss="softmax_cross_entropy", tau1=0.25).step(x, y)  # 2 examples: fine
    with pytest.raises(ValueError, match=r"subset of 1 example"):
        KFAC(model, loss="softmax_cross_entropy").step(x, y)
