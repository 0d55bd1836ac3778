"""nn.MultiheadAttention as two Kronecker blocks (fused in-projection, out_proj) against float64
references from a ViT-style block whose attention is written out by hand (probes on the
projections for the Jacobians, no kfac_fast code); KFAC and KFACPreconditioner train it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dense as dn
from block_models import CE, D, close, record, rows_A, train, vit_problem, vit_reference
from kfac_fast import KFACPreconditioner
from kfac_fast.curvature.blocks import AttentionInProjBlock, AttentionOutProjBlock, DiagonalBlock, find_blocks
from kfac_fast.curvature.batch_factors import block_factors

CASES = [dict(batch_first=bf, masks=mk, need_weights=nw) for bf, mk, nw in
         [(True, "none", False), (False, "none", True), (True, "padding", True), (False, "causal", False),
          (True, "both", False), (False, "float3d", True)]]
IDS = [f"batch_first={c['batch_first']}-{c['masks']}-need_weights={c['need_weights']}" for c in CASES]


def test_reference_forward_is_the_model():
    for kw in CASES:
        model, x, _ = vit_problem(**kw)
        close(vit_reference(model, x)[0], model(x), msg=str(kw))


def _probe_jacobian(model, x, which):
    """J (T_terms, k, m, T, d) = ∂z/∂(s or y) by a zero probe in the reference forward."""
    _, s, o = vit_reference(model, x)
    shape = s.shape if which == "s" else o.shape

    def run(delta):
        kw = {"probe_s": delta} if which == "s" else {"probe_y": delta}
        return vit_reference(model, x, **kw)[0]

    J = torch.autograd.functional.jacobian(run, torch.zeros(shape, dtype=D))  # (m, k, m, T, d)
    return J.reshape(-1, J.shape[1], *shape)


def _exact_G(model, x, which, approx="expand"):
    with torch.no_grad():
        z = model(x)
    FR, mask, N = dn.loss_terms(z, CE)
    J = _probe_jacobian(model, x, which)
    if approx == "reduce":
        J = J.sum(3)
        return torch.einsum("tkni,tkl,tlnj,t->ij", J, FR, J, mask) / N
    return torch.einsum("tknri,tkl,tlnrj,t->ij", J, FR, J, mask) / N


def _rows(model, x):
    """(query rows (m, T, E) = ln_1's output, attention output o (m, T, E)) from the reference."""
    with torch.no_grad():
        _, _, o = vit_reference(model, x)
        q = model.ln_1(model.embed(x))
    return q, o


def _A(t, approx):
    if approx == "reduce":
        t = torch.cat([t, torch.ones(*t.shape[:2], 1, dtype=D)], -1).mean(1)
        return t.t() @ t / t.shape[0]
    return rows_A(t.reshape(-1, t.shape[-1]), True)


def test_blocks_found():
    model, _, _ = vit_problem()
    blocks = {b.name: b for b in find_blocks(model)}
    assert type(blocks["model.attn.in_proj"]) is AttentionInProjBlock
    assert type(blocks["model.attn.out_proj"]) is AttentionOutProjBlock
    assert (blocks["model.attn.in_proj"].g_dim, blocks["model.attn.in_proj"].a_dim) == (24, 9)
    assert not any(isinstance(b, DiagonalBlock) for b in blocks.values())


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_factors_equal_dense_references(kw):
    model, x, _ = vit_problem(**kw)
    recs = block_factors(model, x, CE, fisher="exact")
    q, o = _rows(model, x)
    close(record(recs, "attn.in_proj").A, _A(q, "expand"), msg="in_proj A (query rows, 1 last)")
    close(record(recs, "attn.in_proj").G, _exact_G(model, x, "s"), msg="in_proj G (∂z/∂s probes)")
    close(record(recs, "attn.out_proj").A, _A(o, "expand"), msg="out_proj A (attention output rows)")
    close(record(recs, "attn.out_proj").G, _exact_G(model, x, "y"), msg="out_proj G")


def test_factors_without_biases():
    model, x, _ = vit_problem(masks="causal", attn_bias=False)
    recs = block_factors(model, x, CE, fisher="exact")
    q, o = _rows(model, x)
    for path, rows, which in (("attn.in_proj", q, "s"), ("attn.out_proj", o, "y")):
        r = record(recs, path)
        assert not r.homogeneous
        flat = rows.reshape(-1, rows.shape[-1])
        close(r.A, rows_A(flat, False), msg=f"{path} A without the homogeneous coordinate")
        close(r.G, _exact_G(model, x, which), msg=f"{path} G")


def test_reduce_factors():
    model, x, _ = vit_problem(masks="padding")
    recs = block_factors(model, x, CE, fisher="exact", kfac_approx="reduce")
    q, o = _rows(model, x)
    close(record(recs, "attn.in_proj").A, _A(q, "reduce"))
    close(record(recs, "attn.in_proj").G, _exact_G(model, x, "s", "reduce"))
    close(record(recs, "attn.out_proj").A, _A(o, "reduce"))
    close(record(recs, "attn.out_proj").G, _exact_G(model, x, "y", "reduce"))


def test_layout_in_proj_gradient_is_sum_of_g_abar():
    """grad_matrix of the in-projection = Σ_rows g āᵀ with g = ∂(Σ CE)/∂s from the reference."""
    model, x, y = vit_problem(batch_first=False, masks="causal")
    blocks = {b.name: b for b in find_blocks(model)}
    probe = torch.zeros(4, 3, 24, dtype=D, requires_grad=True)
    z, _, _ = vit_reference(model, x, probe_s=probe)
    model.zero_grad()
    F.cross_entropy(z, y, reduction="sum").backward()
    q, _ = _rows(model, x)
    abar = torch.cat([q, torch.ones(*q.shape[:2], 1, dtype=D)], -1).reshape(-1, 9)
    g = probe.grad.reshape(-1, 24)
    close(blocks["model.attn.in_proj"].grad_matrix(), g.t() @ abar)


@pytest.mark.parametrize("capture", ["pass", "hooks"])
@pytest.mark.parametrize("kw", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_preconditioner_factors_equal_the_empirical_reference(capture, kw):
    model, x, y = vit_problem(**kw)
    pre = KFACPreconditioner(model, loss=CE, fisher="empirical", damping=0.1, capture=capture, step_size=None,
                             **({"tau1": 1.0} if capture == "pass" else {}))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step(x, y) if capture == "pass" else pre.step(targets=y)
    ps = torch.zeros(4, 3, 24, dtype=D, requires_grad=True)
    py = torch.zeros(4, 3, 8, dtype=D, requires_grad=True)
    z, _, _ = vit_reference(model, x, probe_s=ps, probe_y=py)
    gs, gy = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), [ps, py])
    q, o = _rows(model, x)
    cur = pre.factors.current
    for path, a, g in (("attn.in_proj", q, gs), ("attn.out_proj", o, gy)):
        g = g.reshape(-1, g.shape[-1])
        close(record(cur, path).A, _A(a, "expand"), msg=f"{capture} {path} A")
        close(record(cur, path).G, g.t() @ g / x.shape[0], msg=f"{capture} {path} G")


def test_refusals():
    torch.manual_seed(0)
    cross = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    with pytest.raises(ValueError, match="separate q/k/v projection weights"):
        find_blocks(nn.Sequential(cross), unsupported="error")
    names = [b.name for b in find_blocks(nn.Sequential(cross), unsupported="diagonal")]
    assert "model.0.q_proj_weight" in names and "model.0.out_proj.weight" in names
    with pytest.raises(ValueError, match="add_bias_kv"):
        find_blocks(nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True)), unsupported="error")

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x.flip(1), x.flip(1))[0].mean(1)

    model = Cross().double()
    with pytest.raises(ValueError, match="cross-attention"):
        block_factors(model, torch.randn(2, 3, 4, dtype=D), CE, fisher="empirical", targets=torch.tensor([0, 1]))


@pytest.mark.parametrize("how", ["kfac", "pass", "hooks"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_block_trains(how, batch_first):
    """KFAC's exact-Fisher products use forward-mode AD through the model, which the fused CPU
    attention kernel does not implement: KFAC runs under the math attention backend here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, y = vit_problem(m=32, T=4, dtype=torch.float32, batch_first=batch_first, masks="padding")
    if how == "kfac":
        with sdpa_kernel(SDPBackend.MATH):
            losses = train(model, x, y, how)
    else:
        losses = train(model, x, y, how)
    assert losses[-1] < 0.9 * losses[0], losses


def test_transformer_encoder_layer_is_covered_and_trains():
    """nn.TransformerEncoderLayer calls its attention with one tensor as query, key and value."""
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.layer(self.inp(x)).mean(1))

    torch.manual_seed(0)
    model, x, y = Enc(), torch.randn(32, 4, 3), torch.randint(0, 5, (32,))
    pre = KFACPreconditioner(model, loss=CE)
    cov = pre.coverage()
    assert {e.name for e in cov.entries if e.kind == "kronecker"} >= {"model.layer.self_attn.in_proj",
                                                                     "model.layer.self_attn.out_proj"}
    assert cov.count("skipped") == 0 and cov.count("scale-shift") == 32
    losses = train(model, x, y, "hooks")
    assert losses[-1] < 0.9 * losses[0], losses
