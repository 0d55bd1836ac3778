"""Grouped convolutions as one Kronecker product per group (GroupedKroneckerConvBlock):

* the rule (exact per-group Fisher for small groups, per-group Kronecker otherwise, refused above
  the per-group factor bound);
* the factors equal per-group Ā_j, G_j computed here from F.unfold of group j's input channels
  and autograd's output derivatives, float64 (expand and reduce; stride, padding, dilation;
  bias and none; groups 2 and 4; Conv1d);
* the inverse applied equals a dense float64 block-diagonal solve with torch.kron per group
  (π_j by the trace rule), in both inverse kinds;
* the running factors: the sync-free ``valid`` path, the flat buffer of data parallel, records;
* KFAC and KFACPreconditioner (both captures) train a small ResNeXt-style block (float32 and
  CPU bf16 autocast), and checkpoints round-trip.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC, KFACPreconditioner
from kfac_fast.curvature.batch_factors import block_factors
from kfac_fast.curvature.block_inverse import BlockInverse
from kfac_fast.curvature.blocks import (Conv2dBlock, GroupedConvBlock, GroupedKroneckerConvBlock, LinearBlock,
                                        find_blocks)
from kfac_fast.curvature.factors import KroneckerFactors
from kfac_fast.curvature.running import RunningFactors
from kfac_fast.curvature.statistics import block_rows
from kfac_fast.distributed import record_cost, record_kind

D = torch.float64
CE = "softmax_cross_entropy"

# (conv, input shape without m): every one has b > 64 parameters per group and C_out/G > 1
CONVS = {
    "g2_bias": (lambda: nn.Conv2d(8, 8, 3, padding=1), (8, 5, 5), 2),
    "g4_nobias_stride_dil": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False), (8, 7, 6), 4),
    "g4_bias_valid": (lambda: nn.Conv2d(12, 16, (3, 2), stride=(1, 2)), (12, 6, 7), 4),
    "conv1d_g4_dil": (lambda: nn.Conv1d(16, 32, 3, padding=2, dilation=2), (16, 9), 4),
    "conv1d_g2_nobias_stride": (lambda: nn.Conv1d(8, 12, 4, stride=2, bias=False), (8, 11), 2),
}


def _grouped(make, groups):
    c = make()
    kw = dict(in_channels=c.in_channels, out_channels=c.out_channels, kernel_size=c.kernel_size, stride=c.stride,
              padding=c.padding, dilation=c.dilation, groups=groups, bias=c.bias is not None)
    return type(c)(**kw)


def _model(key, dtype=D):
    make, shape, groups = CONVS[key]
    torch.manual_seed(0)
    conv = _grouped(make, groups)
    with torch.no_grad():
        out = conv(torch.zeros(1, *shape))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out[0].numel(), 5)).to(dtype)
    x = torch.randn(6, *shape, dtype=dtype)
    y = torch.randint(0, 5, (6,))
    return model, x, y


def _reference(model, x, y, approx):
    """Per-group Ā_j, G_j of model[0] from F.unfold and autograd (empirical Fisher: y given)."""
    conv = model[0]
    G = conv.groups
    seen = {}
    h = conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), out=o))
    z = model(x)
    h.remove()
    loss = F.cross_entropy(z, y, reduction="sum")
    g = torch.autograd.grad(loss, seen["out"])[0]
    xin, one_d = seen["x"], isinstance(conv, nn.Conv1d)
    if one_d:  # the (m, C, 1, L) view
        xin, g = xin.unsqueeze(2), g.unsqueeze(2)
        ks, st, pa, di = (1, conv.kernel_size[0]), (1, conv.stride[0]), (0, conv.padding[0]), (1, conv.dilation[0])
    else:
        ks, st, pa, di = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    m, cin, cout = x.shape[0], conv.in_channels // G, conv.out_channels // G
    N = m
    As, Gs = [], []
    for j in range(G):
        P = F.unfold(xin[:, j * cin:(j + 1) * cin], ks, dilation=di, padding=pa, stride=st)  # (m, cin·K, R)
        gj = g[:, j * cout:(j + 1) * cout].flatten(2)  # (m, cout, R)
        if approx == "reduce":
            rows, grows = P.mean(2), gj.sum(2)
        else:
            rows, grows = P.transpose(1, 2).reshape(-1, P.shape[1]), gj.transpose(1, 2).reshape(-1, cout)
        if conv.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        As.append(rows.T @ rows / rows.shape[0])
        Gs.append(grows.T @ grows / N)
    return torch.stack(As), torch.stack(Gs)


def test_the_rule_picks_exact_blocks_for_small_groups_and_kronecker_for_the_rest():
    kinds = lambda mod: type(find_blocks(mod)[0])  # noqa: E731
    assert kinds(nn.Conv2d(32, 32, 3, groups=32)) is GroupedConvBlock  # depthwise 3×3: b = 10
    assert kinds(nn.Conv2d(32, 32, 7, groups=32)) is GroupedConvBlock  # depthwise 7×7: b = 50
    assert kinds(nn.Conv2d(8, 16, 3, groups=8)) is GroupedConvBlock  # multiplier 2: b = 20 ≤ 64
    assert kinds(nn.Conv2d(32, 32, 21, groups=32)) is GroupedConvBlock  # g = 1, b = 442 ≤ 1024
    assert kinds(nn.Conv2d(64, 64, 3, groups=8)) is GroupedKroneckerConvBlock  # RegNet-like: b = 8·73
    assert kinds(nn.Conv2d(128, 128, 3, groups=32, bias=False)) is GroupedKroneckerConvBlock  # ResNeXt 32x4d
    assert kinds(nn.Conv1d(16, 32, 3, groups=4)) is GroupedKroneckerConvBlock
    assert kinds(nn.Conv2d(8, 8, 1)) is Conv2dBlock
    # a per-group factor above 4096 is refused, naming the sizes (unsupported= decides)
    big = nn.Conv2d(1024, 8, 3, groups=2, bias=False)  # a = 512·9 = 4608
    with pytest.raises(ValueError, match="4608"):
        find_blocks(nn.Sequential(big), unsupported="error")
    spec = find_blocks(nn.Conv2d(8, 16, 3, groups=4))[0].factor_spec
    assert (spec.kind, spec.a_dim, spec.g_dim, spec.homogeneous) == ("kronecker_grouped", 19, 4, True)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("key", list(CONVS))
def test_factors_equal_the_per_group_factors(key, approx):
    model, x, y = _model(key)
    assert isinstance(find_blocks(model)[0], GroupedKroneckerConvBlock)
    recs = block_factors(model, x, CE, fisher="empirical", targets=y, kfac_approx=approx)
    A_ref, G_ref = _reference(model, x, y, approx)
    f = recs[0]
    assert isinstance(f, KroneckerFactors) and f.grouped
    assert f.A.dtype == D and f.A.shape == A_ref.shape and f.G.shape == G_ref.shape
    for got, ref in ((f.A, A_ref), (f.G, G_ref)):
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= 1e-9, (key, approx, rel)


def test_one_example_at_one_position_equals_the_exact_per_group_fisher():
    """m = 1, R = 1, empirical Fisher: each group's Fisher is rank one, u uᵀ with u = g ⊗ ā, so
    Ā_j ⊗ G_j must equal the exact block of GroupedConvBlock (vec_rows order: kron(G_j, Ā_j))."""
    import kfac_fast.curvature.blocks.grouped_conv_kronecker as gk

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, groups=4)  # a 3×3 input, no padding: one output position
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(16, 5)).to(D)
    x, y = torch.randn(1, 8, 3, 3, dtype=D), torch.tensor([2])
    kron = block_factors(model, x, CE, fisher="empirical", targets=y)[0]
    saved = gk.EXACT_MAX_PARAMS
    try:
        gk.EXACT_MAX_PARAMS = 10 ** 6  # the exact per-group block for the same layer
        assert isinstance(find_blocks(model)[0], GroupedConvBlock)
        exact = block_factors(model, x, CE, fisher="empirical", targets=y)[0].F
    finally:
        gk.EXACT_MAX_PARAMS = saved
    ref = torch.stack([torch.kron(G, A) for A, G in zip(kron.A, kron.G)])
    torch.testing.assert_close(ref, exact, rtol=1e-10, atol=1e-14)


def test_factors_are_chunked_over_groups_without_changing_them(monkeypatch):
    import kfac_fast.curvature.running as running

    model, x, y = _model("g4_bias_valid")
    whole = block_factors(model, x, CE, fisher="empirical", targets=y)[0]
    monkeypatch.setattr(running, "GROUPED_CHUNK", 1)  # one group per chunk
    chunked = block_factors(model, x, CE, fisher="empirical", targets=y)[0]
    torch.testing.assert_close(chunked.A, whole.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.G, whole.G, rtol=1e-12, atol=1e-14)


def _dense_block_solve(A, G, V, gamma):
    """(⊕_j (Ā_j + π_j γ I) ⊗ (G_j + γ/π_j I))⁻¹ vec(V) with torch.kron, float64, V (groups·g, a)."""
    blocks = []
    for Aj, Gj in zip(A, G):
        a, g = Aj.shape[0], Gj.shape[0]
        pi = math.sqrt((torch.trace(Aj) / a) / (torch.trace(Gj) / g))
        # vec_rows(G⁻¹ V A⁻¹) = (G ⊗ A)⁻¹ vec_rows(V) for symmetric A
        blocks.append(torch.kron(Gj + gamma / pi * torch.eye(g, dtype=D), Aj + pi * gamma * torch.eye(a, dtype=D)))
    M = torch.block_diag(*blocks)
    return torch.linalg.solve(M, V.reshape(-1)).reshape(V.shape)


@pytest.mark.parametrize("kind", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("key", ["g2_bias", "g4_nobias_stride_dil", "conv1d_g4_dil"])
def test_inverse_equals_a_dense_block_diagonal_solve(key, kind):
    model, x, y = _model(key)
    recs = block_factors(model, x, CE, fisher="empirical", targets=y, tridiagonal=kind == "block_tridiagonal")
    gamma = 0.05
    inv = BlockInverse(recs, kind=kind, damping=gamma)
    assert inv.other[0][0] == "kron_grouped"
    torch.manual_seed(1)
    grads = [torch.randn(*s, dtype=D) for s in inv.shapes]
    out = inv.apply(grads)
    f = recs[0]
    assert tuple(inv.shapes[0]) == (model[0].out_channels, f.A.shape[-1])
    ref = _dense_block_solve(f.A, f.G, grads[0], gamma)
    rel = float((out[0] - ref).norm() / ref.norm())
    assert rel <= 1e-9, rel
    # a fixed π: the same for every group
    inv2 = BlockInverse(recs, kind=kind, damping=gamma, pi=2.0)
    Ad = f.A + 2.0 * gamma * torch.eye(f.A.shape[-1], dtype=D)
    Gd = f.G + gamma / 2.0 * torch.eye(f.G.shape[-1], dtype=D)
    M = torch.block_diag(*[torch.kron(g, a) for g, a in zip(Gd, Ad)])
    ref2 = torch.linalg.solve(M, grads[0].reshape(-1)).reshape(grads[0].shape)
    torch.testing.assert_close(inv2.apply(grads)[0], ref2, rtol=1e-9, atol=1e-12)
    # the update layout: block matrix rows of group j are its output channels
    blk = find_blocks(model)[0]
    W = blk.param_matrix()
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in blk.from_matrix(W)]),
                               torch.cat([p.reshape(-1) for p in blk.params()]))
    assert W.shape == inv.shapes[0]


def _stats(model, x, y, blocks):
    from kfac_fast.curvature.capture import capture

    with capture(blocks) as rec:
        z = model(x)
    outs = rec.outputs
    gs = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), outs)
    return block_rows(blocks, rec, list(gs), x.shape[0])


def test_running_factors_valid_path_flat_buffer_and_records():
    model, x, y = _model("g2_bias", dtype=torch.float32)
    blocks = find_blocks(model)
    rf = RunningFactors(blocks, dtype=torch.float32, device="cpu", tridiagonal=False)
    st = _stats(model, x, y, blocks)
    rf.update(st, eps=0.0, backend="torch")
    rf.commit()
    before = [t.clone() for f in rf.current for t in (f.A, f.G)]
    # a step with non-finite statistics leaves the factors bitwise unchanged (sync-free path)
    bad = _stats(model, x * float("nan"), y, blocks)
    rf.update(bad, eps=0.5, backend="torch", valid=torch.tensor(False))
    for b, t in zip(before, [t for f in rf.pending for t in (f.A, f.G)]):
        assert torch.equal(b, t)
    # ... and a valid one equals the host-side update
    rf.update(st, eps=0.5, backend="torch", valid=torch.tensor(True))
    sync_free = [t.clone() for f in rf.pending for t in (f.A, f.G)]
    rf.update(st, eps=0.5, backend="torch")
    for a, b in zip(sync_free, [t for f in rf.pending for t in (f.A, f.G)]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the flat buffer (data parallel): per-group upper triangles, round trip exact and symmetric
    tri = lambda t: t.numel() // t.shape[-1] * (t.shape[-1] + 1) // 2  # noqa: E731  (per matrix n(n+1)/2)
    assert rf.flat_numel() == sum(tri(t) for f in rf.current for t in (f.A, f.G))
    flat = rf.pack_flat("current")
    for f in rf.current:
        f.A.zero_()
        f.G.zero_()
    rf.unpack_flat_(flat, "current")
    torch.testing.assert_close(rf.current[0].A, rf.current[0].A.transpose(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(rf.current[0].A, before[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(rf.current[0].G, before[1], rtol=0, atol=1e-7)
    # distributed cost model and record kind
    f = rf.current[0]
    assert record_kind(f) == "kron_grouped"
    assert record_cost(f) == 2 * (37 ** 3 + 4 ** 3)
    # state round trip
    rf2 = RunningFactors(blocks, dtype=torch.float32, device="cpu", tridiagonal=False)
    rf2.load(rf.state())
    for a, b in zip(rf.current, rf2.current):
        assert torch.equal(a.A, b.A) and torch.equal(a.G, b.G)


class ResNeXtBlock(nn.Module):
    """(m, 8, 6, 6) -> (m, 4): a bottleneck with a grouped 3×3 (groups 4, 4 channels each) and a
    residual, then a head."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(8, 16, 1, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.expand = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.reduce(x))
        h = torch.tanh(self.grouped(h))
        h = x + self.expand(h)
        return self.head(h.mean((2, 3)))


def _data(m=32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, 8, 6, 6, generator=g)
    y = torch.randint(0, 4, (m,), generator=g)
    return x, y


def _falls(losses):
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("how", ["kfac", "pass", "hooks"])
def test_resnext_block_trains(how, autocast):
    torch.manual_seed(0)
    model = ResNeXtBlock()
    assert isinstance(find_blocks(model)[1], GroupedKroneckerConvBlock)
    x, y = _data()
    ac = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
    losses = []
    if how == "kfac":
        opt = KFAC(model, loss=CE, generator=torch.Generator().manual_seed(0))
        for _ in range(20):
            with ac():
                losses.append(float(opt.step(x, y)["loss"]))
        assert opt.factors.current[1].A.shape == (4, 36, 36) and opt.factors.current[1].G.shape == (4, 4, 4)
    else:
        pre = KFACPreconditioner(model, loss=CE, damping=0.3, capture=how, step_size=None,
                                 generator=torch.Generator().manual_seed(0))
        sgd = torch.optim.SGD(model.parameters(), lr=0.3)
        for _ in range(20):
            sgd.zero_grad()
            with ac():
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward(retain_graph=how == "hooks")
            pre.step(x, y) if how == "pass" else pre.step()
            sgd.step()
            losses.append(float(loss.detach()))
    _falls(losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_coverage_counts_grouped_kronecker_blocks():
    torch.manual_seed(0)
    model = ResNeXtBlock()
    opt = KFAC(model, loss=CE)
    cov = opt.coverage()
    grouped = [e for e in cov.entries if e.name.endswith("grouped")]
    assert [e.kind for e in grouped] == ["kronecker"] and grouped[0].params == 16 * 4 * 9
    assert cov.kronecker_fraction == 1.0
    # memory: both factor buffers and the damped per-group inverses (Ā_j⁻¹, G_j⁻¹) are counted
    x, y = _data()
    opt.step(x, y)
    rep = opt.memory_report()
    f = opt.factors.current[1]
    grouped_bytes = (f.A.numel() + f.G.numel()) * 4
    assert rep["factors"] >= 2 * sum((r.A.numel() + r.G.numel()) * 4 for r in opt.factors.current)
    assert rep["inverse"] >= 2 * grouped_bytes  # the inverse's record snapshot and Ā_j⁻¹, G_j⁻¹
    from kfac_fast._parts import tensors_in

    inv = opt.inverse if isinstance(opt.inverse, BlockInverse) else opt.inverse.local
    kind, Ainv, Ginv = inv.other[1]
    assert kind == "kron_grouped" and Ainv.shape == (4, 36, 36) and Ginv.shape == (4, 4, 4)
    held = {t.data_ptr() for t in tensors_in(opt.inverse)}
    assert Ainv.data_ptr() in held and Ginv.data_ptr() in held


@pytest.mark.parametrize("how", ["kfac", "pass"])
def test_checkpoint_round_trip(how):
    x, y = _data()
    torch.manual_seed(0)
    model = ResNeXtBlock()
    twin = copy.deepcopy(model)

    def make(m):
        if how == "kfac":
            return KFAC(m, loss=CE, generator=torch.Generator().manual_seed(0))
        return KFACPreconditioner(m, loss=CE, damping=0.3, capture="pass", step_size=None, T3=1,
                                  generator=torch.Generator().manual_seed(0))

    def step(opt, m):
        if how == "kfac":
            return opt.step(x, y)
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step(x, y)
        return [p.grad.clone() for p in m.parameters()]

    opt = make(model)
    for _ in range(3):
        step(opt, model)
    state = opt.state_dict()
    twin.load_state_dict(model.state_dict())
    opt2 = make(twin)
    opt2.load_state_dict(state)
    for a, b in zip(opt.factors.current, opt2.factors.current):
        assert torch.equal(a.A, b.A) and torch.equal(a.G, b.G)
    assert opt2.factors.current[1].A.dim() == 3
    if how == "pass":
        ga, gb = step(opt, model), step(opt2, twin)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        # the next step's preconditioned direction from the same factors and inverse
        grads = [blk.param_matrix().detach() for blk in opt.layers]
        ua, ub = opt.inverse.apply(grads), opt2.inverse.apply(grads)
        for a, b in zip(ua, ub):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["replicate_inverses", "shard_inverses"])
def test_data_parallel_world_one_equals_the_preconditioner(mode):
    """DistributedKFACPreconditioner on one rank (flat factor buffer, ShardedInverse with the
    ``kron_grouped`` parts in replicate mode) gives the preconditioner's directions."""
    from kfac_fast.distributed import LocalDistributor
    from kfac_fast.preconditioner import DistributedKFACPreconditioner

    x, y = _data()
    x = x.double()
    outs = []
    for cls, kw in ((KFACPreconditioner, {}), (DistributedKFACPreconditioner,
                                               dict(mode=mode, distributor=LocalDistributor()))):
        torch.manual_seed(0)
        model = ResNeXtBlock().double()
        pre = cls(model, loss=CE, damping=0.3, capture="pass", step_size=None, T3=2,
                  generator=torch.Generator().manual_seed(0), **kw)
        sgd = torch.optim.SGD(model.parameters(), lr=0.3)
        dirs = []
        for _ in range(5):
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(x, y)
            dirs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            sgd.step()
        outs.append(dirs)
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
