"""The exact-Fisher quadratic forms of Appendix C (``fisher_gram``, used for α, µ, ρ, γ) and each
loss's F_R (``fisher_inner``, ``fisher_factors``) against a dense float64 Fisher

    F = (1/m) Σ_n J_nᵀ F_R,n J_n

built here independently: J_n by torch.autograd.functional.jacobian of a hand-written forward
pass (F.linear + activations) in the flat parameter θ = [vec([W_1|b_1]); vec([W_2|b_2]); …]
(columns stacked, the package's convention), and F_R from each predictive distribution's
definition (categorical: diag(p) − ppᵀ, independent Bernoulli: diag(p(1−p)), unit Gaussian: I).
Both the plain-Sequential fast path and the hook-based forward-AD path are covered.
"""
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from kfac_fast.curvature.sequential_jvp import sequential_plan
from kfac_fast.curvature import find_layers, get_loss
from kfac_fast.quadratic import fisher_gram

D = torch.float64
LOSSES = ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]
SIZES = [3, 4, 5, 3]  # three layers with bias; k = 3 outputs
ACTS = [torch.tanh, torch.sigmoid]  # after layer 1 and layer 2


def _FR(z, loss):
    """F_R per example (m, k, k), written from the distribution's definition."""
    m, k = z.shape
    out = torch.zeros(m, k, k, dtype=D)
    for n in range(m):
        if loss == "softmax_cross_entropy":
            p = torch.exp(z[n] - z[n].max())
            p = p / p.sum()
            # Cov[e_y] for y ~ Cat(p): E[e_y e_yᵀ] − E[e_y]E[e_y]ᵀ
            out[n] = torch.diag(p) - torch.outer(p, p)
        elif loss == "sigmoid_cross_entropy":
            p = 1.0 / (1.0 + torch.exp(-z[n]))
            out[n] = torch.diag(p * (1.0 - p))  # Var of independent Bernoulli(p_j)
        elif loss == "squared_error":
            out[n] = torch.eye(k, dtype=D)  # unit-variance Gaussian
        else:
            raise ValueError(loss)
    return out


class Net(nn.Module):
    """Three Linear layers called from a hand-written forward (not an nn.Sequential, so
    ``sequential_plan`` is None and the hook-based forward-AD path runs)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = (nn.Linear(SIZES[i], SIZES[i + 1]) for i in range(3))

    def forward(self, x):
        return self.l3(torch.sigmoid(self.l2(torch.tanh(self.l1(x)))))


def _models(seed):
    torch.manual_seed(seed)
    net = Net().to(D)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(D)
    with torch.no_grad():
        for a, b in zip((net.l1, net.l2, net.l3), (seq[0], seq[2], seq[4])):
            a.weight.mul_(2.0)  # larger weights: outputs away from the linear regime of the activations
            a.bias.normal_()
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return net, seq


def _blocks(model):
    mods = [model.l1, model.l2, model.l3] if isinstance(model, Net) else [model[0], model[2], model[4]]
    return [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for m in mods]


def _vec(M):
    return M.t().reshape(-1)


def _unflatten(theta, shapes):
    out, o = [], 0
    for r, c in shapes:
        out.append(theta[o: o + r * c].reshape(c, r).t())
        o += r * c
    return out


def _forward(theta, shapes, x):
    h = x
    for i, M in enumerate(_unflatten(theta, shapes)):
        h = Fn.linear(h, M[:, :-1], M[:, -1])
        if i < len(ACTS):
            h = ACTS[i](h)
    return h


def dense_fisher(blocks, x, loss):
    shapes = [tuple(B.shape) for B in blocks]
    theta = torch.cat([_vec(B) for B in blocks])
    with torch.no_grad():
        z = _forward(theta, shapes, x)
    J = torch.stack([torch.autograd.functional.jacobian(lambda t: _forward(t, shapes, x[n]), theta)
                     for n in range(x.shape[0])])  # (m, k, P)
    FR = _FR(z, loss)
    F = sum(J[n].t() @ FR[n] @ J[n] for n in range(x.shape[0])) / x.shape[0]
    return F, z


@pytest.mark.parametrize("path", ["sequential", "hooks"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_gram_matches_dense_fisher(loss, path):
    net, seq = _models(seed=3)
    model = seq if path == "sequential" else net
    layers = find_layers(model)
    plan = sequential_plan(model, layers)
    assert (plan is not None) == (path == "sequential")  # the intended path really runs
    x = 1.5 * torch.randn(7, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    F, z = dense_fisher(_blocks(model), x, loss)
    g = torch.Generator().manual_seed(2)
    dirs = [[torch.randn(l.g_dim, l.a_dim, dtype=D, generator=g) for l in layers] for _ in range(3)]
    gram = fisher_gram(model, layers, x, get_loss(loss), dirs)
    Vs = torch.stack([torch.cat([_vec(B) for B in d]) for d in dirs])
    expected = Vs @ F @ Vs.t()
    assert gram.dtype == D and gram.shape == (3, 3)
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-13)
    # not trivially small: the comparison has something to compare
    assert float(expected.diagonal().min()) > 1e-3


@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_inner_and_factors_equal_FR(loss):
    g = torch.Generator().manual_seed(4)
    m, k = 6, 4
    z = 2.0 * torch.randn(m, k, dtype=D, generator=g)
    u, v = torch.randn(m, k, dtype=D, generator=g), torch.randn(m, k, dtype=D, generator=g)
    FR = _FR(z, loss)
    L = get_loss(loss)
    expected = torch.einsum("ni,nij,nj->n", u, FR, v)
    torch.testing.assert_close(L.fisher_inner(z, u, v), expected, rtol=1e-12, atol=1e-14)
    b = L.fisher_factors(z)  # (K, m, k)
    assert b.shape[1:] == (m, k)
    torch.testing.assert_close(torch.einsum("cni,cnj->nij", b, b), FR, rtol=1e-12, atol=1e-14)
