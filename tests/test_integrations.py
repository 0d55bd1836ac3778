"""Models as their libraries build them (randomly initialised, tiny, no downloads): Hugging Face
transformers' LlamaForCausalLM (SDPA attention, RMSNorm) and GPT2LMHeadModel (Conv1D, tied
embeddings), timm's resnet18 and a torchvision-vit_b_16-shaped ViT on nn.MultiheadAttention.
Each trains 20 steps with KFAC and with KFACPreconditioner (both captures) and reports its
coverage. Skipped where the library is not installed (the ``integrations`` extra; timm goes in
with ``--no-deps``, see scripts/test.sh). torchvision: the index's wheels are CUDA builds that
fail to import beside CPU torch, so timm runs with a placeholder (``_torchvision_placeholder``)
and the ViT is written here in torchvision's layout (conv_proj, class_token, encoder.layers with
ln_1 / self_attention / ln_2 / mlp, heads)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_fast

pytestmark = pytest.mark.integration


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def _timm_resnet18():
    import _torchvision_placeholder

    _torchvision_placeholder.install()
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", num_classes=10)


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock's layout."""

    def __init__(self, heads: int, d: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class SmallViT(nn.Module):
    """vit_b_16's structure at 32×32 images, 8×8 patches, width 128, 2 layers."""

    def __init__(self, image: int = 32, patch: int = 8, d: int = 128, layers: int = 2, heads: int = 4,
                 classes: int = 10):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, d, patch, stride=patch)
        seq = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, d).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock(heads, d, 4 * d) for _ in range(layers)])
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.heads = nn.Linear(d, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.heads(self.ln(self.layers(x))[:, 0])


def _lm_batch(m=8, T=16, V=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (m, T), generator=g)
    return {"input_ids": ids}, kfac_fast.causal_lm_targets(ids)


def _image_batch(m=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, 3, 32, 32, generator=g), torch.randint(0, 10, (m,), generator=g)


MODELS = {
    "llama": (_llama, _lm_batch),
    "gpt2": (_gpt2, _lm_batch),
    "timm_resnet18": (_timm_resnet18, _image_batch),
    "vit": (SmallViT, _image_batch),
}


# full-size resnet18 (11M parameters, 4608-wide factors): minutes per training test, so in the
# heavy group that scripts/test.sh runs after the quick one
TRAINED = [pytest.param(n, marks=pytest.mark.heavy) if n == "timm_resnet18" else n for n in MODELS]


def _loss(model, x, y):
    z = model(**x).logits if isinstance(x, dict) else model(x)
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=-100)


@pytest.mark.parametrize("name", list(MODELS))
def test_coverage_is_kronecker(name):
    make, _ = MODELS[name]
    torch.manual_seed(0)
    # GPT-2's tied embedding / output matrix: one Kronecker-sum block with tied_weights="kronecker_sum"
    kw = {"tied_weights": "kronecker_sum"} if name == "gpt2" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfac_fast.CoverageWarning)
        model = make()
        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", **kw)
    cov = pre.coverage()
    print(cov)
    if name == "gpt2":
        # the head owns the shared weight, counted once; nothing is diagonal or skipped
        (tied,) = [e for e in cov.entries if e.kind == "kronecker_sum"]
        assert tied.name == "model.lm_head + model.transformer.wte", str(cov)
        assert tied.params == model.transformer.wte.weight.numel(), str(cov)
        assert not [e for e in cov.entries if e.kind in ("diagonal", "skipped")], str(cov)
    assert cov.kronecker_fraction >= 0.99, str(cov)


def test_gpt2_default_leaves_the_tied_matrix_to_the_fallback_and_says_how_to_model_it():
    """The default tied_weights="unsupported": the tied matrix is skipped by the preconditioner
    (92% of this tiny model's parameters stay Kronecker, above the warning threshold) and its
    reason names tied_weights='kronecker_sum'."""
    torch.manual_seed(0)
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfac_fast.CoverageWarning)
        cov = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy").coverage()
    (e,) = [e for e in cov.entries if e.kind == "skipped"]
    assert e.name == "model.transformer.wte.weight" and "tied_weights='kronecker_sum'" in e.reason, str(cov)
    assert 0.9 < cov.kronecker_fraction < 0.99, str(cov)


@pytest.mark.parametrize("capture", ["pass", "hooks"])
@pytest.mark.parametrize("name", TRAINED)
def test_preconditioner_trains(name, capture):
    make, batch = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = batch()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture=capture, fisher="empirical")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        losses.append(loss.item())
        if capture == "hooks":
            pre.step(targets=y)
        else:
            pre.step(x, y)
        opt.step()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", TRAINED)
def test_kfac_trains(name):
    make, batch = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = batch()
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
    losses = [float(opt.step(x, y)["loss"]) for _ in range(20)]
    assert losses[-1] < losses[0], losses
