"""Small models whose attention is ``F.scaled_dot_product_attention`` (the fused CPU/CUDA
kernels, which have neither a forward-mode derivative nor a double-backward), shared by the
J·v provider tests, the autocast tests and benchmarks/bench_jvp_paths.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SDPASelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)``.
    Shapes: (m, T, d) → (m, T, d)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape

        def split(t):  # (m, T, d) → (m, heads, T, d / heads)
            return t.view(m, T, self.heads, d // self.heads).transpose(1, 2)

        h = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(h.transpose(1, 2).reshape(m, T, d))


class SDPATransformerLM(nn.Module):
    """Token + position embeddings → ``layers`` pre-LayerNorm blocks (SDPA attention, GELU MLP)
    → LayerNorm → head. tokens (m, T) int64 → logits (m, T, vocab)."""

    def __init__(self, vocab: int = 11, T: int = 8, d: int = 16, heads: int = 2, layers: int = 1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), attn=SDPASelfAttention(d, heads),
                                                       ln2=nn.LayerNorm(d), up=nn.Linear(d, 2 * d),
                                                       down=nn.Linear(2 * d, d))) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m, T = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device).expand(m, T))
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h))
            h = h + b["down"](F.gelu(b["up"](b["ln2"](h))))
        return self.head(self.lnf(h))


def lm_batch(m: int, T: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (m, T), next-token targets (m, T)) from a fixed cyclic pattern with noise, so the
    loss has something to learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (m, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % vocab
    noise = torch.rand(m, T + 1, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, vocab, (m, T + 1), generator=g), seq)
    return seq[:, :-1], seq[:, 1:]
