"""The models of tests/integration_zoo.py (small random timm and transformers models: ResNets,
EfficientNet/MobileNetV3 with BatchNormAct2d, ConvNeXt with LayerNorm2d, ViT/DeiT/Swin, RegNet,
DenseNet; Llama, GPT-2, Qwen2, Mistral, Phi, Gemma, BERT, RoBERTa, DistilBERT, T5, ViT) as their
users train them: what ``coverage()`` models and leaves out (each left-out parameter named, so a
layer falling to the fallback fails here), ``KFACPreconditioner(capture="hooks")`` attached to
AdamW with a scheduler, float32 and under CPU bf16 autocast, and ``KFAC``. The numbers of
benchmarks/sweep_models.py. Skipped without timm / transformers."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import kfac_fast

from integration_zoo import MODELS, user_loss

pytestmark = pytest.mark.integration

TIED = {"weight"}  # a shared weight: skipped by the preconditioner by default (tied_weights=, docs/architectures.md)
# model -> (least Kronecker fraction, the parameters (last name component) left to diagonal/skip)
EXPECTED = {
    "timm_resnet18ish": (0.99, set()),
    "timm_resnet50ish": (0.98, set()),
    "timm_efficientnet_b0": (0.80, set()),  # depthwise convolutions: dense per-channel blocks
    "timm_mobilenetv3_small_050": (0.90, set()),
    "timm_convnext_atto": (0.93, {"gamma"}),  # layer scale: a raw parameter in ConvNeXtBlock.forward
    "timm_vit_tiny_patch16": (0.98, {"cls_token", "pos_embed"}),
    "timm_deit_tiny_distilled": (0.98, {"cls_token", "dist_token", "pos_embed"}),
    "timm_deit3_layerscale": (0.98, {"cls_token", "pos_embed"}),  # LayerScale modules: 1×1 blocks
    "timm_swin_tiny": (0.98, {"relative_position_bias_table"}),
    "timm_regnet_small": (0.95, set()),  # grouped convolutions: one Kronecker product per group (the rest: norms)
    "timm_densenet_small": (0.95, set()),
    "hf_llama": (0.99, set()),
    "hf_gpt2": (0.92, TIED),  # tied embedding/head: the fallback by default (tied_weights=)
    "hf_qwen2": (0.99, set()),
    "hf_mistral": (0.99, set()),
    "hf_phi": (0.99, set()),
    "hf_gemma": (0.89, TIED),
    "hf_bert_seqcls": (0.99, set()),
    "hf_roberta_mlm": (0.89, TIED | {"bias"}),  # a tied head with a bias: the diagonal fallback
    "hf_distilbert_seqcls": (0.99, set()),
    "hf_t5": (0.94, TIED),  # three users of one weight (encoder, decoder, head): the fallback
    "hf_vit": (0.97, {"cls_token", "position_embeddings"}),
}
assert set(EXPECTED) == set(MODELS)

# a few seconds each on one CPU thread: the heavy group
SLOW = {"timm_mobilenetv3_small_050", "timm_regnet_small", "timm_efficientnet_b0"}
NAMES = [pytest.param(n, marks=pytest.mark.heavy) if n in SLOW else n for n in MODELS]


def _build(name):
    make, batch_fn = MODELS[name]
    if name.startswith("timm"):
        import _torchvision_placeholder

        _torchvision_placeholder.install()
        pytest.importorskip("timm")
    else:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' config notices
        model = make().train()
    batch, y = batch_fn()
    return model, batch, y


@pytest.mark.parametrize("name", list(MODELS))
def test_coverage_names_what_is_left_out(name):
    model, _, _ = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        cov = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy").coverage()
    least, allowed = EXPECTED[name]
    left = {e.name.split(".")[-1] for e in cov.entries if e.kind in ("diagonal", "skipped")}
    assert left == allowed, str(cov)
    assert cov.kronecker_fraction >= least, str(cov)
    for e in cov.entries:
        if e.kind == "skipped":
            assert e.reason, str(cov)


def _train_attached(name, autocast: bool):
    model, batch, y = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", capture="hooks", fisher="empirical")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    pre.attach(opt, targets=lambda b: y)
    losses, k0 = [], pre.k
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = user_loss(model, batch, y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    assert pre.k - k0 == 5  # every optimizer step preconditioned
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_preconditioner_hooks_attached_trains(name):
    _train_attached(name, autocast=False)


@pytest.mark.parametrize("name", ["timm_convnext_atto", "timm_densenet_small", "hf_t5", "hf_llama"])
def test_preconditioner_hooks_attached_trains_under_bf16_autocast(name):
    _train_attached(name, autocast=True)


@pytest.mark.parametrize("name", NAMES)
def test_kfac_trains(name):
    model, batch, y = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
    losses = [float(opt.step(batch, y)["loss"]) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
