"""The eigenbasis prototype of benchmarks/bench_eigenbasis.py computes the rule it names (the
race numbers in docs/race.md are about this rule): per dense Kronecker block, the direction
Q_G (Ṽ / (sqrt(ŝ) + ε)) Q_Aᵀ with Ṽ = Q_Gᵀ V Q_A and ŝ Adam's bias-corrected EMA of Ṽ⊙Ṽ, the
bases from the running Ā and G at each refresh; every other block the damped inverse as before.
Checked against an independent float64 computation (torch.linalg.eigh of the factors).

The loss is the squared error: its G has no null direction. A softmax head's G does (the
all-ones direction of the logits, in which the gradient is zero up to rounding), and there
Ṽ / (sqrt(ŝ) + ε) is rounding noise divided by itself, a different ±1 in float32 and float64."""
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
bench = pytest.importorskip("bench_eigenbasis")


def _nets():
    torch.manual_seed(0)
    # tanh on both sides of the LayerNorm: a Linear right after it has a null direction in Ā (its
    # outputs sum to zero with the weights at 1), one right before it in G (its backward removes
    # the mean), where the same rounding noise would be compared
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3))  # Ā of full rank on 64 rows: no null direction
    return [(mlp, lambda m: torch.randn(m, 5)), (conv, lambda m: torch.randn(m, 2, 5, 5))]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("beta2,power,rel_damping", [(0.95, 0.5, 0.0), (0.5, 0.5, 0.0), (0.9, 1.0, 0.01)])
def test_direction_matches_float64(which, beta2, power, rel_damping):
    net, draw = _nets()[which]
    pre = bench.EigenbasisPreconditioner(net, loss="squared_error", eigenbasis=1, beta2=beta2,
                                         power=power, rel_damping=rel_damping,
                                         step_size=None, Tf=1, T3=2, tau1=1.0, fisher="empirical",
                                         generator=torch.Generator().manual_seed(1))
    s, Q, seen, t = {}, {}, None, 0
    g = torch.Generator().manual_seed(2)
    checked = 0
    for k in range(6):
        x = draw(64)
        y = torch.randn(64, 3, generator=g)
        net.zero_grad()
        (0.5 * (net(x) - y).pow(2).sum(-1)).mean().backward()
        V = {l.name: l.grad_matrix().detach().double().clone() for l in pre.layers}
        pre.step(x, y)
        t += 1
        inv = pre.inverse
        if inv is not seen:  # a refresh: new bases from the factors it was built from
            for f in inv.records:
                if bench.dense_kron(f):
                    Q[f.name] = (torch.linalg.eigh(f.A.double())[1], torch.linalg.eigh(f.G.double())[1])
            seen = inv
        others = inv.apply([V[l.name].float() for l in pre.layers])
        for l, u_other in zip(pre.layers, others):
            got = l.grad_matrix().double()
            if l.name in Q:
                QA, QG = Q[l.name]
                Vt = QG.t() @ V[l.name] @ QA
                s[l.name] = beta2 * s.get(l.name, torch.zeros_like(Vt)) + (1 - beta2) * Vt * Vt
                shat = s[l.name] / (1 - beta2 ** t)
                d = shat ** power
                d = d + rel_damping * d.mean()
                want = QG @ (Vt / (d + pre.eig_eps)) @ QA.t()
                checked += 1
            else:  # not a dense Kronecker block: the damped inverse, unchanged
                want = u_other.double()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4 * float(want.abs().max()))
    assert checked >= 6 * 2
    assert {n for n in Q} == {l.name for l in pre.layers if l.name.endswith(("0", "4"))} and len(Q) == 2
