"""Running factor averages (Sec 5): Ā_k = ε_k Ā_{k−1} + (1 − ε_k) A_k with ε_k = min(1 − 1/k, ema_max),
checked with a DIFFERENT batch every step so that the cap ema_max is reached and every ε_k matters.

The per-step statistics A_k = E[ā āᵀ], G_k = E[g gᵀ] are recomputed here from a hand-written
forward pass (F.linear, tanh) and our own autograd of ½‖y − z‖², at the parameters of that step
and with the targets the optimizer sampled (recorded at the loss's ``sample`` seam)."""
import copy

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import kfac_fast
from kfac_fast.curvature.statistics import BatchStatistics
from kfac_fast import KFAC
from kfac_fast.curvature.running import RunningFactors, ema_decay
from kfac_fast.curvature import find_layers
from kfac_fast.curvature.losses import SquaredError

D = torch.float64


def eps_ref(k, ema_max):
    return min(1.0 - 1.0 / k, ema_max)


@pytest.mark.parametrize("ema_max", [0.0, 0.5, 0.7, 0.95])
def test_ema_decay_values(ema_max):
    for k in range(1, 60):
        assert ema_decay(k, ema_max) == pytest.approx(eps_ref(k, ema_max), abs=1e-15), k
    assert ema_decay(1, ema_max) == 0.0  # the first estimate is the batch estimate alone
    assert ema_decay(10 ** 6, ema_max) == pytest.approx(ema_max)  # capped


class RecordingGaussian(SquaredError):
    """Unit Gaussian whose sampled targets are recorded with the outputs they were drawn for."""

    def __init__(self):
        self.draws = []

    def sample(self, z, generator=None):
        y = super().sample(z, generator)
        self.draws.append((z.detach().clone(), y.clone()))
        return y


def _batch_stats(Ws, x, z1, y1):
    """A_i, G_i for the two-layer tanh net with parameters Ws = [(W, b), (W, b)], from the rows of
    x matched to the sampled-pass outputs z1 (the optimizer's τ₁ subset is a permutation of x)."""
    (W1, b1), (W2, b2) = Ws
    with torch.no_grad():
        z_full = Fn.linear(torch.tanh(Fn.linear(x, W1, b1)), W2, b2)
    dist = torch.cdist(z1, z_full)
    perm = dist.argmin(1)
    assert float(dist.min(1).values.max()) < 1e-10 and sorted(perm.tolist()) == list(range(x.shape[0]))
    xs = x[perm]
    s1 = Fn.linear(xs, W1, b1).requires_grad_(True)
    a1 = torch.tanh(s1)
    s2 = Fn.linear(a1, W2, b2)
    g1, g2 = torch.autograd.grad(0.5 * ((y1 - s2) ** 2).sum(), [s1, s2])
    m = x.shape[0]
    one = torch.ones(m, 1, dtype=D)
    abar = [torch.cat([xs, one], 1), torch.cat([a1.detach(), one], 1)]
    A = [a.t() @ a / m for a in abar]
    G = [g.t() @ g / m for g in (g1, g2)]
    return A, G


@pytest.mark.parametrize("ema_max", [0.7, 0.95])
def test_optimizer_running_factors_follow_the_capped_recursion(ema_max):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    loss = RecordingGaussian()
    steps = 24 if ema_max == 0.95 else 6  # ε reaches the cap at k = 5 (0.7) and k = 21 (0.95)
    opt = KFAC(model, loss=loss, tau1=1.0, ema_max=ema_max, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(2)
    Abar = Gbar = None
    capped = 0
    for k in range(1, steps + 1):
        x = torch.randn(10, 3, dtype=D, generator=data) * (1 + k % 3)  # distinct batches, distinct scales
        y = torch.randn(10, 2, dtype=D, generator=data)
        Ws = [(model[i].weight.detach().clone(), model[i].bias.detach().clone()) for i in (0, 2)]
        n_draws = len(loss.draws)
        s = opt.step(x, y)
        assert not s["rejected"]
        assert len(loss.draws) == n_draws + 1  # exactly one sampled pass per step
        z1, y1 = loss.draws[-1]
        A, G = _batch_stats(Ws, x, z1, y1)
        e = eps_ref(k, ema_max)
        capped += e == ema_max
        if Abar is None:
            Abar, Gbar = [torch.zeros_like(a) for a in A], [torch.zeros_like(g) for g in G]
        Abar = [e * ab + (1 - e) * a for ab, a in zip(Abar, A)]
        Gbar = [e * gb + (1 - e) * g for gb, g in zip(Gbar, G)]
        by_module = {id(l.module): f for l, f in zip(opt.layers, opt.factors.current)}
        for j, i in enumerate((0, 2)):
            f = by_module[id(model[i])]
            torch.testing.assert_close(f.A, Abar[j], rtol=1e-10, atol=1e-12, msg=f"A layer {j} step {k}")
            torch.testing.assert_close(f.G, Gbar[j], rtol=1e-10, atol=1e-12, msg=f"G layer {j} step {k}")
    assert capped >= 2


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_running_factors_update_with_distinct_inputs(backend):
    if not kfac_fast.available_backends()[backend].available:
        pytest.skip(f"{backend} backend unavailable")
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2)).to(D)
    layers = find_layers(model)
    rf = RunningFactors(layers, dtype=D, device="cpu", tridiagonal=True)
    g = torch.Generator().manual_seed(3)
    ema_max = 0.6
    hom = [l.has_bias for l in layers]

    def bar(a, h):
        return torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], 1) if h else a

    ref = None
    for k in range(1, 8):
        m = 4 + k  # a different number of rows too
        acts = [torch.randn(m, l.d_in, dtype=D, generator=g) * k for l in layers]
        gs = [torch.randn(m, l.d_out, dtype=D, generator=g) for l in layers]
        e = eps_ref(k, ema_max)
        before = copy.deepcopy([(f.A.clone(), f.G.clone()) for f in rf.current])
        rf.update(BatchStatistics(a=acts, g=gs, u=[None] * len(layers), n_terms=m), eps=ema_decay(k, ema_max),
                  backend=backend)
        # nothing current changes until commit
        for (A0, G0), f in zip(before, rf.current):
            assert torch.equal(A0, f.A) and torch.equal(G0, f.G)
        rf.commit()
        ab = [bar(a, h) for a, h in zip(acts, hom)]
        batch = {"A": [a.t() @ a / m for a in ab], "G": [q.t() @ q / m for q in gs],
                 "A_next": [ab[i].t() @ ab[i + 1] / m for i in range(len(ab) - 1)],
                 "G_next": [gs[i].t() @ gs[i + 1] / m for i in range(len(gs) - 1)]}
        if ref is None:
            ref = {key: [torch.zeros_like(t) for t in v] for key, v in batch.items()}
        ref = {key: [e * r + (1 - e) * b for r, b in zip(ref[key], batch[key])] for key in batch}
        for key in batch:
            for i, r in enumerate(ref[key]):
                torch.testing.assert_close(getattr(rf.current[i], key), r, rtol=1e-11, atol=1e-12,
                                           msg=f"{key} layer {i} step {k}")
