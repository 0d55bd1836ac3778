"""KFACConfig(Tq=...): the exact-Fisher quadratic forms of M (Sec 6.4, 7) on every Tq-th
iteration only.

Every step must be δ = αΔ + µδ₀ with (α, µ) the minimiser of M (|µ| ≤ mu_max), Δ =
−((Ā + πγI) ⊗ (G + γ/π I))⁻¹∇h per block and δ₀ the previous step. On exact checks M's Γ is
[Δ, δ₀]ᵀF[Δ, δ₀] with the exact Fisher; between them Γ_ab = q_ab‖d_a‖‖d_b‖ with the last check's
quotients q. Everything is recomputed densely in float64 from the model (autograd gradient, the
dense exact Fisher, θ differences) and the running factors (torch.kron and a solve), not with the
optimizer's inverse or quadratic-model code."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kfac_fast.phases.proposal as proposal
from kfac_fast import KFAC
from kfac_fast.config import KFACConfig

from dense import blocks_to_vec, exact_fisher, mlp, vec

D = torch.float64


def _block_params(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def _theta(model):
    """Per linear layer the (d_out, d_in + 1) matrix [W | b] (the homogeneous coordinate last)."""
    return [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).clone() for m in _block_params(model)]


def _grad_h(model, x, y, eta):
    """∇h of h = mean cross-entropy + η/2‖θ‖², per layer as [∇W | ∇b], by autograd."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [torch.cat([m.weight.grad + eta * m.weight.detach(), (m.bias.grad + eta * m.bias.detach())[:, None]], 1)
            for m in _block_params(model)]


def _dense_Delta(factors, grads, gamma):
    """−F̆⁻¹∇h block by block: (Ā + πγI) ⊗ (G + γ/π I) with π the trace norm of Sec 6.3, solved densely."""
    out = []
    for (A, G), g in zip(factors, grads):
        pi = math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))
        Ad = A + pi * gamma * torch.eye(A.shape[0], dtype=D)
        Gd = G + gamma / pi * torch.eye(G.shape[0], dtype=D)
        out.append(-torch.linalg.solve(torch.kron(Ad, Gd), vec(g)).reshape(A.shape[0], G.shape[0]).t())
    return out


def _dot(a, b):
    return sum(float((u * v).sum()) for u, v in zip(a, b))


def _run(Tq, iters, seed=0, counter=None):
    torch.manual_seed(seed)
    model = mlp([6, 8, 4], nn.Tanh, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = KFACConfig(Tq=Tq, T3=20, T2=20)
    opt = KFAC(model, loss="softmax_cross_entropy", config=cfg, generator=gen)
    data = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(64, 6, generator=data, dtype=D)
    Y = torch.randint(0, 4, (64,), generator=data)
    return model, opt, X, Y


def _solve(gram, dots, b, damping, mu_max):
    """argmin over (α, µ) of ½cᵀ(Γ + damping·D)c + bᵀc, |µ| ≤ mu_max: dense float64, no kfac_fast code."""
    Q = gram + damping * dots
    if Q.shape[0] == 1:
        a = float(-b[0] / Q[0, 0])
        return a, 0.0, 0.5 * a * float(b[0])
    c = torch.linalg.solve(Q, -b)
    a, m = float(c[0]), float(c[1])
    if abs(m) > mu_max:
        m = math.copysign(mu_max, m)
        a = float(-(b[0] + Q[0, 1] * m) / Q[0, 0])
    cc = torch.tensor([a, m], dtype=D)
    return a, m, float(0.5 * cc @ Q @ cc + b @ cc)


def test_steps_between_exact_checks_predict_gamma_from_the_last_check(monkeypatch):
    """Exact checks at k = 1, 2 (first δ₀), 3, 6; the other steps solve M with Γ predicted from
    the last check's quotients q_ab = Γ_ab/(‖d_a‖‖d_b‖), Γ computed here from the dense exact
    Fisher on the whole batch (S₂ is the whole batch: 16 rows < tau2_min_rows)."""
    calls = []
    real = proposal.fisher_gram
    monkeypatch.setattr(proposal, "fisher_gram", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, opt, X, Y = _run(Tq=3, iters=8)
    cfg = opt.config
    eta = cfg.weight_decay
    sizes = [(m.out_features, m.in_features + 1) for m in _block_params(model)]
    q = None  # the last exact check's quotients, computed here
    prev_delta = None
    factors = None  # the running factors the current inverse was built from (refreshes at k ≤ 3 only)
    checked = 0
    for k in range(1, 9):
        rows = torch.arange(16 * (k - 1), 16 * k) % 64
        x, y = X[rows], Y[rows]
        before = _theta(model)
        grads = _grad_h(model, x, y, eta)
        Fisher = exact_fisher(model, x, "softmax_cross_entropy").detach()
        lam = opt.lambda_
        n_calls = len(calls)
        s = opt.step(x, y)
        assert not bool(s["rejected"]), f"step {k} was rejected: the check below needs accepted steps"
        delta = [a - b for a, b in zip(_theta(model), before)]
        exact = k in (1, 2) or k % 3 == 0
        assert (len(calls) > n_calls) == exact, f"iteration {k}: exact-Fisher passes {len(calls) - n_calls}"
        if bool(s["refreshed"]):  # a refresh (k ≤ 3) builds the inverse from the factors committed at k
            factors = [(f.A.clone(), f.G.clone()) for f in opt.factors.current]
        Delta = _dense_Delta(factors, grads, float(s["gamma"]))
        dirs = [blocks_to_vec(Delta)] + ([] if prev_delta is None else [blocks_to_vec(prev_delta)])
        n = len(dirs)
        dots = torch.tensor([[float(u @ v) for v in dirs] for u in dirs], dtype=D)
        norms = torch.sqrt(torch.diagonal(dots))
        b = torch.tensor([float(blocks_to_vec(grads) @ d) for d in dirs], dtype=D)
        if exact:
            gram = torch.stack([torch.stack([u @ Fisher @ v for v in dirs]) for u in dirs])
            q = gram / (norms[:, None] * norms[None, :])
        else:
            gram = q * (norms[:, None] * norms[None, :])
        alpha, mu, M = _solve(gram, dots, b, lam + eta, cfg.mu_max)
        assert float(s["alpha"]) == pytest.approx(alpha, rel=1e-6)
        assert float(s["mu"]) == pytest.approx(mu, rel=1e-6, abs=1e-12)
        assert float(s["M"]) == pytest.approx(M, rel=1e-6)
        expected = [alpha * d for d in Delta] if n == 1 else [alpha * d + mu * d0 for d, d0 in zip(Delta, prev_delta)]
        for e, d in zip(expected, delta):
            torch.testing.assert_close(d, e, rtol=1e-6, atol=1e-12)
        checked += not exact
        prev_delta = delta
    assert checked == 4  # iterations 4, 5, 7, 8


def test_Tq_1_runs_the_exact_model_every_iteration(monkeypatch):
    calls = []
    real = proposal.fisher_gram
    monkeypatch.setattr(proposal, "fisher_gram", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, opt, X, Y = _run(Tq=1, iters=5)
    for k in range(1, 6):
        rows = torch.arange(16 * (k - 1), 16 * k) % 64
        opt.step(X[rows], Y[rows])
    assert len(calls) == 5


def test_gamma_candidate_iterations_are_exact(monkeypatch):
    """The γ choice (Sec 6.6) compares exact M values: a T2 iteration checks exactly whatever Tq is."""
    calls = []
    real = proposal.fisher_gram
    monkeypatch.setattr(proposal, "fisher_gram", lambda *a, **kw: calls.append(opt.k) or real(*a, **kw))
    torch.manual_seed(0)
    model = mlp([6, 8, 4], nn.Tanh, seed=0)
    opt = KFAC(model, loss="softmax_cross_entropy", config=KFACConfig(Tq=7, T2=4, T3=4),
               generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        opt.step(torch.randn(16, 6, generator=gen, dtype=D), torch.randint(0, 4, (16,), generator=gen))
    # k = 1 (nothing stored), 2 (the first δ₀), 4 and 8 (γ candidates), 7 (k ≡ 0 mod Tq)
    assert sorted(set(calls)) == [1, 2, 4, 7, 8]


def test_checkpoint_between_exact_checks_resumes_the_same_trajectory():
    model, opt, X, Y = _run(Tq=4, iters=0)
    batches = [(X[16 * i:16 * (i + 1)], Y[16 * i:16 * (i + 1)]) for i in range(4)] * 2
    for x, y in batches[:5]:
        opt.step(x, y)
    state = opt.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    for x, y in batches[5:]:
        opt.step(x, y)
    want = _theta(model)
    model2, opt2, _, _ = _run(Tq=4, iters=0)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(state)
    for x, y in batches[5:]:
        opt2.step(x, y)
    for a, b in zip(_theta(model2), want):
        assert torch.equal(a, b)


def test_Tq_validation():
    with pytest.raises(ValueError, match="Tq must be a positive integer"):
        KFACConfig(Tq=0)
    assert KFACConfig.paper().Tq == 1
