"""KFACPreconditioner(capture="hooks"): statistics from the user's own forward and backward.

References are independent routes: today's capture="pass" (its own forward and backward on the
whole batch, tau1=1), ``block_factors`` (its own capture and autograd.grad of the summed loss),
and for the MC Fisher of an MLP a hand computation of A = mean ā āᵀ and G = (1/N) Σ g gᵀ.
"""
import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.curvature import block_factors
from kfac_fast.curvature.blocks import find_blocks
from kfac_fast.curvature.hooks import HookCapture
from kfac_fast.curvature.losses import get_loss
from kfac_fast.curvature.statistics import sampled_statistics

from arch_models import cnn_problem, lm_problem
from dense import mlp

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ problems
def mlp_problem(m: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=seed)
    x = torch.randn(m, 5, dtype=D, generator=g)
    y = torch.randint(0, 3, (m,), generator=g)
    return model, x, y


def ce(z, y):
    """The user's loss: mean cross-entropy over the kept loss terms (tokens for (m, T, V))."""
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)


PROBLEMS = {
    # name: (problem factory, kwargs of KFACPreconditioner and block_factors)
    "mlp": (mlp_problem, {}),
    "cnn": (cnn_problem, {"unsupported": "diagonal"}),  # Conv2d, BatchNorm2d (2x2 blocks), a diagonal parameter
    "lm": (lm_problem, {}),  # Embedding, Linear on (m, T, d), LayerNorm, ignore_index targets
    "lm-reduce": (lm_problem, {"kfac_approx": "reduce"}),  # KFAC-reduce rows of the (m, T, d) Linear layers
}


def batches(x, y, n: int, seed: int = 1):
    """n batches of the problem's shape: the problem's own, then row permutations of it with
    perturbed float inputs (keeps the targets valid for every task)."""
    g = torch.Generator().manual_seed(seed)
    out = [(x, y)]
    for _ in range(n - 1):
        idx = torch.randperm(x.shape[0], generator=g)
        xb = x[idx]
        if xb.is_floating_point():
            xb = xb + 0.1 * torch.randn(xb.shape, dtype=xb.dtype, generator=g)
        out.append((xb, y[idx]))
    return out


def user_step(model, pre, x, y, *, retain_graph=False, **step_kw):
    """One iteration of the user's loop: zero .grad, forward, mean loss, backward, pre.step."""
    for p in model.parameters():
        p.grad = None
    ce(model(x), y).backward(retain_graph=retain_graph)
    pre.step(**step_kw)


def all_factors(pre):
    out = []
    for f in pre.factors.current:
        for k in ("A", "G", "F"):
            t = getattr(f, k, None)
            if t is not None:
                out.append((f"{f.name}.{k}", t))
    return out


def assert_factors_close(got, ref, keys=("A", "G", "F", "A_next", "G_next")):
    """Factor records in the same order (forward order, diagonal blocks last)."""
    assert [f.name for f in got] == [f.name for f in ref]
    for a, b in zip(got, ref):
        for k in keys:
            ta, tb = getattr(a, k, None), getattr(b, k, None)
            assert (ta is None) == (tb is None), (a.name, k)
            if ta is not None:
                torch.testing.assert_close(ta, tb, **TIGHT, msg=lambda s: f"{a.name}.{k}: {s}")


# ------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name,inverse", [(n, "block_diagonal") for n in PROBLEMS] + [("mlp", "block_tridiagonal"),
                                                                                      ("lm", "block_tridiagonal")])
def test_empirical_hooks_equal_pass_and_block_factors(name, inverse):
    """Empirical Fisher: factors from the user's pass = today's step(x, y) with tau1=1, for three
    steps (ε-averaging and inverse refreshes included); the preconditioned .grad equal too; and
    the first step's factors equal block_factors' empirical factors of that batch."""
    factory, kw = PROBLEMS[name]
    model_p, x, y = factory()
    model_h = copy.deepcopy(model_p)
    ref_model = copy.deepcopy(model_p)
    common = dict(loss="softmax_cross_entropy", fisher="empirical", damping=0.1, T3=2, inverse=inverse, **kw)
    pre_p = KFACPreconditioner(model_p, tau1=1.0, **common)
    pre_h = KFACPreconditioner(model_h, capture="hooks", **common)
    ref = block_factors(ref_model, x, "softmax_cross_entropy", fisher="empirical", targets=y, **kw)
    for k, (xb, yb) in enumerate(batches(x, y, 3)):
        for p in model_p.parameters():
            p.grad = None
        ce(model_p(xb), yb).backward()
        pre_p.step(xb, yb)
        user_step(model_h, pre_h, xb, yb, targets=yb)
        assert [l.name for l in pre_h.layers] == [l.name for l in pre_p.layers]
        assert_factors_close(pre_h.factors.current, pre_p.factors.current)
        if k == 0:
            assert_factors_close(pre_h.factors.current, ref, keys=("A", "G", "F"))
        for (n, a), b in zip(model_p.named_parameters(), model_h.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, msg=lambda s: f"{n}: {s}")
    assert pre_h.k == pre_p.k == 4


@pytest.mark.parametrize("retain_graph", [False, True])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_mc_hooks_equal_block_factors_same_draws(name, retain_graph):
    """MC Fisher: the sampled backward inside the user's (from the model output to the blocks, on
    targets sampled from the user's outputs, the terms the user's loss ignores left out) gives
    block_factors' MC factors for the same generator state (its own forward, its own sampled
    backward), whether or not the user retains the graph."""
    factory, kw = PROBLEMS[name]
    model, x, y = factory()
    ref_model = copy.deepcopy(model)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc", capture="hooks", damping=0.1,
                             generator=torch.Generator().manual_seed(7), **kw)
    user_step(model, pre, x, y, retain_graph=retain_graph, targets=y)
    ref = block_factors(ref_model, x, "softmax_cross_entropy", fisher="mc", targets=y,
                        generator=torch.Generator().manual_seed(7), **kw)
    assert_factors_close(pre.factors.current, ref)


def test_mc_hooks_mlp_by_hand():
    """A and G of each Linear layer computed by hand: ā = [a; 1] from an explicit forward, y drawn
    as SoftmaxCrossEntropy.sample draws (same generator state), g = ∂(Σ_n ℓ_n(y_n))/∂s."""
    model, x, y = mlp_problem(m=16)
    pre = KFACPreconditioner(model, loss="sigmoid_cross_entropy", fisher="mc", capture="hooks", damping=0.1,
                             generator=torch.Generator().manual_seed(3))
    for p in model.parameters():
        p.grad = None
    t = torch.rand(16, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    loss = F.binary_cross_entropy_with_logits(model(x), t, reduction="sum") / 16  # mean over the 16 terms
    loss.backward(retain_graph=True)
    pre.step()
    lins = [m for m in model if isinstance(m, nn.Linear)]
    a, s = x, []
    acts = []
    for i, lin in enumerate(lins):
        acts.append(torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], 1).detach())
        out = a @ lin.weight.T + lin.bias
        s.append(out)
        a = torch.tanh(out) if i < len(lins) - 1 else out
    yy = torch.bernoulli(torch.sigmoid(a.detach()), generator=torch.Generator().manual_seed(3))
    gs = torch.autograd.grad(F.binary_cross_entropy_with_logits(a, yy, reduction="sum"), s)
    for f, ab, g in zip(pre.factors.current, acts, gs):
        torch.testing.assert_close(f.A, ab.T @ ab / 16, **TIGHT)
        torch.testing.assert_close(f.G, g.T @ g / 16, **TIGHT)


# -------------------------------------------------------------------------- no extra forward
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_no_extra_forward(fisher):
    model, x, y = cnn_problem()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks",
                             unsupported="diagonal")
    for xb, yb in batches(x, y, 3):
        user_step(model, pre, xb, yb, retain_graph=fisher == "mc", targets=yb)
    assert len(calls) == 3  # the user's three forwards, none of K-FAC's
    assert pre.k == 4


# ------------------------------------------------------------------------------------ scaling
def test_sum_loss_and_grad_scale():
    """loss_reduction='sum' with a summed loss, and a loss multiplied by S with grad_scale=S, give
    the factors of the plain mean loss."""
    model, x, y = mlp_problem()
    runs = []
    for mode in ("mean", "sum", "scaled"):
        mdl = copy.deepcopy(model)
        pre = KFACPreconditioner(mdl, loss="softmax_cross_entropy", fisher="empirical", capture="hooks",
                                 loss_reduction="sum" if mode == "sum" else "mean")
        for p in mdl.parameters():
            p.grad = None
        z = mdl(x)
        loss = {"mean": F.cross_entropy(z, y), "sum": F.cross_entropy(z, y, reduction="sum"),
                "scaled": 1024.0 * F.cross_entropy(z, y)}[mode]
        loss.backward()
        pre.step(targets=y, grad_scale=1024.0 if mode == "scaled" else 1.0)
        runs.append(pre)
    for other in runs[1:]:
        assert_factors_close(other.factors.current, runs[0].factors.current)


def test_wrong_scale_is_refused_with_the_fix():
    model, x, y = mlp_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    F.cross_entropy(model(x), y, reduction="sum").backward()  # a sum, declared as a mean
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        pre.step(targets=y)
    assert pre.factors is None
    # BCE's default reduction averages over m·k elements, not the m loss terms: refused ...
    model, x, _ = mlp_problem()
    t = torch.rand(x.shape[0], 3, dtype=D)
    pre = KFACPreconditioner(model, loss="sigmoid_cross_entropy", fisher="empirical", capture="hooks")
    F.binary_cross_entropy_with_logits(model(x), t).backward()
    with pytest.raises(ValueError, match="grad_scale"):
        pre.step(targets=t)
    # ... and accepted with grad_scale = 1/k (k = 3 outputs per term)
    for p in model.parameters():
        p.grad = None
    F.binary_cross_entropy_with_logits(model(x), t).backward()
    pre.step(targets=t, grad_scale=1 / 3)
    ref = block_factors(copy.deepcopy(model), x, "sigmoid_cross_entropy", fisher="empirical", targets=t)
    assert_factors_close(pre.factors.current, ref)


def test_ignored_terms_need_targets():
    model, ids, tgt = lm_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    ce(model(ids), tgt).backward()
    with pytest.raises(ValueError, match=r"pre.step\(targets=y\)"):
        pre.step()
    # without ignored terms, step() needs nothing: N = every output position
    model, x, y = mlp_problem()
    ref_model = copy.deepcopy(model)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    user_step(model, pre, x, y)
    assert_factors_close(pre.factors.current,
                         block_factors(ref_model, x, "softmax_cross_entropy", fisher="empirical", targets=y))


# --------------------------------------------------------------------- gradient accumulation
def test_accumulation_pools_micro_batches():
    """Two micro-batches, each loss halved, one step = one step on the whole batch (an MLP: no
    batch coupling); targets as a list per pass."""
    model, x, y = mlp_problem(m=24)
    whole = copy.deepcopy(model)
    pre_w = KFACPreconditioner(whole, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    user_step(whole, pre_w, x, y, targets=y)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    for p in model.parameters():
        p.grad = None
    for sl in (slice(0, 12), slice(12, 24)):
        (0.5 * ce(model(x[sl]), y[sl])).backward()
    with pytest.raises(ValueError, match="list with one tensor per pass"):
        pre.step(targets=y)
    for p in model.parameters():  # the failed step dropped the passes: record them again
        p.grad = None
    for sl in (slice(0, 12), slice(12, 24)):
        (0.5 * ce(model(x[sl]), y[sl])).backward()
    pre.step(targets=[y[:12], y[12:]], grad_scale=0.5)
    assert_factors_close(pre.factors.current, pre_w.factors.current)
    for a, b in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------ what is recorded
def test_no_grad_paused_and_unbackpropagated_forwards_are_not_used():
    model, x, y = mlp_problem()
    ref_model = copy.deepcopy(model)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    with torch.no_grad():
        model(x[:5])
    with pre.paused():
        ce(model(x[:7]), y[:7]).backward()  # e.g. a validation pass with grad: not recorded
    for p in model.parameters():
        p.grad = None
    model.eval()
    model(x[:3])  # grad enabled, never backpropagated: dropped at step
    model.train()
    ce(model(x), y).backward()
    pre.step(targets=y)
    assert_factors_close(pre.factors.current,
                         block_factors(ref_model, x, "softmax_cross_entropy", fisher="empirical", targets=y))


def test_internal_passes_are_not_recorded():
    model, x, y = mlp_problem()
    blocks = find_blocks(model)
    cap = HookCapture(model, blocks, record_grads=True)
    sampled_statistics(model, blocks, x, get_loss("softmax_cross_entropy"), fisher="empirical", targets=y)
    block_factors(model, x, "softmax_cross_entropy", fisher="mc", generator=torch.Generator().manual_seed(0))
    assert cap.passes == [] and cap.stray == []
    cap.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_recorded_tensors_are_released_at_step():
    model, x, y = mlp_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc", capture="hooks")
    loss = ce(model(x), y)
    loss.backward(retain_graph=True)
    refs = [weakref.ref(t) for p in pre._hooks.passes for t in p.inputs + p.outputs + [p.z, p.gz] if t is not None]
    assert refs
    pre.step(targets=y)
    del loss
    gc.collect()
    assert pre._hooks.passes == []
    assert all(r() is None for r in refs)


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_fix():
    model, x, y = mlp_problem()
    with pytest.raises(ValueError, match="unknown capture"):
        KFACPreconditioner(model, loss="softmax_cross_entropy", capture="module")
    with pytest.raises(ValueError, match="tau1=1"):
        KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", tau1=0.5)
    with pytest.raises(ValueError, match="capture='hooks' only"):
        KFACPreconditioner(model, loss="softmax_cross_entropy", loss_reduction="sum")
    with pytest.raises(ValueError, match="unknown loss_reduction"):
        KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", loss_reduction="none")
    pass_pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    with pytest.raises(TypeError, match="capture='hooks'"):
        pass_pre.step()

    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc", capture="hooks")
    with pytest.raises(RuntimeError, match="backward"):  # no .grad yet
        pre.step()
    ce(model(x), y).backward()
    pre.step(targets=y)  # no retain_graph: the sampled backward ran inside the user's
    with pytest.raises(RuntimeError, match="nothing recorded"):
        pre.step()
    ce(model(x), y).backward()
    with pytest.raises(ValueError, match="inputs has 5 rows"):
        pre.step(x[:5], y)
    ce(model(x), y).backward()
    with pytest.raises(ValueError, match="grad_scale"):
        pre.step(targets=y, grad_scale=0.0)
    model[0](x)  # a layer called outside a forward of the model
    with pytest.raises(ValueError, match="outside a forward"):
        pre.step()
    pre.remove_hooks()
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()


def test_weight_sharing_in_a_recorded_pass_is_refused():
    lin = nn.Linear(4, 4).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    pre = KFACPreconditioner(model, loss="squared_error", fisher="empirical", capture="hooks")
    (0.5 * (model(torch.randn(6, 4, dtype=D)) ** 2).sum(1).mean()).backward()
    with pytest.raises(ValueError, match="called 2 times"):
        pre.step()


def test_overflow_leaves_grad_factors_and_k():
    model, x, y = mlp_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
    user_step(model, pre, x, y, targets=y)
    before = [t.clone() for _, t in all_factors(pre)]
    for p in model.parameters():
        p.grad = None
    ce(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    grads = [p.grad.clone() for p in model.parameters()]
    pre.step(targets=y)
    assert pre.k == 2
    for a, (_, b) in zip(before, all_factors(pre)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0, equal_nan=True)
    assert pre._hooks.passes == []


# ------------------------------------------------------------------------------- state / hooks
def test_state_dict_round_trip_and_context():
    model, x, y = cnn_problem()
    twin = copy.deepcopy(model)
    kw = dict(loss="softmax_cross_entropy", fisher="mc", capture="hooks", unsupported="diagonal",
              generator=torch.Generator().manual_seed(0))
    pre = KFACPreconditioner(model, **kw)
    data = batches(x, y, 3)
    for xb, yb in data[:2]:
        user_step(model, pre, xb, yb, retain_graph=True, targets=yb)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    twin.load_state_dict(model.state_dict())
    with KFACPreconditioner(twin, **dict(kw, generator=torch.Generator())) as pre2:
        pre2.load_state_dict(torch.load(buf, weights_only=False))
        assert pre2.k == 3
        xb, yb = data[2]
        user_step(model, pre, xb, yb, retain_graph=True, targets=yb)
        user_step(twin, pre2, xb, yb, retain_graph=True, targets=yb)
        assert_factors_close(pre2.factors.current, pre.factors.current)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **TIGHT)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in twin.modules())
    assert not pre2._hooks.armed


def test_bare_layer_model_needs_a_wrapper():
    with pytest.raises(ValueError, match="wrap it"):
        KFACPreconditioner(nn.Linear(3, 2).double(), loss="squared_error", capture="hooks")
    pre = KFACPreconditioner(nn.Linear(3, 2).double(), loss="squared_error")  # capture="pass" as before
    with pre.paused():  # a no-op there
        pass


def test_mc_targets_must_ignore_the_terms_the_loss_ignored():
    """The sampled loss leaves out the terms the user's loss ignored (zero rows of its output
    gradient); targets that ignore other terms are refused."""
    model, x, y = lm_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc", capture="hooks", loss_reduction="sum")
    y2 = y.clone()
    y2[0, 0] = -100  # a term the loss kept (a sum loss: the scale check cannot tell)
    assert int(y[0, 0]) != -100
    z = model(x)
    F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum").backward()
    with pytest.raises(ValueError, match="terms the targets keep are not those your loss kept"):
        pre.step(targets=y2)
