"""KFACPreconditioner(capture="hooks") under activation (gradient) checkpointing.

``torch.utils.checkpoint`` runs a segment again inside the backward. Non-reentrant checkpointing
(``use_reentrant=False``, the default of transformers' ``gradient_checkpointing_enable()``) keeps
the forward's graph: the recorded forward's outputs receive the derivatives and the recomputation
is ignored. Reentrant checkpointing runs the forward under no_grad and backpropagates through the
recomputed outputs: the derivatives are taken there. Reference: the same model without
checkpointing (the factors and the preconditioned .grad equal, float64); the MC Fisher with
reentrant checkpointing is refused, naming the fix.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_fast import KFACPreconditioner

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


class Net(nn.Module):
    """Linear -> tanh -> [Linear -> LayerNorm -> tanh -> Linear -> tanh] -> Linear, the bracket
    checkpointed (``reentrant`` True/False) or not (None)."""

    def __init__(self, reentrant=None):
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.norm = nn.LayerNorm(6)

    def segment(self, h):
        return torch.tanh(self.c(torch.tanh(self.norm(self.b(h)))))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.segment(h) if self.reentrant is None else checkpoint(self.segment, h, use_reentrant=self.reentrant)
        return self.d(h)


def data(steps: int, m: int = 10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(m, 4, dtype=D, generator=g), torch.randint(0, 3, (m,), generator=g)) for _ in range(steps)]


def factors(pre):
    return [(f"{f.name}.{k}", getattr(f, k)) for f in pre.factors.current for k in ("A", "G", "F")
            if getattr(f, k, None) is not None]


def assert_same_run(ref, got):
    """Two (preconditioner, model) pairs after the same steps: factors and .grad equal."""
    (pre_r, model_r), (pre_g, model_g) = ref, got
    fr, fg = factors(pre_r), factors(pre_g)
    assert [n for n, _ in fr] == [n for n, _ in fg]
    for (n, a), (_, b) in zip(fr, fg):
        torch.testing.assert_close(b, a, **TIGHT, msg=lambda s: f"{n}: {s}")
    for (n, a), b in zip(model_r.named_parameters(), model_g.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TIGHT, msg=lambda s: f"{n}: {s}")


def train(model, fisher, steps, *, accumulate=1):
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks", damping=0.1, T3=2,
                             generator=torch.Generator().manual_seed(5))
    batches = data(steps * accumulate)
    for k in range(steps):
        model.zero_grad()
        ys = []
        for x, y in batches[k * accumulate:(k + 1) * accumulate]:
            (F.cross_entropy(model(x.requires_grad_(True)), y) / accumulate).backward()
            ys.append(y)
        pre.step(targets=ys[0] if accumulate == 1 else ys, grad_scale=1.0 / accumulate)
    return pre, model


@pytest.mark.parametrize("fisher,reentrant", [("empirical", False), ("empirical", True), ("mc", False)])
def test_checkpointed_segment_equals_plain_model(fisher, reentrant):
    """Three steps (inverse refreshes included), one forward per step and two accumulated."""
    for accumulate in (1, 2):
        ref = train(Net().double(), fisher, 3, accumulate=accumulate)
        model = Net(reentrant).double()
        recomputed = []
        model.c.register_forward_hook(lambda *a: recomputed.append(torch.is_grad_enabled()))
        got = train(model, fisher, 3, accumulate=accumulate)
        # the forward and the recomputation in the backward (and in the nested MC backward)
        assert len(recomputed) == (2 if fisher == "empirical" else 3) * 3 * accumulate
        assert_same_run(ref, got)
        assert got[0].k == 4


def test_mc_with_reentrant_checkpointing_names_the_fix():
    model = Net(True).double()
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="mc", capture="hooks")
    (x, y), = data(1)
    F.cross_entropy(model(x.requires_grad_(True)), y).backward()
    with pytest.raises(ValueError, match="use_reentrant=False.*fisher='empirical' or capture='pass'"):
        pre.step(targets=y)


def test_reentrant_forwards_backpropagated_together():
    """Two forwards, one backward of their summed losses under reentrant checkpointing: each
    recomputation is assigned to the pass whose backward runs (autograd finishes the later
    forward's nodes first), so the statistics equal the plain model's."""
    runs = []
    for reentrant in (None, True):
        model = Net(reentrant).double()
        pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", capture="hooks")
        (x1, y1), (x2, y2) = data(2)
        (F.cross_entropy(model(x1.requires_grad_(True)), y1)
         + F.cross_entropy(model(x2.requires_grad_(True)), y2)).backward()
        pre.step(targets=[y1, y2], grad_scale=1.0)
        runs.append((pre, model))
    assert_same_run(*runs)


# ----------------------------------------------------------------- transformers and timm
def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


def _lm_train(model, fisher, steps=2):
    import kfac_fast

    g = torch.Generator().manual_seed(0)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks", damping=0.1,
                             generator=torch.Generator().manual_seed(5))
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        ids[0, :3] = -100  # ignored terms
        model.zero_grad()
        model(input_ids=ids.clamp(min=0), labels=ids).loss.backward()
        pre.step(targets=kfac_fast.causal_lm_targets(ids))
    return pre, model


@pytest.mark.parametrize("fisher,reentrant", [("empirical", False), ("empirical", True), ("mc", False)])
def test_hf_llama_gradient_checkpointing(fisher, reentrant):
    ref = _lm_train(_llama(), fisher)
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    got = _lm_train(model, fisher)
    # two steps, each a forward and its recomputation (and the nested MC backward's)
    assert len(calls) == (4 if fisher == "empirical" else 6)
    assert_same_run(ref, got)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_timm_vit_set_grad_checkpointing(fisher):
    import _torchvision_placeholder

    _torchvision_placeholder.install()
    timm = pytest.importorskip("timm")

    def make():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2).double()

    def run(model):
        g = torch.Generator().manual_seed(0)
        pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks", damping=0.1,
                                 generator=torch.Generator().manual_seed(5))
        for _ in range(2):
            x, y = torch.randn(4, 3, 16, 16, dtype=D, generator=g), torch.randint(0, 3, (4,), generator=g)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(targets=y)
        return pre, model

    ref = run(make())
    model = make()
    model.set_grad_checkpointing(True)
    calls = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    got = run(model)
    assert len(calls) == (4 if fisher == "empirical" else 6)
    assert_same_run(ref, got)


@pytest.mark.heavy  # torch.compile
def test_mc_through_compiled_donated_buffers_names_the_fix():
    """A torch.compile'd part whose backward donates its saved tensors cannot be backpropagated
    twice; the MC Fisher's sampled backward inside the user's is refused, naming the fixes."""
    class Mid(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("W", torch.randn(8, 8))
            self.register_buffer("W2", torch.randn(8, 8))

        def forward(self, h):
            return torch.tanh(torch.tanh(h @ self.W) @ self.W2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.mid, self.b = nn.Linear(4, 8), torch.compile(Mid()), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.mid(self.a(x)))

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    try:
        F.cross_entropy(Model()(x), y).backward()  # compiles (skip where no compiler works)
    except Exception as exc:  # pragma: no cover - depends on the machine's toolchain
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}")
    for fisher in ("empirical", "mc"):
        model = Model()
        pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks")
        if fisher == "empirical":
            F.cross_entropy(model(x), y).backward()
            pre.step(targets=y)
            assert pre.k == 2
        else:
            with pytest.raises(RuntimeError, match="donated.*fisher='empirical' or capture='pass'.*donated_buffer"):
                F.cross_entropy(model(x), y).backward()


def test_recomputation_counts_are_checked():
    """check_pass asks every block run under no_grad in the forward to be recomputed once per
    backward of its pass: fewer (never recomputed) and more (another pass's recomputation) are
    refused, naming the fix."""
    from kfac_fast.curvature.blocks import find_blocks
    from kfac_fast.curvature.hooks import CapturedPass, check_pass

    blocks = find_blocks(Net().double())
    p = CapturedPass.empty(len(blocks))
    p.calls = [1] * len(blocks)
    p.no_grad, p.backwards = [1], 2
    for n, match in [(1, "not recomputed with grad"), (3, "recomputed 3 times in 2 backward.*use_reentrant=False")]:
        p.recomputed = {1: n}
        with pytest.raises(ValueError, match=match):
            check_pass(blocks, p)
    p.recomputed = {1: 2}
    check_pass(blocks, p)  # one per backward
    with pytest.raises(ValueError, match="use_reentrant=False.*fisher='empirical' or capture='pass'"):
        check_pass(blocks, p, sampled=True)
