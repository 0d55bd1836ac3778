"""The hand-written linearized forward for plain Sequential networks (Appendix C fast path)
against central finite differences and against the generic forward-mode AD path."""
import pytest
import torch
from torch import nn

from kfac_fast.curvature.sequential_jvp import sequential_jvp, sequential_plan
from kfac_fast.curvature import linearize
from kfac_fast.curvature.layers import find_layers


def _model(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9), act(), nn.Linear(9, 5, bias=False), act(), nn.Linear(5, 4)).double()


def _dirs(layers, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(l.g_dim, l.a_dim, dtype=torch.float64, generator=g) for l in layers] for _ in range(n)]


def _shifted_output(model, layers, x, d, eps):
    with torch.no_grad():
        saved = [[p.clone() for p in l.params()] for l in layers]
        for l, D in zip(layers, d):
            for p, part in zip(l.params(), l.from_matrix(D)):
                p.add_(part.reshape(p.shape), alpha=eps)
        out = model(x)
        for l, ps in zip(layers, saved):
            for p, s in zip(l.params(), ps):
                p.copy_(s)
    return out


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU, nn.Identity])
def test_matches_finite_differences_and_forward_ad(act):
    model = _model(act)
    layers = find_layers(model)
    x = torch.randn(11, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dirs = _dirs(layers, 3)
    plan = sequential_plan(model, layers)
    assert plan is not None
    z, jvs = sequential_jvp(plan, layers, x, dirs)
    torch.testing.assert_close(z, model(x).detach())
    eps = 1e-6
    for d, jv in zip(dirs, jvs):
        fd = (_shifted_output(model, layers, x, d, eps) - _shifted_output(model, layers, x, d, -eps)) / (2 * eps)
        torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-7)
    z2, jvs2 = linearize.jvp(model, layers, x, dirs, provider="forward")  # the generic path
    assert linearize.provider_for(model, layers, x) == "sequential"
    torch.testing.assert_close(z2, z, rtol=1e-12, atol=1e-12)
    for a, b in zip(jvs2, jvs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_other_models_use_the_generic_path():
    model = _model(nn.Tanh)
    layers = find_layers(model)
    assert sequential_plan(model, layers) is not None
    h = model[1].register_forward_hook(lambda m, a, o: o * 2)  # a hook changes the function
    assert sequential_plan(model, layers) is None
    h.remove()
    gelu = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()
    assert sequential_plan(gelu, find_layers(gelu)) is None

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model(nn.Tanh)

        def forward(self, x):
            return self.net(x)

    w = Wrapped()
    assert sequential_plan(w, find_layers(w)) is None
    # 3-D inputs fall back too
    plan = sequential_plan(model, layers)
    assert sequential_jvp(plan, layers, torch.randn(2, 3, 7, dtype=torch.float64), _dirs(layers, 1)) is None
