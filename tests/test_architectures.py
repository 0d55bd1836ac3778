"""Whole models beyond MLPs: a residual CNN with BatchNorm and a
causal transformer LM with padded, ignore_index targets, through KFAC and KFACPreconditioner:
batches of any structure, module buffers, the unsupported-parameter policies, checkpoints."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC, KFACPreconditioner
from kfac_fast.curvature.blocks import DiagonalBlock, LinearBlock, find_blocks

from arch_models import TinyLM, cnn_problem, lm_problem


def _kinds(blocks):
    return [type(b).__name__ for b in blocks]


def test_blocks_found_for_cnn_and_transformer():
    cnn, _, _ = cnn_problem()
    b = find_blocks(cnn, unsupported="diagonal")
    assert _kinds(b).count("Conv2dBlock") == 4 and _kinds(b).count("ScaleShiftBlock") == 3
    assert isinstance(b[-1], DiagonalBlock) and b[-1].name == "model.temperature"
    lm, _, _ = lm_problem()
    b = find_blocks(lm, unsupported="diagonal")
    assert _kinds(b).count("EmbeddingBlock") == 2 and _kinds(b).count("LinearBlock") == 13
    assert _kinds(b).count("ScaleShiftBlock") == 5 and not any(isinstance(x, DiagonalBlock) for x in b)


@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("task", ["cnn", "lm"])
def test_kfac_trains_and_leaves_buffers_to_the_gradient_pass(task, inverse):
    model, x, y = cnn_problem() if task == "cnn" else lm_problem()
    opt = KFAC(model, loss="softmax_cross_entropy", inverse=inverse, generator=torch.Generator().manual_seed(0))
    batch = x if task == "cnn" else {"ids": x}
    first = None
    for k in range(12):
        if task == "cnn":
            before = model.bn.num_batches_tracked.item()
        s = opt.step(batch, y)
        if task == "cnn":  # only the gradient pass moved the running statistics: one update per step
            assert model.bn.num_batches_tracked.item() == before + 1
        first = s["loss"] if first is None else first
        assert math.isfinite(s["loss"])
    assert s["loss"] < 0.9 * first


def test_bn_running_stats_equal_those_of_one_plain_forward_per_step():
    model, x, y = cnn_problem()
    twin = copy.deepcopy(model)
    opt = KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    opt.step(x, y)
    with torch.no_grad():
        twin(x)  # the gradient pass at the same θ: the only pass allowed to touch the buffers
    for (n, b), (_, t) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, t), n


def test_preconditioner_leaves_buffers_alone():
    model, x, y = cnn_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc")
    F.cross_entropy(model(x), y).backward()
    bufs = [b.clone() for b in model.buffers()]
    pre.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))


def test_ignored_targets_change_nothing():
    """Changing the inputs' targets at ignored positions to other ignored values, or the tokens'
    targets at positions already ignored, leaves the whole trajectory unchanged; the objective is
    F.cross_entropy with ignore_index."""
    model, ids, tgt = lm_problem()
    m2 = copy.deepcopy(model)
    tgt2 = tgt.clone()
    tgt2[tgt == -100] = -100
    opt = KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(1))
    s = opt.step(ids, tgt)
    ref = F.cross_entropy(m2(ids).flatten(0, 1), tgt.flatten(), ignore_index=-100).item()
    assert abs(s["loss"] - ref) < 1e-12
    # another ignore_index value: the same targets marked with -1 give the same step
    m3 = copy.deepcopy(m2)
    tgt3 = tgt.clone()
    tgt3[tgt == -100] = -1
    opt3 = KFAC(m3, loss="softmax_cross_entropy", ignore_index=-1, generator=torch.Generator().manual_seed(1))
    s3 = opt3.step(ids, tgt3)
    assert s3["loss"] == s["loss"]
    for a, b in zip(model.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="every target is ignore_index"):
        KFAC(copy.deepcopy(m2), loss="softmax_cross_entropy").step(ids, torch.full_like(tgt, -100))
    with pytest.raises(ValueError, match=r"must lie in \[0, 11\) or -100"):
        bad = tgt.clone()
        bad[0, 0] = 11
        KFAC(copy.deepcopy(m2), loss="softmax_cross_entropy").step(ids, bad)


class _Tuple(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, a, b, scale=1.0):
        return self.inner(torch.cat([a, b], 1)) * scale


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
def test_tuple_list_and_dict_batches_equal_the_tensor_batch(structure):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    ref = copy.deepcopy(net)
    wrapped = _Tuple(net)
    a, b = x[:, :2], x[:, 2:]
    batch = {"tuple": (a, b), "list": [a, b, 1.0], "dict": {"a": a, "b": b, "scale": 1.0}}[structure]
    o1 = KFAC(wrapped, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    o2 = KFAC(ref, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        s1, s2 = o1.step(batch, y), o2.step(x, y)
        assert abs(s1["loss"] - s2["loss"]) < 1e-12
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_batch_errors_name_the_problem():
    model, x, y = cnn_problem()
    opt = KFAC(model, loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match=r"inputs\[1\] has 3 rows but inputs\[0\] has 24"):
        opt.step((x, x[:3]), y)
    with pytest.raises(TypeError, match="a batch is a tensor, a tuple/list"):
        opt.step("images", y)
    with pytest.raises(ValueError, match="rows but targets"):
        opt.step(x, y[:5])


def test_unsupported_policies():
    class WithGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = WithGRU().double()
    x = torch.randn(16, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    with pytest.raises(ValueError, match=r"unsupported layer nn.GRU at model.rnn .*unsupported='diagonal'.*'skip'"):
        KFAC(model, loss="softmax_cross_entropy", unsupported="error")
    opt = KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    assert sum(isinstance(b, DiagonalBlock) for b in opt.layers) == 4  # GRU weights/biases
    w0 = model.rnn.weight_ih_l0.detach().clone()
    for _ in range(3):
        assert math.isfinite(opt.step(x, y)["loss"])
    assert not torch.equal(w0, model.rnn.weight_ih_l0)
    skip = KFAC(copy.deepcopy(model), loss="softmax_cross_entropy", unsupported="skip")
    assert all(isinstance(b, LinearBlock) for b in skip.layers)
    # the preconditioner skips by default: the GRU's .grad stays the user's
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    F.cross_entropy(model(x), y).backward()
    g_rnn = model.rnn.weight_hh_l0.grad.clone()
    g_head = model.head.weight.grad.clone()
    pre.step(x, y)
    assert torch.equal(model.rnn.weight_hh_l0.grad, g_rnn) and not torch.equal(model.head.weight.grad, g_head)
    with pytest.raises(ValueError, match="unknown unsupported='ignore'"):
        KFAC(model, loss="softmax_cross_entropy", unsupported="ignore")


def test_refused_configurations_follow_the_policy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"nn.Conv2d with padding_mode='circular' .* at model.0"):
        KFAC(model, loss="softmax_cross_entropy", unsupported="error")
    opt = KFAC(model, loss="softmax_cross_entropy")
    assert [type(b) for b in opt.layers] == [LinearBlock, DiagonalBlock, DiagonalBlock]


@pytest.mark.parametrize("bias", [False, True])
def test_tied_weights_are_a_kronecker_sum_pair_or_diagonal(bias):
    """A bias-free head tied to the embedding: the diagonal fallback by default, the Kronecker-sum
    pair with tied_weights="kronecker_sum" (tests/test_tied_weights.py); with a bias: the diagonal
    fallback of any other sharing either way."""
    from kfac_fast.curvature.blocks.tied import TiedEmbeddingBlock, TiedHeadBlock

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=bias)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    model = Tied().double()
    # the default: the shared weight (one parameter) and any bias get one diagonal block each
    assert [type(b) for b in find_blocks(model, unsupported="diagonal")] == [DiagonalBlock] * (2 if bias else 1)
    blocks = find_blocks(model, unsupported="diagonal", tied_weights="kronecker_sum")
    want = [DiagonalBlock, DiagonalBlock] if bias else [TiedEmbeddingBlock, TiedHeadBlock]
    assert [type(b) for b in blocks] == want
    ids = torch.randint(0, 7, (10, 3))
    for tied_weights in ("unsupported", "kronecker_sum"):
        opt = KFAC(model, loss="softmax_cross_entropy", tied_weights=tied_weights)
        assert math.isfinite(opt.step(ids, ids)["loss"])


@pytest.mark.parametrize("inverse", ["block_diagonal", "block_tridiagonal"])
@pytest.mark.parametrize("task", ["cnn", "lm"])
def test_checkpoint_round_trip_is_bit_identical(task, inverse):
    model, x, y = cnn_problem() if task == "cnn" else lm_problem()
    batch = x if task == "cnn" else {"ids": x}
    opt = KFAC(model, loss="softmax_cross_entropy", inverse=inverse, T3=2, T2=2,
               generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.step(batch, y)
    m_state, o_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(batch, y)
    twin = copy.deepcopy(model)
    twin.load_state_dict(m_state)
    o2 = KFAC(twin, loss="softmax_cross_entropy", inverse=inverse, T3=2, T2=2)
    o2.load_state_dict(o_state)
    for _ in range(3):
        o2.step(batch, y)
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("task", ["cnn", "lm"])
def test_preconditioner_with_sgd_trains_and_round_trips(task):
    model, x, y = cnn_problem() if task == "cnn" else lm_problem()

    def loss_of(m):
        z = m(x)
        return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=-100)

    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", tau1=1.0, damping=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for k in range(10):
        sgd.zero_grad()
        loss = loss_of(model)
        loss.backward()
        pre.step(x, y)
        sgd.step()
        losses.append(loss.item())
        if k == 4:
            ms, ps, ss = (copy.deepcopy(model.state_dict()), copy.deepcopy(pre.state_dict()),
                          copy.deepcopy(sgd.state_dict()))
    assert losses[-1] < losses[0]
    twin = copy.deepcopy(model)
    twin.load_state_dict(ms)
    p2 = KFACPreconditioner(twin, loss="softmax_cross_entropy", fisher="empirical", tau1=1.0, damping=0.1)
    p2.load_state_dict(ps)
    s2 = torch.optim.SGD(twin.parameters(), lr=0.05)
    s2.load_state_dict(ss)
    for _ in range(5):
        s2.zero_grad()
        loss_of(twin).backward()
        p2.step(x, y)
        s2.step()
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n


def test_expand_and_reduce_are_keywords_everywhere():
    model, ids, tgt = lm_problem()
    for approx in ("expand", "reduce"):
        opt = KFAC(copy.deepcopy(model), loss="softmax_cross_entropy", kfac_approx=approx)
        assert all(b.kfac_approx == approx for b in opt.layers)
        assert math.isfinite(opt.step(ids, tgt)["loss"])
        pre = KFACPreconditioner(copy.deepcopy(model), loss="softmax_cross_entropy", kfac_approx=approx)
        assert all(b.kfac_approx == approx for b in pre.layers)
    with pytest.raises(ValueError, match="unknown kfac_approx 'mean'"):
        KFAC(model, loss="softmax_cross_entropy", kfac_approx="mean")


@pytest.mark.parametrize("task,mode", [("cnn", "eval"), ("cnn", "train"), ("lm", "train")])
def test_linearized_forward_equals_jvp_for_every_block_kind(task, mode):
    """J·v of the block tangents (hooks: conv, embedding, norm, linear on sequences; dual
    parameters: BatchNorm in training mode, diagonal blocks) equals torch.func.jvp."""
    from kfac_fast.quadratic import linearized_forward_many

    model, x, _ = cnn_problem() if task == "cnn" else lm_problem()
    model.train(mode == "train")
    blocks = find_blocks(model, unsupported="diagonal")
    g = torch.Generator().manual_seed(5)
    dirs = [[torch.randn(b.g_dim, b.a_dim, dtype=torch.float64, generator=g) for b in blocks] for _ in range(2)]
    bufs = [b.clone() for b in model.buffers()]
    z, jvs = linearized_forward_many(model, blocks, x, dirs)
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    names = [n for n, _ in model.named_parameters()]
    ids = {id(p): n for n, p in model.named_parameters()}
    params = tuple(p.detach() for _, p in model.named_parameters())
    for d, jv in zip(dirs, jvs):
        tang = {n: torch.zeros_like(p) for n, p in zip(names, params)}
        for b, D in zip(blocks, d):
            for p, t in zip(b.params(), b.from_matrix(D)):
                tang[ids[id(p)]] = t.reshape(p.shape)
        ref_model = copy.deepcopy(model)  # an independent route: double-backward JVP (no forward AD)

        def f(*ps):
            return torch.func.functional_call(ref_model, dict(zip(names, ps)), (x,))

        z_ref, jv_ref = torch.autograd.functional.jvp(f, params, tuple(tang[n] for n in names))
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jv, jv_ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("task", ["cnn", "lm"])
def test_every_backend_agrees_with_torch_on_every_block_kind(task, backend):
    """Factors (conv Ā by the implicit-im2col kernel on Triton) and the step of every block kind
    in float32 against the torch backend."""
    import kfac_fast

    if not kfac_fast.available_backends()[backend].available:
        pytest.skip(f"{backend} backend unavailable")
    model, x, y = cnn_problem(m=8) if task == "cnn" else lm_problem(m=6)
    model = model.float()
    if task == "cnn":
        x = x.float()
    twin = copy.deepcopy(model)
    runs = []
    for m, be in ((model, "torch"), (twin, backend)):
        opt = KFAC(m, loss="softmax_cross_entropy", backend=be, generator=torch.Generator().manual_seed(0),
                   inverse="block_tridiagonal" if task == "lm" else "block_diagonal")
        opt.step(x, y)
        runs.append(opt)
    for f, g in zip(runs[0].factors.current, runs[1].factors.current):
        for key in ("A", "G", "F", "A_next", "G_next"):
            a, b = getattr(f, key, None), getattr(g, key, None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=f"{f.name} {key}")
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("T,expect_s2,expect_rho", [(6, 43, 43), (64, 4, 4)])
def test_row_minimums_count_loss_terms(monkeypatch, T, expect_s2, expect_rho):
    """tau2_min_rows and rho_rows count loss terms: a sequence of T tokens is T terms, so S₂ and the
    ρ subset need ceil(256 / T) sequences (or the tau2 share of the batch, if larger)."""
    import kfac_fast.phases.proposal as proposal_phase  # where the step calls fisher_gram

    seen = {}
    real_gram, real_obj = proposal_phase.fisher_gram, KFAC._objective

    def spy_gram(model, layers, inputs, loss, dirs, **kw):
        seen["s2"] = inputs.shape[0]
        return real_gram(model, layers, inputs, loss, dirs, **kw)

    def spy_obj(self, inputs, targets, params=None):
        seen["rho"] = inputs.shape[0]
        return real_obj(self, inputs, targets, params)

    monkeypatch.setattr(proposal_phase, "fisher_gram", spy_gram)
    monkeypatch.setattr(KFAC, "_objective", spy_obj)
    model, ids, tgt = lm_problem(m=64, T=T, vocab=11)
    if T == 64:
        model = TinyLM(vocab=11, T=64).double()
    opt = KFAC(model, loss="softmax_cross_entropy", tau2=1 / 32, generator=torch.Generator().manual_seed(0))
    opt.step(ids, tgt)
    assert seen == {"s2": expect_s2, "rho": expect_rho}


def test_diverged_outputs_give_a_clear_error_in_the_preconditioner():
    model, x, y = cnn_problem()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model.head.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="sampled-target pass contain NaN or inf.*lower the learning rate"):
        pre.step(x, y)


@pytest.mark.parametrize("loss", ["sigmoid_cross_entropy", "squared_error"])
def test_nan_targets_mask_the_float_losses(loss):
    """ignore_nan_targets=True: a term whose k targets are all NaN is excluded from the objective
    and the factors (its G rows contribute nothing, N counts kept terms only); off by default."""
    from kfac_fast.curvature import kronecker_factors
    from kfac_fast.curvature.losses import get_loss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()  # token-wise on (m, T, 3)
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    y = torch.rand(3, 4, 4, dtype=torch.float64)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    yn = y.clone()
    yn[~keep] = float("nan")
    dist = get_loss(loss, ignore_nan_targets=True)
    z = net(x)
    ref = get_loss(loss)
    expect = ref.total(z[keep], y[keep]) / keep.sum()
    torch.testing.assert_close(dist.mean(z, yn), expect, rtol=1e-12, atol=1e-14)
    # exact G over the kept terms only = the flattened batch of kept positions; A over all positions
    masked = kronecker_factors(net, x, loss, fisher="exact", targets=yn, ignore_nan_targets=True)
    kept = kronecker_factors(net, x[keep], loss, fisher="exact")
    full = kronecker_factors(net, x.reshape(-1, 3), loss, fisher="exact")
    for f, k, a in zip(masked, kept, full):
        torch.testing.assert_close(f.G, k.G, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.A, a.A, rtol=1e-10, atol=1e-12)
    opt = KFAC(net, loss=loss, ignore_nan_targets=True, tau1=1.0, tau2=1.0, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        s = opt.step(x, yn)
        assert math.isfinite(s["loss"]) and not s["rejected"]
    partial = yn.clone()
    partial[0, 0, 0] = float("nan")
    opt.validate = True  # k = 4 is an ordinary iteration: targets are checked there only on request
    with pytest.raises(ValueError, match="mixes NaN and numbers"):
        opt.step(x, partial)
    with pytest.raises(ValueError, match="every loss term's targets are NaN"):
        opt.step(x, torch.full_like(y, float("nan")))
    if loss == "sigmoid_cross_entropy":  # without the flag a NaN target is an error, not a mask
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            KFAC(net, loss=loss, tau1=1.0, tau2=1.0).step(x, yn)
