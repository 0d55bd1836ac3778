"""Small models with the layers of models people train (tests only), written from the public
descriptions of the library modules (no transformers import), and independent float64
references for their K-FAC factors built from torch autograd alone (no kfac_fast code)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dense as dn

D = torch.float64
CE = "softmax_cross_entropy"


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as documented: weight (nx, nf), bias (nf,), x @ weight + bias."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class LlamaRMSNorm(nn.Module):
    """An RMSNorm as transformers writes it: 1-D weight, variance_epsilon, weight · x / rms(x)."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden) + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class GPT2Block(nn.Module):
    """(m, T, d) -> (m, T, k): a GPT-2 block (causal attention and MLP through Conv1D) and a head."""

    def __init__(self, d: int = 8, heads: int = 2, k: int = 5, norm: str = "layer"):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d) if norm == "layer" else LlamaRMSNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d) if norm == "layer" else LlamaRMSNorm(d)
        self.c_fc = Conv1D(2 * d, d)
        self.mlp_proj = Conv1D(d, 2 * d)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        m, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        sh = lambda t: t.view(m, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        att = (sh(q) @ sh(k).transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        o = (att @ sh(v)).transpose(1, 2).reshape(m, T, d)
        x = x + self.c_proj(o)
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return self.head(x)


def gpt2_problem(m: int = 6, T: int = 4, d: int = 8, k: int = 5, seed: int = 0, dtype=D, norm: str = "layer"):
    torch.manual_seed(seed)
    model = GPT2Block(d, 2, k, norm).to(dtype)
    x = torch.randn(m, T, d, dtype=dtype)
    y = torch.randint(0, k, (m, T))
    return model, x, y


# ----------------------------------------------------------------------------- references

def rows_A(a: torch.Tensor, bias: bool) -> torch.Tensor:
    """Ā = mean over rows of ā āᵀ for rows a (R, d), ā = [a; 1] with bias."""
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a.t() @ a / a.shape[0]


def empirical_G(model, x, y, path) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the module's input (R, d_in), (1/N) Σ_rows g gᵀ) with g = ∂(Σ_t CE_t)/∂s_row for
    the module's output s (last dim), by retain_grad in a plain forward."""
    mod = model.get_submodule(path)
    got = {}

    def hook(m, args, o):
        o.retain_grad()
        got["a"], got["s"] = args[0].detach(), o

    h = mod.register_forward_hook(hook)
    try:
        z = model(x)
    finally:
        h.remove()
    tot = F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="sum")
    (g,) = torch.autograd.grad(tot, got["s"])
    g = g.reshape(-1, g.shape[-1])
    return got["a"].reshape(-1, got["a"].shape[-1]), g.t() @ g / y.numel()


def record(records, path):
    hits = [r for r in records if r.name.endswith("." + path) or r.name == path]
    assert len(hits) == 1, (path, [r.name for r in records])
    return hits[0]


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda s: f"{msg}\n{s}")


def train(model, x, y, how: str, steps: int = 20, **kw) -> list[float]:
    """Losses of ``steps`` steps of KFAC or KFACPreconditioner(capture=pass/hooks) + SGD, float32."""
    from kfac_fast import KFAC, KFACPreconditioner

    def loss_of(z):
        return F.cross_entropy(z.flatten(0, -2), y.flatten())

    losses = []
    if how == "kfac":
        opt = KFAC(model, loss=CE, generator=torch.Generator().manual_seed(0), **kw)
        for _ in range(steps):
            losses.append(float(opt.step(x, y)["loss"]))
        return losses
    capture = {"pass": "pass", "hooks": "hooks"}[how]
    pre = KFACPreconditioner(model, loss=CE, damping=0.3, capture=capture, step_size=None,
                             generator=torch.Generator().manual_seed(0), **kw)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        sgd.zero_grad()
        loss = loss_of(model(x))
        loss.backward(retain_graph=capture == "hooks")  # fisher="mc" backpropagates the sampled loss too
        if capture == "pass":
            pre.step(x, y)
        else:
            pre.step()
        sgd.step()
        losses.append(loss.item())
    return losses


class ViTBlock(nn.Module):
    """(m, T, p) -> (m, k): a patch embedding, a pre-norm encoder block with nn.MultiheadAttention
    (``batch_first`` either way, optional key padding / attention masks), mean pooling, a head."""

    def __init__(self, p: int = 3, d: int = 8, heads: int = 2, k: int = 5, batch_first: bool = True,
                 need_weights: bool = False, masks: str = "none", attn_bias: bool = True):
        super().__init__()
        self.embed = nn.Linear(p, d)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first, bias=attn_bias)
        if attn_bias:
            nn.init.normal_(self.attn.in_proj_bias, std=0.1)
            nn.init.normal_(self.attn.out_proj.bias, std=0.1)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, k)
        self.need_weights, self.masks = need_weights, masks

    def attn_masks(self, T: int, m: int):
        """(key_padding_mask (m, T) bool or None, attn_mask (T, T) bool or None, is_causal)."""
        kpm = mask = None
        causal = False
        if self.masks in ("padding", "both"):
            kpm = torch.zeros(m, T, dtype=torch.bool)
            kpm[0, -1] = kpm[1 % m, -2:] = True  # the last tokens of two examples are padding
        if self.masks in ("causal", "both"):
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # True: not attended
            causal = self.masks == "causal"
        if self.masks == "float3d":  # an additive float mask per example and head
            g = torch.Generator().manual_seed(3)
            mask = torch.randn(m * self.attn.num_heads, T, T, generator=g)
        return kpm, mask, causal

    def forward(self, x):
        h = self.embed(x)
        m, T, _ = h.shape
        kpm, mask, causal = self.attn_masks(T, m)
        a = self.ln_1(h)
        if not self.attn.batch_first:
            a = a.transpose(0, 1)
        kw = dict(key_padding_mask=kpm, need_weights=self.need_weights)
        if mask is not None:
            kw.update(attn_mask=mask if mask.dtype == torch.bool else mask.to(a.dtype), is_causal=causal)
        o = self.attn(a, a, a, **kw)[0]
        if not self.attn.batch_first:
            o = o.transpose(0, 1)
        h = h + o
        h = h + self.proj(F.gelu(self.fc(self.ln_2(h))))
        return self.head(h.mean(1))


def vit_problem(m: int = 4, T: int = 3, seed: int = 0, dtype=D, **kw):
    torch.manual_seed(seed)
    model = ViTBlock(**kw).to(dtype)
    x = torch.randn(m, T, 3, dtype=dtype)
    y = torch.randint(0, 5, (m,))
    return model, x, y


def vit_reference(model: ViTBlock, x, probe_s=None, probe_y=None):
    """The ViT block's forward with attention written out (softmax(q kᵀ/√d_h + mask) v per head),
    plus optional zero probes on the in-projection output s (m, T, 3E) and the attention module's
    output y (m, T, E), and the out-projection input o (m, T, E). Returns (z, s, o)."""
    at = model.attn
    E, H = at.embed_dim, at.num_heads
    dh = E // H
    h = model.embed(x)
    m, T, _ = h.shape
    kpm, mask, _ = model.attn_masks(T, m)
    a = model.ln_1(h)
    s = a @ at.in_proj_weight.t() + (0 if at.in_proj_bias is None else at.in_proj_bias)
    if probe_s is not None:
        s = s + probe_s
    q, k, v = (t.reshape(m, T, H, dh).transpose(1, 2) for t in s.split(E, -1))
    scores = q @ k.transpose(-1, -2) / dh ** 0.5  # (m, H, T, T)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else \
            scores + mask.to(scores.dtype).reshape(m, H, T, T)
    if kpm is not None:
        scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(m, T, E)
    y = o @ at.out_proj.weight.t() + (0 if at.out_proj.bias is None else at.out_proj.bias)
    if probe_y is not None:
        y = y + probe_y
    h = h + y
    h = h + model.proj(F.gelu(model.fc(model.ln_2(h))))
    return model.head(h.mean(1)), s, o
