"""KFAC as a torch.optim.Optimizer: ``loss.backward(); opt.step()`` (and ``step(closure)``)
replays the batch of the user's forward and must reproduce ``step(inputs, targets)`` from the
same seed (both inverses, with rejected steps in the run); ``lr`` in the param group multiplies
the final step, so a scheduler halving it halves the step; the torch keys of state_dict.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC

from dense import mlp

D = torch.float64
STEPS = 12


class Labelled(nn.Module):
    """A model called as ``model(x=..., labels=...)``, as Hugging Face Trainer calls its models
    (the labels ride along in the batch; this one ignores them)."""

    def __init__(self):
        super().__init__()
        self.net = mlp([5, 8, 6, 3], nn.Tanh, seed=0)

    def forward(self, x, labels=None):
        return self.net(x)


def data(n=STEPS, m=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, 5, dtype=D, generator=g), torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make(inverse, **kw):
    model = Labelled()
    opt = KFAC(model, loss="softmax_cross_entropy", inverse=inverse, generator=torch.Generator().manual_seed(0),
               T3=2, **kw)
    return model, opt


REJECT_AT = (5, 9)


@pytest.fixture
def rejections(monkeypatch):
    """The objective after the step is reported 1 higher at iterations REJECT_AT: ρ < 0 rejects
    them (θ restored, δ₀ dropped, λ raised), in both runs alike."""
    real = KFAC._objective

    def objective(self, inputs, targets, params=None):
        return real(self, inputs, targets, params) + (1.0 if params is None and self.k in REJECT_AT else 0.0)

    monkeypatch.setattr(KFAC, "_objective", objective)


@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("how", ["targets", "callable", "closure"])
def test_backward_then_step_equals_step_inputs_targets(inverse, how, rejections):
    ref_model, ref = make(inverse)
    rejected = 0
    for x, y in data():
        rejected += bool(ref.step({"x": x, "labels": y}, y)["rejected"])
    assert rejected == len(REJECT_AT)

    model, opt = make(inverse, targets=(lambda b: b["labels"]) if how != "targets" else None)
    for x, y in data():
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x=x, labels=y), y)
            loss.backward()
            return loss

        if how == "closure":
            loss = opt.step(closure=closure)
            assert torch.is_tensor(loss) and opt.last_stats["k"] == opt.k - 1
        else:
            closure()
            opt.step(targets=y) if how == "targets" else opt.step()
    assert opt.total_rejections == rejected
    assert (params(model) - params(ref_model)).abs().max() <= 1e-10
    assert (params(model) - params(Labelled())).abs().max() > 1e-2  # it trained


@pytest.mark.parametrize("momentum", [True, False])
def test_scheduler_halving_lr_halves_the_step(momentum):
    model, opt = make("block_diagonal", momentum=momentum, reject_steps=False)
    batches = data(4)
    for x, y in batches[:3]:
        opt.step({"x": x, "labels": y}, y)
    twin = copy.deepcopy(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(twin, lambda k: 0.5)
    assert twin.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 1.0
    x, y = batches[3]
    before = params(model)
    s1 = opt.step({"x": x, "labels": y}, y)
    s2 = twin.step({"x": x, "labels": y}, y)
    assert not s1["rejected"] and not s2["rejected"]
    d1, d2 = params(model) - before, params(twin.model) - before
    assert d1.norm() > 1e-3
    assert (d2 - 0.5 * d1).abs().max() <= 1e-12 * d1.abs().max() + 1e-15
    # M follows the step taken: M(δ/2) = ½∇ᵀδ + ¼δᵀCδ; with the unconstrained α (no momentum
    # here has δ the minimiser along Δ) ∇ᵀδ = 2M(δ), so M(δ/2) = 3/4 M(δ)
    if not momentum:
        assert float(s2["M"]) == pytest.approx(0.75 * float(s1["M"]), rel=1e-9)
    sched.step()


def test_is_a_torch_optimizer_with_torch_state_dict_keys():
    model, opt = make("block_diagonal")
    assert isinstance(opt, torch.optim.Optimizer)
    assert sorted(id(p) for p in opt.param_groups[0]["params"]) == sorted(id(p) for p in model.parameters())
    x, y = data(1)[0]
    F.cross_entropy(model(x=x), y).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step({"x": x, "labels": y}, y)
    sched.step()
    sd = opt.state_dict()
    assert sd["state"] == {} and sd["param_groups"][0]["lr"] == 0.5 and sd["kind"] == "KFAC"
    _, fresh = make("block_diagonal")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 0.5 and fresh.k == opt.k
    old = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}  # a checkpoint from before
    _, older = make("block_diagonal")
    older.load_state_dict(old)
    assert older.param_groups[0]["lr"] == 1.0 and older.k == opt.k


def test_errors_name_the_fix():
    model, opt = make("block_diagonal")
    with pytest.raises(RuntimeError, match="none was recorded"):
        opt.step()
    x, y = data(1)[0]
    F.cross_entropy(model(x=x), y).backward()
    with pytest.raises(ValueError, match="needs the targets"):
        opt.step()
    with torch.no_grad():
        model(x=x)  # not recorded
    with pytest.raises(RuntimeError, match="none was recorded"):
        opt.step(targets=y)
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match="must be positive"):
        opt.step({"x": x, "labels": y}, y)
    assert opt.k == 1
