"""Every J·v provider (kfac_fast.curvature.linearize) against a dense float64 reference, and the
per-model choice between them.

Reference, built independently of the package's linearized passes: the Jacobian J of the model's
flattened output with respect to the block parameters by ``torch.func.jacrev`` of
``functional_call`` in float64 (a reverse-mode Jacobian, one row per output entry), J·v = J vec(v);
the exact-Fisher quadratic forms uᵀFv = (1/N) Σ_n (J_n u)ᵀ F_R,n (J_n v) with F_R written from
each predictive distribution's definition (categorical: diag(p) − ppᵀ, Bernoulli: diag(p(1−p)),
unit Gaussian: I). Models: an MLP, a conv net with BatchNorm in training mode, and a causal
transformer whose attention is F.scaled_dot_product_attention.
"""
import copy

import pytest
import torch
from torch import nn

from kfac_fast.curvature import find_blocks, get_loss, linearize
from kfac_fast.demo.models import deep_autoencoder
from kfac_fast.quadratic import fisher_gram
from sdpa_models import SDPATransformerLM

D = torch.float64
LOSSES = ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # jacrev of the reference
GENERAL = ["forward", "forward_math", "reverse_over_reverse"]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.fc = nn.Conv2d(4, 3, 3, stride=2), nn.Linear(3 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.bn(self.conv1(x))))).flatten(1))


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))


def problem(kind: str, seed: int = 0):
    """(model in float64, blocks, inputs)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model, x = mlp(), torch.randn(7, 4, generator=g)
    elif kind == "conv_bn":
        model, x = ConvBN().train(), torch.randn(5, 2, 5, 5, generator=g)
    else:
        model, x = SDPATransformerLM(vocab=7, T=5, d=8, heads=2, layers=1), torch.randint(0, 7, (3, 5), generator=g)
    model = model.to(D)
    with torch.no_grad():
        for p in model.parameters():  # away from the init's special values (LayerNorm γ = 1, β = 0, ...)
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D))
    x = x.to(D) if x.is_floating_point() else x
    return model, find_blocks(model), x


def directions(blocks, n: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [[b.to_matrix(*[torch.randn(p.shape, generator=g, dtype=D) for p in b.params()]) for b in blocks]
            for _ in range(n)]


def dense_jacobian(model, blocks, x):
    """(z, J): J of shape (z.numel(), Σ block parameter sizes) by reverse mode in float64."""
    ref = copy.deepcopy(model)
    # BatchNorm in training mode normalises with the batch statistics either way; without
    # running statistics to update it can run inside jacrev
    torch.func.replace_all_batch_norm_modules_(ref)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for b in blocks for p in b.params()]  # the same names in the copy
    base = {k: v.detach() for k, v in ref.named_parameters()}

    def f(*flat):
        return torch.func.functional_call(ref, {**base, **dict(zip(keys, flat))}, (x,)).reshape(-1)

    flat = [base[k] for k in keys]
    jac = torch.func.jacrev(f, argnums=tuple(range(len(flat))))(*flat)
    z = f(*flat).detach()
    return z, torch.cat([j.reshape(z.numel(), -1) for j in jac], 1)


def flat_direction(blocks, d):
    return torch.cat([t.reshape(-1) for b, M in zip(blocks, d) for t in b.from_matrix(M)])


def output_fisher(z: torch.Tensor, loss: str) -> torch.Tensor:
    """F_R per loss term (M, k, k) from the distribution's definition."""
    out = []
    for zn in z:
        if loss == "softmax_cross_entropy":
            p = torch.exp(zn - zn.max())
            p = p / p.sum()
            out.append(torch.diag(p) - torch.outer(p, p))
        elif loss == "sigmoid_cross_entropy":
            p = 1 / (1 + torch.exp(-zn))
            out.append(torch.diag(p * (1 - p)))
        else:
            out.append(torch.eye(zn.numel(), dtype=D))
    return torch.stack(out)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def providers_for(kind):
    return (["sequential"] if kind == "mlp" else []) + GENERAL


@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "sdpa"])
def test_every_provider_matches_the_dense_jacobian(kind):
    model, blocks, x = problem(kind)
    dirs = directions(blocks)
    z_ref, J = dense_jacobian(model, blocks, x)
    jv_ref = [J @ flat_direction(blocks, d) for d in dirs]
    buffers = [b.clone() for b in model.buffers()]
    for name in providers_for(kind):
        if kind == "sdpa" and name == "forward":
            continue  # the fused kernel has no forward derivative: see the next test
        z, Jv = linearize.jvp(model, blocks, x, dirs, provider=name)
        assert rel(z.reshape(-1), z_ref) <= 1e-12, name
        for jv, ref in zip(Jv, jv_ref):
            assert rel(jv.reshape(-1), ref) <= 1e-9, name
        for b, s in zip(model.buffers(), buffers):  # BatchNorm statistics left as they were
            assert torch.equal(b, s), name


def test_plain_forward_mode_fails_on_fused_attention():
    """What the fallback is for: without the math backend, SDPA has no forward derivative."""
    model, blocks, x = problem("sdpa")
    with pytest.raises(NotImplementedError, match="forward AD"):
        linearize.jvp(model, blocks, x, directions(blocks), provider="forward")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "sdpa"])
def test_fisher_quadratic_forms_match_dense(kind, loss):
    model, blocks, x = problem(kind)
    dirs = directions(blocks, 3)
    z_ref, J = dense_jacobian(model, blocks, x)
    k = model(x).shape[-1]
    M = z_ref.numel() // k
    JV = torch.stack([(J @ flat_direction(blocks, d)).reshape(M, k) for d in dirs])  # (n, M, k)
    FR = output_fisher(z_ref.reshape(M, k), loss)
    gram_ref = torch.einsum("amk,mkl,bml->ab", JV, FR, JV) / M
    for name in providers_for(kind):
        if kind == "sdpa" and name == "forward":
            continue
        gram = fisher_gram(model, blocks, x, get_loss(loss), dirs, provider=name)
        assert rel(gram, gram_ref) <= 1e-9, name


def test_choice_per_model():
    ae = deep_autoencoder((12, 8, 4, 2), generator=torch.Generator().manual_seed(0))
    ab = find_blocks(ae)
    x = torch.rand(6, 12)
    linearize.jvp(ae, ab, x, directions(ab, 1))
    assert linearize.provider_for(ae, ab, x) == "sequential"  # the paper's MLP keeps its fast path
    assert linearize.chosen(ae) is None

    cnn, cb, xc = problem("conv_bn")
    linearize.jvp(cnn, cb, xc, directions(cb, 1))
    assert linearize.chosen(cnn) == "forward"

    lm, lb, xl = problem("sdpa")
    assert linearize.chosen(lm) is None
    z, Jv = linearize.jvp(lm, lb, xl, directions(lb, 2))
    assert linearize.chosen(lm) == "forward_math"  # decided once, on the first failure
    _, J = dense_jacobian(lm, lb, xl)
    assert rel(Jv[1].reshape(-1), J @ flat_direction(lb, directions(lb, 2)[1])) <= 1e-9


class TanhNoJvp(torch.autograd.Function):
    """tanh with a (differentiable) backward but no forward derivative."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(TanhNoJvp.apply(self.l1(x)))


def test_reverse_over_reverse_where_no_forward_derivative_exists():
    torch.manual_seed(0)
    model = NoJvpNet().to(D)
    blocks = find_blocks(model)
    x = torch.randn(6, 4, dtype=D)
    dirs = directions(blocks)
    z, Jv = linearize.jvp(model, blocks, x, dirs)
    assert linearize.chosen(model) == "reverse_over_reverse"
    # reference: the same network written with torch.tanh
    ref = nn.Sequential(model.l1, nn.Tanh(), model.l2)
    _, J = dense_jacobian(ref, [b for b in find_blocks(ref)], x)
    for d, jv in zip(dirs, Jv):
        assert rel(jv.reshape(-1), J @ flat_direction(blocks, d)) <= 1e-9


def test_multihead_attention_in_both_modes():
    """nn.MultiheadAttention: its training path reaches SDPA (forward-mode under the math
    backend), its inference fast path (_native_multi_head_attention) has no forward derivative
    at all (reverse-over-reverse, with gradients on, takes the composite path)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 8), nn.Linear(8, 7)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, t):
            h = self.emb(t)
            return self.head(self.mha(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    x = torch.randint(0, 7, (3, 5))
    for mode, expect in (("train", "forward_math"), ("eval", "reverse_over_reverse")):
        model = Net().to(D)
        model.train(mode == "train")
        blocks = find_blocks(model, unsupported="skip")
        dirs = directions(blocks)
        z, Jv = linearize.jvp(model, blocks, x, dirs)
        assert linearize.chosen(model) == expect
        _, J = dense_jacobian(model, blocks, x)
        for d, jv in zip(dirs, Jv):
            assert rel(jv.reshape(-1), J @ flat_direction(blocks, d)) <= 1e-9


def test_other_errors_are_not_swallowed():
    """Only a missing derivative moves on to the next provider; a bug in the model surfaces."""
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return self.l(x) @ torch.ones(5, 5)

    model = Broken()
    blocks = find_blocks(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linearize.jvp(model, blocks, torch.randn(4, 3), directions(blocks, 1))
    assert linearize.chosen(model) is None


def test_unknown_provider_names_the_choices():
    model, blocks, x = problem("conv_bn")
    with pytest.raises(ValueError, match="choose one of"):
        linearize.jvp(model, blocks, x, directions(blocks, 1), provider="backward")
    with pytest.raises(ValueError, match="does not apply"):
        linearize.jvp(model, blocks, x, directions(blocks, 1), provider="sequential")
