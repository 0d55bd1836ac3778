"""KFAC on models with fused attention (F.scaled_dot_product_attention on its default backend) and
under CPU bf16 autocast: the model's passes run under the caller's autocast, the curvature
(inverse build and application, factor accumulation) and the exact-Fisher quadratic forms in
float32."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast.curvature import find_blocks, get_loss, linearize
from kfac_fast.curvature.block_inverse import BlockInverse
from kfac_fast.curvature.factors import BlockFisher, KroneckerFactors
from kfac_fast.quadratic import fisher_gram, inner
from sdpa_models import SDPATransformerLM, lm_batch

STEPS = 20


def _train(model, x, y, loss, *, autocast: bool, **kw):
    opt = kfac_fast.KFAC(model, loss=loss, **kw)
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            stats = opt.step(x, y)
        losses.append(float(stats["loss"]))
    return opt, losses


def _falls(losses):
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses)), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses


def test_sdpa_transformer_trains_in_float32_on_the_default_backend():
    torch.manual_seed(0)
    model = SDPATransformerLM(vocab=11, T=8, d=16, heads=2, layers=1)
    x, y = lm_batch(32, 8, 11)
    opt, losses = _train(model, x, y, "softmax_cross_entropy", autocast=False)
    _falls(losses)
    assert linearize.chosen(model) == "forward_math"


@pytest.mark.parametrize("kind", ["mlp", "sdpa"])
def test_kfac_trains_under_bf16_autocast(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 10, generator=g)
        y = (x[:, :4] + 0.1 * torch.randn(64, 4, generator=g)).argmax(1)
    else:
        model = SDPATransformerLM(vocab=11, T=8, d=16, heads=2, layers=1)
        x, y = lm_batch(32, 8, 11)
    opt, losses = _train(model, x, y, "softmax_cross_entropy", autocast=True)
    _falls(losses)
    assert linearize.provider_for(model, opt.layers, x) == ("sequential" if kind == "mlp" else "forward_math")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fisher_quadratic_forms_under_autocast_are_float32_forms_of_the_bf16_model():
    """Under autocast the outputs and tangents come in bf16; the forms are taken in float32 and
    agree with the float32 model's to bf16 accuracy."""
    torch.manual_seed(0)
    model = SDPATransformerLM(vocab=11, T=8, d=16, heads=2, layers=1)
    blocks = find_blocks(model)
    x, y = lm_batch(16, 8, 11)
    g = torch.Generator().manual_seed(2)
    dirs = [[b.to_matrix(*[torch.randn(p.shape, generator=g) for p in b.params()]) for b in blocks] for _ in range(2)]
    ref = fisher_gram(model, blocks, x, get_loss("softmax_cross_entropy"), dirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, Jv = linearize.jvp(model, blocks, x, dirs)
        gram = fisher_gram(model, blocks, x, get_loss("softmax_cross_entropy"), dirs)
    assert z.dtype == torch.bfloat16 and Jv[0].dtype == torch.bfloat16  # the model's pass is under autocast
    assert gram.dtype == torch.float64
    assert float((gram - ref).abs().max() / ref.abs().max()) < 5e-2


def test_inverse_ignores_the_callers_autocast():
    """Build and application of the inverse (Kronecker and norm blocks) give the same float32
    numbers inside and outside an autocast region."""
    g = torch.Generator().manual_seed(0)

    def spd(n):
        a = torch.randn(n, n, generator=g)
        return a @ a.t() / n + torch.eye(n)

    records = [KroneckerFactors(A=spd(5), G=spd(4), name="lin", homogeneous=True),
               BlockFisher(F=torch.stack([spd(2) for _ in range(3)]), name="ln")]
    grads = [torch.randn(4, 5, generator=g), torch.randn(3, 2, generator=g)]
    for kind in ("block_diagonal", "block_tridiagonal"):
        plain = BlockInverse(records, kind=kind, damping=0.1, backend="torch")
        want = plain.apply(grads)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inv = BlockInverse(records, kind=kind, damping=0.1, backend="torch")
            got = inv.apply(grads)
            got_redamped = inv.with_damping(0.2).apply(grads)
        want_redamped = plain.with_damping(0.2).apply(grads)
        for a, b in zip(got + got_redamped, want + want_redamped):
            assert a.dtype == torch.float32
            assert torch.equal(a, b)


def test_inner_widens_16_bit_blocks():
    u = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    v = [torch.tensor([3.0, 1.0], dtype=torch.bfloat16), torch.tensor([4.0])]
    assert float(inner(u, v)) == 1 * 3 + 2 * 1 + 0.5 * 4


def test_no_deprecation_or_scalar_warnings_in_ordinary_steps():
    """In a fresh process (torch loads its forward-AD decompositions once per process)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); torch.set_num_threads(1)\n"
        "import kfac_fast\n"
        "from sdpa_models import SDPATransformerLM, lm_batch\n"
        "m = SDPATransformerLM(); x, y = lm_batch(8, 8, 11)\n"
        "opt = kfac_fast.KFAC(m, loss='softmax_cross_entropy')\n"
        "for _ in range(3): float(opt.step(x, y)['loss'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "python"))
    res = subprocess.run([sys.executable, "-W", "error::DeprecationWarning",
                          "-W", "error:Converting a tensor with requires_grad=True:UserWarning", "-c", code],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
