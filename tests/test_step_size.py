"""Step-size control of KFACPreconditioner (kfac_fast.step_size): KL-clipping against a dense
float64 F̆⁻¹ built by hand, grafting against the gradient's per-layer norms, and a Conv+BN net
under SGD with a usual CNN learning rate."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kfac_fast import KFACPreconditioner
from kfac_fast.step_size import Graft, KLClip

from dense import mlp, vec

D = torch.float64


def _dense_direction(model, x, y, gamma):
    """u = F̆⁻¹∇ per Linear layer, by hand: empirical Ā = E[ā āᵀ] (homogeneous coordinate last),
    G = (1/m) Σ_n g_n g_nᵀ with g_n = ∂loss_n/∂s, damping πγI ⊗ (γ/π)I with the trace norm π
    (Sec 6.3), F̆ = (Ā + πγI) ⊗ (G + γ/π I) on vec with stacked columns, solved densely."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    ins, outs = [], []

    def record(mod, i, o):
        ins.append(i[0])
        outs.append(o)

    hooks = [l.register_forward_hook(record) for l in lins]
    z = model(x)
    for h in hooks:
        h.remove()
    losses = F.cross_entropy(z, y, reduction="none")
    gs = torch.autograd.grad(losses.sum(), outs, retain_graph=True)
    grad = torch.autograd.grad(losses.mean(), [p for l in lins for p in (l.weight, l.bias)])
    m = x.shape[0]
    out = []
    for j, (a, g) in enumerate(zip(ins, gs)):
        abar = torch.cat([a.detach(), torch.ones(m, 1, dtype=D)], 1)
        A, G = abar.t() @ abar / m, g.t() @ g / m
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        Fd = torch.kron(A + pi * gamma * torch.eye(A.shape[0], dtype=D), G + gamma / pi * torch.eye(G.shape[0], dtype=D))
        W = torch.cat([grad[2 * j], grad[2 * j + 1][:, None]], 1)
        u = torch.linalg.solve(Fd, vec(W))
        out.append((vec(W), u))
    return out


def _step(model, x, y, rule, gamma=0.1):
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=gamma, fisher="empirical", tau1=1.0,
                             step_size=rule, damping_warmup=0)  # γ itself at k = 1
    F.cross_entropy(model(x), y).backward()
    pre.step(x, y)  # k = 1: the running factors are this batch's
    return [vec(torch.cat([l.weight.grad, l.bias.grad[:, None]], 1)) for l in model if isinstance(l, nn.Linear)]


@pytest.mark.parametrize("lr", [3.0, 1e-3])
def test_kl_clip_factor_matches_dense_fisher_inverse(lr):
    torch.manual_seed(0)
    x, y = torch.randn(24, 4, dtype=D), torch.randint(0, 3, (24,))
    kappa = 1e-3
    ref = _dense_direction(mlp([4, 5, 3], nn.Tanh), x, y, 0.1)
    vg = lr ** 2 * sum(float(g @ u) for g, u in ref)
    nu = min(1.0, math.sqrt(kappa / vg))
    assert (nu < 0.5) if lr > 1 else nu == 1.0  # both sides of the clip
    got = _step(mlp([4, 5, 3], nn.Tanh), x, y, KLClip(kappa=kappa, lr=lr))
    for (g, u), v in zip(ref, got):
        torch.testing.assert_close(v, nu * u, rtol=1e-7, atol=1e-12)
    # KLClip reads the optimizer's current lr (schedulers apply)
    model = mlp([4, 5, 3], nn.Tanh)
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    got = _step(model, x, y, KLClip(kappa=kappa, lr=sgd))
    torch.testing.assert_close(got[0], nu * ref[0][1], rtol=1e-7, atol=1e-12)


def test_graft_takes_each_layers_norm_from_the_gradient_and_direction_from_kfac():
    torch.manual_seed(1)
    x, y = torch.randn(24, 4, dtype=D), torch.randint(0, 3, (24,))
    ref = _dense_direction(mlp([4, 5, 3], nn.Tanh), x, y, 0.1)
    got = _step(mlp([4, 5, 3], nn.Tanh), x, y, Graft())
    for (g, u), v in zip(ref, got):
        assert float(v.norm()) == pytest.approx(float(g.norm()), rel=1e-10)  # SGD's per-layer norm
        assert float(v @ u) / float(v.norm() * u.norm()) == pytest.approx(1.0, abs=1e-10)  # K-FAC's direction
        assert float(u.norm()) > 2 * float(g.norm())  # the raw direction's norm differs


def test_step_size_validation():
    with pytest.raises(ValueError, match="learning rate"):
        KLClip(kappa=1e-3)
    with pytest.raises(ValueError, match="kappa"):
        KLClip(kappa=0.0, lr=0.1)
    with pytest.raises(ValueError, match="step_size must be"):
        KFACPreconditioner(mlp([2, 2]), loss="softmax_cross_entropy", step_size="kl")


def _conv_bn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("rule", ["default", "kl"])
def test_conv_bn_with_sgd_lr_005_momentum_09_stays_finite(rule):
    """The usual CNN setting (SGD lr 0.05, momentum 0.9) on a Conv+BN net: without step-size
    control the preconditioned step drives the loss from 2.3 to ~1e9 in 60 iterations."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(512, 1, 8, 8, generator=gen)
    Y = (X[:, 0, :4].mean((1, 2)) > X[:, 0, 4:].mean((1, 2))).long() + 2 * (X[:, 0, :, :4].mean((1, 2)) > 0.5).long()
    model = _conv_bn(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = {} if rule == "default" else {"step_size": KLClip(kappa=1e-3, lr=sgd)}
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0), **kw)
    first = None
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=gen)
        sgd.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        first = first if first is not None else float(loss)
        loss.backward()
        pre.step(X[idx], Y[idx])
        sgd.step()
    model.eval()
    with torch.no_grad():
        final = float(F.cross_entropy(model(X), Y))
    assert math.isfinite(final) and final < first
