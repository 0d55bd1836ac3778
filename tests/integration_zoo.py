"""Small random-init models as timm and Hugging Face transformers build them (a few layers,
small widths, 32×32 images, 16-token sequences; no downloads), each with a batch and the targets
its users' loss sees, and that loss: shared by tests/test_integrations_sweep.py and
benchmarks/sweep_models.py. timm is imported under ``_torchvision_placeholder`` (torchvision's
wheels here are CUDA builds that fail to import beside CPU torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kfac_fast

V = 128  # vocabulary of the language models
M_IMG, M_SEQ, T_SEQ, CLASSES = 16, 8, 16, 10


# ------------------------------------------------------------------ models
def _timm():
    import _torchvision_placeholder

    _torchvision_placeholder.install()
    import timm

    return timm


def _tf():
    import transformers

    return transformers


def timm_model(name, **kw):
    def make():
        return _timm().create_model(name, num_classes=CLASSES, **kw)
    return make


def timm_resnet(block: str, channels):
    def make():
        _timm()
        from timm.models import resnet

        b = resnet.BasicBlock if block == "basic" else resnet.Bottleneck
        return resnet.ResNet(b, layers=(1, 1, 1, 1), channels=channels, stem_width=16, num_classes=CLASSES)
    return make


def timm_efficientnet():
    _timm()
    from timm.models import efficientnet

    return efficientnet._gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.34,
                                          num_classes=CLASSES)


def timm_regnet():
    _timm()
    from timm.models import regnet

    cfg = regnet.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, stem_width=16)
    return regnet.RegNet(cfg, num_classes=CLASSES)


def timm_densenet():
    _timm()
    from timm.models import densenet

    return densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_classes=CLASSES, bn_size=2)


def hf(config_name, model_name, **cfg):
    def make():
        tf = _tf()
        return getattr(tf, model_name)(getattr(tf, config_name)(**cfg))
    return make


_LM = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
_BERT = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, type_vocab_size=2)


# ------------------------------------------------------------------ batches: (batch, targets)
def image_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(M_IMG, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (M_IMG,), generator=g)


def hf_image_batch():
    x, y = image_batch()
    return {"pixel_values": x, "labels": y}, y


def causal_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (M_SEQ, T_SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, kfac_fast.causal_lm_targets(ids)


def seqcls_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (M_SEQ, T_SEQ), generator=g)
    y = torch.randint(0, 3, (M_SEQ,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y}, y


def mlm_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (M_SEQ, T_SEQ), generator=g)
    masked = torch.rand(M_SEQ, T_SEQ, generator=g) < 0.3
    masked[:, 0] = True
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inp = torch.where(masked, torch.full_like(ids, 3), ids)
    return {"input_ids": inp, "attention_mask": torch.ones_like(ids), "labels": labels}, labels


def seq2seq_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (M_SEQ, T_SEQ), generator=g)
    labels = torch.randint(1, V, (M_SEQ, T_SEQ // 2), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, labels


def _classes3(cfg):
    return dict(cfg, num_labels=3)


MODELS = {
    # timm
    "timm_resnet18ish": (timm_resnet("basic", (16, 32, 64, 128)), image_batch),
    "timm_resnet50ish": (timm_resnet("bottleneck", (8, 16, 32, 64)), image_batch),
    "timm_efficientnet_b0": (timm_efficientnet, image_batch),
    "timm_mobilenetv3_small_050": (timm_model("mobilenetv3_small_050"), image_batch),
    "timm_convnext_atto": (timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), image_batch),
    "timm_vit_tiny_patch16": (timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                         num_heads=2), image_batch),
    "timm_deit_tiny_distilled": (timm_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                                            embed_dim=64, num_heads=2), image_batch),
    "timm_deit3_layerscale": (timm_model("deit3_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                                         num_heads=2), image_batch),
    "timm_swin_tiny": (timm_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                  embed_dim=32, depths=(1, 1), num_heads=(2, 4)), image_batch),
    "timm_regnet_small": (timm_regnet, image_batch),
    "timm_densenet_small": (timm_densenet, image_batch),
    # transformers
    "hf_llama": (hf("LlamaConfig", "LlamaForCausalLM", **_LM), causal_batch),
    "hf_gpt2": (hf("GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                   bos_token_id=0, eos_token_id=0), causal_batch),
    "hf_qwen2": (hf("Qwen2Config", "Qwen2ForCausalLM", **_LM), causal_batch),
    "hf_mistral": (hf("MistralConfig", "MistralForCausalLM", **_LM), causal_batch),
    "hf_phi": (hf("PhiConfig", "PhiForCausalLM", **_LM), causal_batch),
    "hf_gemma": (hf("GemmaConfig", "GemmaForCausalLM", head_dim=16, **_LM), causal_batch),
    "hf_bert_seqcls": (hf("BertConfig", "BertForSequenceClassification", **_classes3(_BERT)), seqcls_batch),
    "hf_roberta_mlm": (hf("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1,
                          **dict(_BERT, max_position_embeddings=72)), mlm_batch),
    "hf_distilbert_seqcls": (hf("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=V, dim=64,
                                hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3),
                             seqcls_batch),
    "hf_t5": (hf("T5Config", "T5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                 num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0), seq2seq_batch),
    "hf_vit": (hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=CLASSES),
               hf_image_batch),
}


# ------------------------------------------------------------------ the user's loss
def user_loss(model, batch, y):
    """The loss as each library's users write it: ``out.loss`` for a Hugging Face model given
    ``labels``, cross-entropy on the logits otherwise."""
    if isinstance(batch, dict):
        return model(**batch).loss
    out = model(batch)
    if isinstance(out, (tuple, list)):  # timm's distilled heads in training mode
        return sum(F.cross_entropy(o, y) for o in out) / len(out)
    return F.cross_entropy(out, y)
