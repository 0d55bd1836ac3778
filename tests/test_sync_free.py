"""The sync-free step: an ordinary K-FAC iteration reads nothing from the device.

Every Python-level way of moving a tensor's value to the host (``item``, ``tolist``,
``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu``, ``numpy``) is made to raise while
``KFAC.step`` runs an ordinary iteration (not a refresh, no γ candidates, no rejection-count
check); on CPU, so CI runs it. Refresh iterations and the periodic rejection check are counted
instead, and the device decisions are checked against the host rules on constructed cases.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from kfac_fast import KFAC
from kfac_fast.rules import accept, accept_t, levenberg_marquardt, levenberg_marquardt_t
from kfac_fast.rules import rejection_increase, rejection_increase_t

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class HostRead(RuntimeError):
    pass


@contextlib.contextmanager
def count_reads(forbid: bool):
    """Patch every host-read entry point of torch.Tensor; count (or forbid) the calls."""
    counts = {name: 0 for name in READS}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        real = saved[name]

        def f(self, *a, **kw):
            counts[name] += 1
            if forbid:
                raise HostRead(f"Tensor.{name} inside an ordinary KFAC.step")
            return real(self, *a, **kw)
        return f

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def _autoencoder(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 12), nn.Tanh(),
                          nn.Linear(12, 20))
    x = torch.rand(64, 20)
    return model, x, (x > 0.5).float()


def _classifier(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 5))
    x = torch.randn(32, 1, 6, 6)
    y = torch.randint(0, 5, (32,))
    y[:4] = -100  # ignored terms: N is a device count
    return model, x, y


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 11)
        self.scale = nn.Parameter(torch.ones(8))  # a diagonal block

    def forward(self, t):
        return self.out(self.norm(self.emb(t)) * self.scale)


def _tokens(seed=0):
    torch.manual_seed(seed)
    t = torch.randint(0, 11, (16, 5))
    y = torch.randint(0, 11, (16, 5))
    y[:, -1] = -100
    return _TokenModel(), t, y


PROBLEMS = {"autoencoder": (_autoencoder, "sigmoid_cross_entropy"), "conv_bn": (_classifier, "softmax_cross_entropy"),
            "tokens": (_tokens, "softmax_cross_entropy")}


def _ordinary(opt: KFAC) -> bool:
    """Whether the next step of ``opt`` is an ordinary iteration (no refresh, no γ candidates,
    no rejection-count read)."""
    cfg, k = opt.config, opt.k
    return not (k % cfg.T3 == 0 or k <= 3) and opt._unread_bound + 1 < cfg.max_rejections


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("inverse,momentum", [("block_diagonal", True), ("block_diagonal", False),
                                              ("block_tridiagonal", True)])
def test_ordinary_iterations_read_nothing_from_the_device(problem, inverse, momentum):
    make, loss = PROBLEMS[problem]
    model, x, y = make()
    opt = KFAC(model, loss=loss, inverse=inverse, momentum=momentum, T3=5, T2=10, tau1=0.5, tau2=0.5,
               generator=torch.Generator().manual_seed(0))
    ordinary = 0
    other_reads = []
    for _ in range(12):
        if _ordinary(opt):
            with count_reads(forbid=True):
                stats = opt.step(x, y)
            ordinary += 1
        else:
            with count_reads(forbid=False) as c:
                stats = opt.step(x, y)
            other_reads.append(sum(c.values()))
        # the stats are still readable afterwards (one transfer)
        assert isinstance(stats["rejected"], bool) and math.isfinite(stats["loss"])
    assert ordinary >= 6
    assert opt.total_rejections == 0


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_steps_between_exact_fisher_checks_read_nothing(problem, monkeypatch):
    """KFACConfig(Tq=3): ordinary iterations with and without the exact check stay sync-free
    (Γ predicted from stored device quotients)."""
    import kfac_fast.phases.proposal as proposal

    checks = []
    real = proposal.fisher_gram
    monkeypatch.setattr(proposal, "fisher_gram", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    make, loss = PROBLEMS[problem]
    model, x, y = make()
    opt = KFAC(model, loss=loss, Tq=3, T3=5, T2=10, tau1=0.5, tau2=0.5, generator=torch.Generator().manual_seed(0))
    predicted = 0
    for _ in range(12):
        n = len(checks)
        with count_reads(forbid=_ordinary(opt)):
            opt.step(x, y)
        predicted += len(checks) == n
    assert predicted >= 4  # a rejection between checks is a device selection too (no read)


def test_rejection_count_is_read_at_most_once_per_max_rejections_iterations():
    model, x, y = _autoencoder()
    opt = KFAC(model, loss="sigmoid_cross_entropy", T3=50, T2=50, max_rejections=4,
               generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.step(x, y)
    reads = []
    for _ in range(12):
        with count_reads(forbid=False) as c:
            opt.step(x, y)
        reads.append(sum(c.values()))
    # ordinary iterations read nothing; every max_rejections-th reads the counters once
    assert sorted(set(reads)) == [0, 1] and reads.count(1) == 3


def test_rejected_ordinary_step_is_a_selection_without_reads(monkeypatch):
    """ρ < 0 on an ordinary iteration: θ bit for bit as before, δ₀ zero, λ by Nielsen's rule,
    all decided on the device; the stats say so when read."""
    model, x, y = _autoencoder()
    opt = KFAC(model, loss="sigmoid_cross_entropy", T3=50, T2=50, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.step(x, y)
    lam, nu = opt.lambda_, opt.nu
    theta = [p.detach().clone() for p in model.parameters()]
    real = KFAC._objective
    monkeypatch.setattr(KFAC, "_objective", lambda self, i, t: real(self, i, t) + 1.0)
    with count_reads(forbid=True):
        stats = opt.step(x, y)
    assert stats["rejected"] and stats["reason"].startswith("ρ") and stats["reject_code"] == 4
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    want_lam, want_nu = rejection_increase(lam, nu, omega1=opt.config.omega1, hi=opt.config.lambda_max)
    assert opt.lambda_ == pytest.approx(want_lam, rel=1e-15) and opt.nu == want_nu
    assert opt.delta0 is None and all(bool((d == 0).all()) for d in opt._delta0)


def test_non_finite_ordinary_step_keeps_factors_without_reads():
    model, x, y = _autoencoder()
    opt = KFAC(model, loss="sigmoid_cross_entropy", T3=50, T2=50, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.step(x, y)
    cur = [t.clone() for f in opt.factors.current for t in (f.A, f.G)]
    theta = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[:, 0] = float("nan")
    with count_reads(forbid=True):
        stats = opt.step(bad, y)
    assert stats["rejected"] and stats["reason"] == "non-finite loss"
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(cur, [t for f in opt.factors.current for t in (f.A, f.G)]))
    assert not opt.step(x, y)["rejected"]


@pytest.mark.parametrize("rho", [-1.0, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 2.0, math.nan, math.inf])
def test_device_rules_equal_host_rules(rho):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for lam in (1e-9, 1e-3, 1.0, 1e9):
        want = levenberg_marquardt(lam, rho, 0.95, lo=1e-8, hi=1e8)
        assert float(levenberg_marquardt_t(t(lam), t(rho), 0.95, lo=1e-8, hi=1e8)) == want
        for nu in (2.0, 0.5):
            wl, wn = rejection_increase(lam, nu, omega1=0.95, hi=1e8)
            gl, gn = rejection_increase_t(t(lam), t(nu), omega1=0.95, hi=1e8)
            assert (float(gl), float(gn)) == (wl, wn)
    assert bool(accept_t(t(rho), rho_min=0.0)) == accept(rho, rho_min=0.0)


def test_the_read_trap_catches_reads():
    """The trap is not vacuous: each entry point raises, and a refresh iteration (which reads
    the device for the inverse) is caught by it."""
    t = torch.tensor([1.5])
    with count_reads(forbid=True):
        for f in (lambda: t.item(), lambda: t.tolist(), lambda: bool(t), lambda: float(t), lambda: int(t),
                  lambda: t.cpu(), lambda: t.numpy(), lambda: [0, 1][torch.tensor(1)]):
            with pytest.raises(HostRead):
                f()
    model, x, y = _autoencoder()
    opt = KFAC(model, loss="sigmoid_cross_entropy", generator=torch.Generator().manual_seed(0))
    with count_reads(forbid=True), pytest.raises(HostRead):
        opt.step(x, y)  # k = 1: a refresh


def test_compiled_decisions_equal_eager_without_graph_breaks():
    """KFAC(compile=True): the step's decisions under torch.compile(fullgraph=True) (a graph break
    would raise) give the same trajectory as eager, rejections included."""
    import torch._dynamo as dynamo

    def run(compile):
        model, x, y = _autoencoder()
        opt = KFAC(model, loss="sigmoid_cross_entropy", T3=5, T2=10, compile=compile,
                   generator=torch.Generator().manual_seed(0))
        out = []
        for i in range(8):
            xb = x.clone()
            if i == 6:
                xb[0, 0] = float("nan")  # a rejected step
            s = opt.step(xb, y)
            out.append((s["rejected"], s["lambda_"]))
        return out, [p.detach().clone() for p in model.parameters()]

    dynamo.reset()
    eager, pe = run(False)
    comp, pc = run(True)
    assert [r for r, _ in eager] == [r for r, _ in comp] and eager[6][0]
    for (_, a), (_, b) in zip(eager, comp):
        assert a == pytest.approx(b, rel=1e-12)
    for a, b in zip(pe, pc):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tau1_one_reuses_the_gradient_forward(monkeypatch):
    """τ₁ = 1: the sampled-target backward runs through the gradient pass's graph: one forward
    per iteration fewer than a separate statistics pass, and the factors are the empirical-Fisher
    factors of the batch with the targets sampled in that step."""
    import kfac_fast.curvature.losses as losses
    from kfac_fast.curvature import kronecker_factors

    def forwards(reuse: bool) -> int:
        model, x, y = _autoencoder()
        calls = []
        model.register_forward_pre_hook(lambda m, a: calls.append(1))
        with monkeypatch.context() as mp:
            mp.setattr(KFAC, "_reuse_forward", lambda self: reuse)
            opt = KFAC(model, loss="sigmoid_cross_entropy", tau1=1.0, T3=50, T2=50,
                       generator=torch.Generator().manual_seed(0))
            for _ in range(4):
                opt.step(x, y)
            calls.clear()
            opt.step(x, y)
        return len(calls)

    assert forwards(False) - forwards(True) == 1

    model, x, y = _autoencoder()
    opt = KFAC(model, loss="sigmoid_cross_entropy", tau1=1.0, ema_max=0.0, T3=50, T2=50,
               generator=torch.Generator().manual_seed(0))
    opt.step(x, y)  # k = 1 orders the layers with its own statistics pass
    drawn = []
    real = losses.sample_targets

    def spy(loss, z, generator=None, like=None):
        out = real(loss, z, generator, like=like)
        drawn.append(out.clone())
        return out

    theta = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(losses, "sample_targets", spy)
    s = opt.step(x, y)  # reuses the gradient forward; ema_max = 0: the factors are this batch's
    monkeypatch.setattr(losses, "sample_targets", real)
    assert not s["rejected"] and len(drawn) == 1
    probe = _autoencoder()[0]
    with torch.no_grad():
        for p, t in zip(probe.parameters(), theta):
            p.copy_(t)
    want = kronecker_factors(probe, x, "sigmoid_cross_entropy", fisher="empirical", targets=drawn[0])
    for f, w in zip(opt.factors.current, want):
        torch.testing.assert_close(f.A, w.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.G, w.G, rtol=1e-5, atol=1e-6)
