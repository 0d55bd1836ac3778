"""The exact-Fisher quadratic model M(δ) (Sec 6.4, Appendix C) when the loss ignores terms
(``ignore_index``): F averages Jᵀ F_R J over the unmasked terms only.

Dense float64 reference: the per-term Jacobians J_t = ∂z_t/∂θ (``torch.func.jacrev``), the
softmax F_R = diag(p) − ppᵀ, F = Σ_{unmasked t} J_tᵀ F_R J_t / N. Checked twice: the Gram
matrix of two directions, and through ``KFAC.step``: with δ = αΔ and α minimising M along Δ,
the reported M(δ) − M(0) = ½∇hᵀδ must equal the dense ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ, which holds
only when α was computed with the same F.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC
from kfac_fast.curvature import find_blocks, get_loss
from kfac_fast.quadratic import fisher_gram

IGNORE = -100


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6, 4), generator=g)
    y[torch.rand(6, 4, generator=g) < 0.4] = IGNORE
    y[0, 0] = IGNORE
    return model, x, y


def _dense_fisher(model, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def f(theta):
        ps, o = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = theta[o:o + s.numel()].reshape(s)
            o += s.numel()
        return torch.func.functional_call(model, ps, (x,)).reshape(-1, 3)

    J = torch.func.jacrev(f)(flat)  # (m·T, k, P)
    z = f(flat).detach()
    p = torch.softmax(z, -1)
    FR = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    valid = (y.reshape(-1) != IGNORE)
    Fd = torch.einsum("tkp,tkl,tlq->pq", J[valid], FR[valid], J[valid])
    return Fd / int(valid.sum())


def test_gram_of_two_directions_averages_the_unmasked_terms():
    model, x, y = _problem()
    blocks = find_blocks(model)
    g = torch.Generator().manual_seed(3)
    dirs, flat_dirs = [], []
    for _ in range(2):
        parts = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
        flat_dirs.append(torch.cat([t.reshape(-1) for t in parts]))
        # per block [W | b] (g_dim, a_dim): the weight's columns, then the bias as the last column
        dirs.append([torch.cat([parts[0], parts[1][:, None]], 1), torch.cat([parts[2], parts[3][:, None]], 1)])
    assert [tuple(d.shape) for d in dirs[0]] == [(b.g_dim, b.a_dim) for b in blocks]
    got = fisher_gram(model, blocks, x, get_loss("softmax_cross_entropy", ignore_index=IGNORE), dirs, targets=y)
    Fd = _dense_fisher(model, x, y)
    V = torch.stack(flat_dirs, 1)
    torch.testing.assert_close(got, V.T @ Fd @ V, rtol=1e-10, atol=1e-12)


def test_step_quadratic_model_uses_the_masked_fisher():
    model, x, y = _problem()
    eta = 1e-3
    opt = KFAC(model, loss="softmax_cross_entropy", momentum=False, weight_decay=eta, tau1=0.5,
               generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        lam = opt.lambda_
        theta0 = [p.detach().clone() for p in model.parameters()]
        # dense ∇h: mean over the unmasked terms + ηθ
        for p in model.parameters():
            p.grad = None
        (F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1), ignore_index=IGNORE)).backward()
        grad = torch.cat([(p.grad + eta * p.detach()).reshape(-1) for p in model.parameters()])
        Fd = _dense_fisher(model, x, y)
        s = opt.step(x, y)
        assert not s["rejected"]
        delta = torch.cat([(p.detach() - t).reshape(-1) for p, t in zip(model.parameters(), theta0)])
        assert float(delta.norm()) > 1e-6
        M_dense = 0.5 * delta @ (Fd @ delta) + 0.5 * (lam + eta) * delta @ delta + grad @ delta
        assert abs(float(s["M"]) - float(M_dense)) <= 1e-9 * abs(float(M_dense)), (float(s["M"]), float(M_dense))
