"""Norm-layer subclasses whose forward differs from their parent's, as timm writes them: a
channel-first LayerNorm (``LayerNorm2d``: permute, layer_norm over C, permute back) and a norm
followed by an activation inside the module (``BatchNormAct2d``, ``GroupNormAct``). The per-channel
2×2 Fisher of (w_c, b_c) against the dense float64 Fisher of tests/dense.py (per-example
Jacobians by jacrev through the real modules, exact F_R), with local copies of timm's layouts
(no timm needed) and, where timm is installed, timm's own classes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dense as dn
import kfac_fast
from kfac_fast.curvature.batch_factors import block_factors

D = torch.float64
CE = "softmax_cross_entropy"


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d's layout: LayerNorm over the channels of (m, C, H, W)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's layout: batch norm, then ``drop``, then ``act`` (in place)."""

    def __init__(self, c, act=nn.GELU):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class GroupNormAct(nn.GroupNorm):
    """timm.layers.GroupNormAct's layout."""

    def __init__(self, groups, c, act=nn.SiLU):
        super().__init__(groups, c)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _timm_layers():
    import _torchvision_placeholder

    _torchvision_placeholder.install()
    pytest.importorskip("timm")
    from timm import layers

    return layers


NORMS = {
    "layernorm2d": lambda: LayerNorm2d(4),
    "batchnorm_act_gelu": lambda: BatchNormAct2d(4),
    "batchnorm_act_relu_inplace": lambda: BatchNormAct2d(4, act=lambda: nn.ReLU(inplace=True)),
    "groupnorm_act": lambda: GroupNormAct(2, 4),
    "timm_LayerNorm2d": lambda: _timm_layers().LayerNorm2d(4),
    "timm_BatchNormAct2d": lambda: _timm_layers().BatchNormAct2d(4, act_layer=nn.SiLU),
    "timm_GroupNormAct": lambda: _timm_layers().GroupNormAct(4, num_groups=2, act_layer=nn.GELU),
    "timm_LayerNormAct2d": lambda: _timm_layers().LayerNormAct2d(4, act_layer=nn.GELU),
}


def _case(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    norm = NORMS[kind]()
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(D)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        norm.weight.copy_(torch.randn(4, generator=g, dtype=D))
        norm.bias.copy_(torch.randn(4, generator=g, dtype=D))
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.copy_(torch.randn(4, generator=g, dtype=D))
            norm.running_var.copy_(torch.rand(4, generator=g, dtype=D) + 0.5)
    model.eval()  # BatchNorm: running statistics, so each example's output is its own
    return model, torch.randn(5, 2, 3, 3, generator=g, dtype=D)


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_variant_block_is_the_per_channel_2x2_fisher(kind):
    model, x = _case(kind)
    recs = block_factors(model, x, CE, fisher="exact")
    (rec,) = [r for r in recs if r.name.endswith(".1")]
    ref = dn.norm_fisher_2x2(model, x, CE, "1.weight", "1.bias")
    assert tuple(rec.F.shape) == (4, 2, 2)
    assert float(ref.abs().max()) > 1e-3  # a non-trivial reference
    torch.testing.assert_close(rec.F, ref, rtol=1e-9, atol=1e-12)


def test_activation_inside_the_norm_is_not_ignored():
    # the same network with the activation outside the norm (plain BatchNorm2d, then GELU) has
    # the same norm Fisher; the Fisher taken at act's output instead (the hook's raw g, what the
    # block used before the chain rule) differs from it by far more than the tolerance
    model, x = _case("batchnorm_act_gelu")
    bn = nn.BatchNorm2d(4).to(D).eval()
    bn.load_state_dict(model[1].state_dict())
    plain = nn.Sequential(model[0], bn, nn.Sequential(nn.GELU(), *model[2:])).eval()
    ref = dn.norm_fisher_2x2(plain, x, CE, "1.weight", "1.bias")
    torch.testing.assert_close(dn.norm_fisher_2x2(model, x, CE, "1.weight", "1.bias"), ref, rtol=1e-12, atol=1e-14)
    (rec,) = [r for r in block_factors(model, x, CE, fisher="exact") if r.name.endswith(".1")]
    torch.testing.assert_close(rec.F, ref, rtol=1e-9, atol=1e-12)
    (rec_plain,) = [r for r in block_factors(plain, x, CE, fisher="exact") if r.name.endswith(".1")]
    torch.testing.assert_close(rec_plain.F, ref, rtol=1e-9, atol=1e-12)
    no_act = nn.Sequential(model[0], bn, *model[2:]).eval()  # the Fisher with act's derivative taken as 1
    assert float((dn.norm_fisher_2x2(no_act, x, CE, "1.weight", "1.bias") - ref).abs().max()) > 1e-4


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: an RMS norm without bias named LayerNorm."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _hf_t5_layer_norm(d):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    return t5.T5LayerNorm(d)


@pytest.mark.parametrize("make", [T5LayerNorm, _hf_t5_layer_norm], ids=["local", "transformers"])
def test_t5_layer_norm_is_an_rms_norm_block(make):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), make(6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6, generator=g, dtype=D))
    x = torch.randn(2, 4, 3, generator=g, dtype=D)  # (m, T, d): one loss term per token
    recs = block_factors(model, x, CE, fisher="exact", unsupported="error")
    (rec,) = [r for r in recs if r.name.endswith(".1")]
    ref = dn.norm_fisher_2x2(model, x, CE, "1.weight")
    assert tuple(rec.F.shape) == (6, 1, 1) and float(ref.abs().max()) > 1e-3
    # transformers' T5LayerNorm forms its variance in float32 even in a float64 model
    rtol = 1e-9 if make is T5LayerNorm else 1e-6
    torch.testing.assert_close(rec.F, ref, rtol=rtol, atol=1e-12)


class _NormWithExtra(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.proj(super().forward(x))


class _NormActDropout(BatchNormAct2d):
    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Dropout(0.1)


@pytest.mark.parametrize("cls,why", [(_NormWithExtra, "sub-modules proj inside the norm layer"),
                                     (_NormActDropout, "Dropout.*between the normalisation and its activation")])
def test_norm_subclass_with_other_children_is_refused_with_the_reason(cls, why):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), cls(4), nn.Flatten(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        cov = kfac_fast.KFACPreconditioner(model, loss=CE).coverage()
    skipped = {e.name: e.reason for e in cov.entries if e.kind == "skipped"}
    assert "model.1.weight" in skipped and "model.1.bias" in skipped, str(cov)
    import re
    assert re.search(why, skipped["model.1.weight"]), skipped
    with pytest.raises(ValueError, match=why):
        kfac_fast.KFACPreconditioner(model, loss=CE, unsupported="error")


class _Block(nn.Module):
    """A container applying its own parameter (a layer scale, as timm's ConvNeXtBlock.gamma)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gamma = nn.Parameter(torch.full((3,), 1e-2))

    def forward(self, x):
        return x + self.gamma * self.fc(x)


def test_a_containers_own_parameter_is_named_as_such():
    model = nn.Sequential(_Block(), nn.Linear(3, 2), nn.LSTM(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kfac_fast.CoverageWarning)
        cov = kfac_fast.KFACPreconditioner(model, loss=CE).coverage()
    by = {e.name: e.reason for e in cov.entries if e.kind == "skipped"}
    assert "used directly in the forward of" in by["model.0.gamma"] and "model.0" in by["model.0.gamma"], by
    assert "no block for this layer type" in by["model.2.weight_ih_l0"], by  # a leaf layer type


class LayerScale(nn.Module):
    """timm.layers.LayerScale's layout: x * gamma over the last dim."""

    def __init__(self, d, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.full((d,), 1e-1))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class LayerScale2d(LayerScale):
    """timm.layers.LayerScale2d's layout: gamma over dim 1 of (m, C, H, W)."""

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


def _layer_scale_case(kind):
    g = torch.Generator().manual_seed(4)
    if kind.endswith("2d"):
        ls = LayerScale2d(4) if kind == "local2d" else _timm_layers().LayerScale2d(4)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), ls, nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
        x = torch.randn(5, 2, 3, 3, generator=g, dtype=D)
    else:
        ls = LayerScale(6) if kind == "local" else _timm_layers().LayerScale(6)
        model = nn.Sequential(nn.Linear(3, 6), ls, nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(2, 4, 3, generator=g, dtype=D)  # (m, T, d): one loss term per token
    model = model.to(D)
    with torch.no_grad():
        ls.gamma.copy_(torch.randn(ls.gamma.shape, generator=g, dtype=D))
    return model, x


@pytest.mark.parametrize("kind", ["local", "local2d", "timm", "timm2d"])
def test_layer_scale_is_the_per_channel_fisher_of_gamma(kind):
    torch.manual_seed(0)
    model, x = _layer_scale_case(kind)
    recs = block_factors(model, x, CE, fisher="exact", unsupported="error")
    (rec,) = [r for r in recs if r.name.endswith(".1")]
    ref = dn.norm_fisher_2x2(model, x, CE, "1.gamma")
    C = model[1].gamma.numel()
    assert tuple(rec.F.shape) == (C, 1, 1) and float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(rec.F, ref, rtol=1e-9, atol=1e-12)
    cov = kfac_fast.curvature.coverage(model, kfac_fast.curvature.blocks.find_blocks(model))
    assert [e.kind for e in cov.entries if e.name.endswith(".1")] == ["scale-shift"]


def test_layer_scale_in_place_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 6), LayerScale(6, inplace=True), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="inplace=True.*build it with inplace=False"):
        kfac_fast.KFACPreconditioner(model, loss=CE, unsupported="error")

