"""KFACPreconditioner.attach(optimizer): a step pre-hook preconditions ``.grad`` inside every
``optimizer.step()``.

Reference: the same loop calling ``pre.step(...)`` by hand before ``optimizer.step()`` (the
documented manual recipe), from the same seeds; the attached run must follow it to 1e-12 in
float64 under torch.optim.SGD, AdamW and LR schedulers, with gradient clipping, and under a
GradScaler without any grad_scale argument it must follow the unscaled run.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner

from dense import mlp

D = torch.float64
STEPS = 20


def data(n: int = STEPS, m: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, 5, dtype=D, generator=g), torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def make_opt(kind: str, params):
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.1 * k))
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def run(kind: str, *, capture: str, fisher: str, attached: bool, clip: float = 0.0, scaler=None):
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2, fisher=fisher, capture=capture,
                             T3=3, generator=torch.Generator().manual_seed(0))
    opt, sched = make_opt(kind, model.parameters())
    if attached:
        pre.attach(opt, grad_scaler=scaler)
    for x, y in data():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            loss = scaler.scale(loss)
        loss.backward(retain_graph=capture == "hooks" and fisher == "mc")
        if scaler is not None:
            scaler.unscale_(opt)
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if attached:
            pre.set_targets(y)
        else:
            pre.step(x if capture == "pass" else None, y)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
    return model, pre, opt


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("capture,fisher", [("pass", "mc"), ("hooks", "empirical"), ("hooks", "mc")])
def test_attached_equals_manual_step(kind, capture, fisher):
    clip = 0.5 if kind == "sgd" else 0.0  # clipping before the step: the hook sees the clipped gradient
    ref, pre_ref, _ = run(kind, capture=capture, fisher=fisher, attached=False, clip=clip)
    got, pre, opt = run(kind, capture=capture, fisher=fisher, attached=True, clip=clip)
    start = params(mlp([5, 7, 6, 3], nn.Tanh, seed=0))
    moved = (params(ref) - start).norm()
    assert moved > 1e-2  # the run trains: equality is not that of two untouched models
    assert (params(got) - params(ref)).abs().max() <= 1e-12
    assert pre.k == pre_ref.k == STEPS + 1
    # the optimizer keeps its own contract: state_dict round trip, schedulers' lr in param_groups
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert set(sd) == {"state", "param_groups"}


def test_attached_differs_from_plain_optimizer():
    """The hook really preconditions: without it, the run is another one."""
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    plain = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", fisher="empirical")
    opt, opt2 = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(plain.parameters(), lr=0.05)
    pre.attach(opt)
    for net, o in ((model, opt), (plain, opt2)):
        x, y = data(1)[0]
        o.zero_grad()
        F.cross_entropy(net(x), y).backward()
        o.step()
    assert (params(model) - params(plain)).abs().max() > 1e-4
    # detach(): the next step is the plain optimizer's
    pre.detach()
    before = params(model)
    g = None
    for _ in range(1):
        x, y = data(1, seed=3)[0]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
    assert torch.allclose(params(model), before - 0.05 * g, rtol=0, atol=1e-14)


@pytest.mark.parametrize("capture,fisher", [("pass", "mc"), ("hooks", "empirical")])
def test_grad_scaler_without_grad_scale_equals_unscaled(capture, fisher):
    """GradScaler("cpu"): scaler.step unscales .grad and then calls optimizer.step, whose pre-hook
    preconditions the unscaled gradient; capture="hooks" reads the scale from the scaler itself."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=5)
    ref, _, _ = run("sgd", capture=capture, fisher=fisher, attached=False)
    got, _, _ = run_scaled(capture, fisher, scaler)
    assert scaler.get_scale() > 2.0 ** 10  # the scale grew during the run: not a constant factor
    assert (params(got) - params(ref)).abs().max() <= 1e-12


def run_scaled(capture, fisher, scaler):
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2, fisher=fisher, capture=capture,
                             T3=3, generator=torch.Generator().manual_seed(0))
    opt, sched = make_opt("sgd", model.parameters())
    pre.attach(opt, grad_scaler=scaler)
    for x, y in data():
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        pre.set_targets(y)
        scaler.step(opt)  # unscale_ + optimizer.step() (pre-hook first)
        scaler.update()
        sched.step()
    return model, pre, opt


def test_grad_scaler_overflow_skips_and_drops_the_pass():
    """An overflow iteration: GradScaler skips optimizer.step (so the hook does not run); its
    recorded pass (inf derivatives) must not poison the next step's factors."""
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", fisher="empirical")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    pre.attach(opt, grad_scaler=scaler)
    (x, y), (x2, y2) = data(2)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert pre.k == 1  # skipped
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    pre.set_targets([y, y2])  # the targets of both recorded passes: the stale one is dropped with its pass
    scaler.step(opt)
    scaler.update()
    assert pre.k == 2
    assert all(torch.isfinite(t).all() for t in pre.factors.tensors())
    assert torch.isfinite(params(model)).all()


def test_attach_refuses_optimizer_without_the_parameters():
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", fisher="empirical")
    with pytest.raises(ValueError, match="does not update the parameters"):
        pre.attach(torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pre.attach(object())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        pre.attach(opt)


def test_attach_pass_without_forward_names_the_fix():
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre.attach(opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no forward of the model"):
        opt.step()


def test_gradient_accumulation_attached_equals_manual():
    """Two micro-batches per step, each loss divided by 2 (grad_scale=1/2 at attach)."""
    def go(attached):
        model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
        pre = KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", fisher="empirical",
                                 generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if attached:
            pre.attach(opt, grad_scale=0.5)
        batches = data(2 * 6)
        for i in range(0, len(batches), 2):
            opt.zero_grad()
            for x, y in batches[i:i + 2]:
                (F.cross_entropy(model(x), y) / 2).backward()
            ys = [batches[i][1], batches[i + 1][1]]
            if attached:
                pre.set_targets(ys)
            else:
                pre.step(targets=ys, grad_scale=0.5)
            opt.step()
        return params(model)
    assert (go(True) - go(False)).abs().max() <= 1e-12


@pytest.mark.parametrize("positional", [True, False])
def test_step_with_closure_preconditions_after_the_closure(positional):
    """optimizer.step(closure) (Lightning): the forward and backward run inside the step, after
    the pre-hook; the preconditioning must follow the closure and equal the manual loop."""
    ref, _, _ = run("sgd", capture="hooks", fisher="empirical", attached=False)
    model = mlp([5, 7, 6, 3], nn.Tanh, seed=0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=1e-2, fisher="empirical", capture="hooks",
                             T3=3, generator=torch.Generator().manual_seed(0))
    opt, sched = make_opt("sgd", model.parameters())
    pre.attach(opt)
    for x, y in data():
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pre.set_targets(y)
            return loss

        loss = opt.step(closure) if positional else opt.step(closure=closure)
        assert torch.is_tensor(loss)
        sched.step()
    assert (params(model) - params(ref)).abs().max() <= 1e-12
