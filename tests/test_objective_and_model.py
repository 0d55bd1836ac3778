"""The objective h(θ) = (1/m)Σ L + ½η‖θ‖², ρ = (h(θ+δ) − h(θ))/M(δ) and the one-direction
quadratic model (Sec 6.4, 6.5) with a LARGE weight decay η = 0.1, so that a missing η term is
visible. Everything on the right-hand sides is recomputed here: h and ∇h from our own loss
formulas and autograd, F densely from per-example Jacobians (tests/dense.py), δ from the
parameter change, the K-FAC proposal from the running factors with the Sec 6.3 damping."""
import warnings

import pytest
import torch
from torch import nn

from kfac_fast import KFAC

from dense import blocks_to_vec, exact_fisher, mlp

D = torch.float64
ETA = 0.1


def _data_loss(z, y, loss):
    if loss == "softmax_cross_entropy":
        return (torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1)).mean()
    if loss == "sigmoid_cross_entropy":  # −y log σ(z) − (1−y) log(1−σ(z)) = softplus(z) − y z
        return (nn.functional.softplus(z) - y * z).sum(1).mean()
    return (0.5 * (y - z) ** 2).sum(1).mean()


def _linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def _theta(model):
    return blocks_to_vec([torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for m in _linears(model)])


def _h_and_grad(model, x, y, loss):
    params = [p for m in _linears(model) for p in (m.weight, m.bias)]
    data = _data_loss(model(x), y, loss)
    h = data + 0.5 * ETA * sum((p ** 2).sum() for p in params)
    grads = torch.autograd.grad(h, params)
    blocks = [torch.cat([grads[2 * i], grads[2 * i + 1][:, None]], 1) for i in range(len(params) // 2)]
    return float(data.detach()), float(h.detach()), blocks


def _problem(loss, seed=0):
    model = mlp([4, 6, 3], nn.Tanh, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(5):
        x = torch.randn(16, 4, dtype=D, generator=g)
        if loss == "softmax_cross_entropy":
            y = torch.randint(0, 3, (16,), generator=g)
        elif loss == "sigmoid_cross_entropy":
            y = torch.rand(16, 3, dtype=D, generator=g)
        else:
            y = torch.randn(16, 3, dtype=D, generator=g)
        batches.append((x, y))
    return model, batches


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"])
def test_objective_rho_M_and_alpha_against_dense_recomputation(loss):
    model, batches = _problem(loss)
    opt = KFAC(model, loss=loss, weight_decay=ETA, momentum=False, T1=1, T2=1, T3=1, tau1=1.0, tau2=1.0,
               lambda_init=0.5, generator=torch.Generator().manual_seed(3))
    checked = 0
    for k, (x, y) in enumerate(batches * 2, start=1):  # 10 steps
        lam = opt.lambda_  # the λ this step's model M uses (the rule updates it afterwards)
        theta0 = _theta(model)
        data0, h0, gblocks = _h_and_grad(model, x, y, loss)
        grad = blocks_to_vec(gblocks)
        F = exact_fisher(model, x, loss).detach()  # τ₂ = 1: S₂ is the whole batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = opt.step(x, y)
        if s["rejected"]:
            continue
        assert s["loss"] == pytest.approx(data0, rel=1e-12)
        assert s["objective"] == pytest.approx(h0, rel=1e-12)  # includes ½η‖θ‖²
        delta = _theta(model) - theta0
        if float(delta.abs().max()) == 0.0:
            continue
        _, h1, _ = _h_and_grad(model, x, y, loss)
        alpha, M = s["alpha"], s["M"]
        # M(δ) − M(0) = ½ α ∇hᵀΔ with Δ = δ/α (the minimiser along Δ)
        Delta = delta / alpha
        assert M == pytest.approx(0.5 * alpha * float(grad @ Delta), rel=1e-9)
        # α = −∇hᵀΔ / (ΔᵀFΔ + (λ+η)‖Δ‖²) with the dense exact Fisher
        q = float(Delta @ F @ Delta) + (lam + ETA) * float(Delta @ Delta)
        assert alpha == pytest.approx(-float(grad @ Delta) / q, rel=1e-9)
        # ρ with h including ½η‖θ‖² before and after the step
        assert s["rho"] == pytest.approx((h1 - h0) / M, rel=1e-8)
        # Δ is the K-FAC proposal −F̆⁻¹∇h with the chosen γ (Sec 6.3 factored damping), so α itself
        # is pinned: δ = α·Δ_ref
        gamma = s["gamma"]
        ref = []
        for f, gb in zip(opt.factors.current, gblocks):
            pi = ((torch.trace(f.A) / f.A.shape[0]) / (torch.trace(f.G) / f.G.shape[0])).sqrt()
            Ad = f.A + pi * gamma * torch.eye(f.A.shape[0], dtype=D)
            Gd = f.G + gamma / pi * torch.eye(f.G.shape[0], dtype=D)
            ref.append(-torch.linalg.solve(Gd, torch.linalg.solve(Ad, gb.t()).t()))
        torch.testing.assert_close(Delta, blocks_to_vec(ref), rtol=1e-8, atol=1e-10)
        checked += 1
    assert checked >= 6
