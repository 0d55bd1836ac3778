"""The damping warm-up of KFACPreconditioner: an inverse built at iteration k uses
γ_k = γ·max(1, K/k) (kfac_fast.curvature.damping.warmup_damping). Checked against a dense float64
F̆⁻¹ at γ_k built by hand, with the refresh schedule (k = 1, the warm-up refreshes k = 2, 3 at the
γ of k = 1, every T3), the defaults per step-size rule, checkpoints and the warm-up rebuild."""
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.curvature import inverses
from kfac_fast.curvature.block_inverse import largest_dense_factor
from kfac_fast.curvature.damping import DEFAULT_DAMPING_WARMUP, warmup_damping
from kfac_fast.step_size import Graft, KLClip

from dense import mlp, vec
from test_step_size import _dense_direction

D = torch.float64


def test_warmup_damping_values():
    assert warmup_damping(0.01, 1, 300) == pytest.approx(3.0)
    assert warmup_damping(0.01, 20, 300) == pytest.approx(0.15)
    assert warmup_damping(0.01, 300, 300) == pytest.approx(0.01)
    assert warmup_damping(0.01, 5000, 300) == 0.01
    for K in (0, 1):
        assert warmup_damping(0.02, 1, K) == 0.02
    assert DEFAULT_DAMPING_WARMUP == 30


def test_defaults_per_step_size_rule():
    model = mlp([3, 2])
    assert KFACPreconditioner(model, loss="softmax_cross_entropy").damping_warmup == DEFAULT_DAMPING_WARMUP
    assert KFACPreconditioner(model, loss="softmax_cross_entropy", step_size=Graft()).damping_warmup == 30
    # KLClip and the raw direction: γ sets the step length, so no warm-up unless asked for
    assert KFACPreconditioner(model, loss="softmax_cross_entropy", step_size=None).damping_warmup == 0
    assert KFACPreconditioner(model, loss="softmax_cross_entropy",
                              step_size=KLClip(kappa=1e-3, lr=0.1)).damping_warmup == 0
    assert KFACPreconditioner(model, loss="softmax_cross_entropy", step_size=None,
                              damping_warmup=50).damping_warmup == 50
    for bad in (-1, 2.5, True, "300"):
        with pytest.raises(ValueError, match="damping_warmup"):
            KFACPreconditioner(model, loss="softmax_cross_entropy", damping_warmup=bad)


def _batches(n, m=24):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(m, 4, dtype=D, generator=g), torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def test_direction_is_the_dense_solve_at_the_warmup_damping():
    """Every step from one fixed batch (so the running factors stay that batch's): the raw
    direction (step_size=None, warm-up asked for) equals the dense F̆⁻¹∇ at γ_k of the last
    refresh: k = 1, 2, 3 at γ_1 = γK, then γK/T3 from k = T3 on."""
    gamma, K, T3 = 0.01, 40, 4
    x, y = _batches(1)[0]
    torch.manual_seed(0)
    model = mlp([4, 5, 3], nn.Tanh)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=gamma, fisher="empirical", tau1=1.0,
                             step_size=None, damping_warmup=K, T3=T3, Tf=1)
    expect = {1: gamma * K, 2: gamma * K, 3: gamma * K, 4: gamma * K / 4, 5: gamma * K / 4, 8: gamma * K / 8}
    for k in range(1, 9):
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        ref = _dense_direction(model, x, y, expect.get(k, expect[4] if k < 8 else expect[8]))
        pre.step(x, y)
        got = [vec(torch.cat([l.weight.grad, l.bias.grad[:, None]], 1)) for l in model if isinstance(l, nn.Linear)]
        if k in expect:
            assert pre._gamma == pytest.approx(expect[k])
            for (_, u), v in zip(ref, got):
                torch.testing.assert_close(v, u, rtol=1e-8, atol=1e-12)


def test_warmup_refreshes_share_the_first_damping_and_keep_large_blocks(monkeypatch):
    """k = 2, 3 rebuild only the small blocks (warmup_rebuild); with the damping warm-up on, the
    large blocks' iteration-1 inverses are still reused (one γ for the whole inverse)."""
    monkeypatch.setattr(inverses, "WARMUP_REBUILD_MAX_DIM", 5)
    torch.manual_seed(0)
    model = mlp([4, 8, 3], nn.Tanh)  # blocks (a, g): (5, 8) large, (9, 3) large... by the bound 5
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=0.01, fisher="empirical", tau1=1.0,
                             T3=20, factor_dtype=D)
    invs = []
    for x, y in _batches(3):
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        pre.step(x, y)
        invs.append(pre.inverse)
    assert pre.damping_warmup == 30
    assert all(inv.damping == pytest.approx(0.3) for inv in invs)
    large = [i for i, f in enumerate(invs[0].records) if largest_dense_factor(f) > 5]
    assert large
    V = [torch.randn(s, dtype=D) for s in invs[0].shapes]
    first, second = invs[0].apply(V), invs[1].apply(V)
    for i in large:
        assert torch.equal(first[i], second[i])  # kept from iteration 1, not rebuilt at another γ


def test_checkpoint_keeps_the_inverse_damping():
    torch.manual_seed(0)
    model = mlp([4, 5, 3], nn.Tanh)
    kw = dict(loss="softmax_cross_entropy", damping=0.01, T3=4, Tf=1, factor_dtype=D,
              generator=torch.Generator().manual_seed(1))
    pre = KFACPreconditioner(model, **kw)
    batches = _batches(7)
    for x, y in batches[:5]:
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        pre.step(x, y)
    state = pre.state_dict()
    assert state["inverse_damping"] == pytest.approx(0.01 * 30 / 4)
    twin = KFACPreconditioner(model, **kw)
    twin.load_state_dict(state)
    assert twin._gamma == pre._gamma and twin.damping == 0.01
    x, y = batches[5]
    outs = []
    for p in (pre, twin):
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        p.step(x, y)
        outs.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # a state saved before the warm-up existed has no inverse_damping: its inverse was built at γ
    old = dict(state)
    del old["inverse_damping"]
    twin.load_state_dict(old)
    assert twin._gamma == 0.01


def test_graft_default_trains_a_small_net():
    torch.manual_seed(0)
    model = mlp([4, 16, 3], nn.Tanh).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    x, y = [t.float() if t.is_floating_point() else t for t in _batches(1, m=64)[0]]
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = Fn.cross_entropy(model(x), y)
        loss.backward()
        pre.step(x, y)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert pre._gamma == pytest.approx(0.01)  # past K = 30: γ itself
