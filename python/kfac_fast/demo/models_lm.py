"""A small causal transformer language model (GPT-style, pre-LayerNorm) built only from modules
K-FAC has blocks for: ``nn.Embedding`` (token and position), ``nn.Linear`` (q, k, v, output
projections, MLP, head) and ``nn.LayerNorm``. The attention is written out here (no
``nn.MultiheadAttention``, whose packed ``in_proj_weight`` is a loose parameter to K-FAC).

No dropout (the demo reports a deterministic training loss) and no weight tying (a module used
twice per forward is refused by K-FAC).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a causal mask.

    Shapes: x (m, T, d) → (m, T, d); position t attends to positions ≤ t only, so right-padding a
    sequence never changes the outputs at its real positions.
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
        self.heads, self.d_head = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape

        def split(t):  # (m, T, d) → (m, heads, T, d_head)
            return t.view(m, T, self.heads, self.d_head).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)          # (m, heads, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        h = torch.softmax(scores, dim=-1) @ v                              # (m, heads, T, d_head)
        return self.out(h.transpose(1, 2).reshape(m, T, d))


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with MLP = Linear(d, 4d) → GELU → Linear(4d, d).

    Shapes: (m, T, d) → (m, T, d).
    """

    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CausalTransformerLM(nn.Module):
    """Token + learned position embeddings → ``layers`` pre-LN blocks → LayerNorm → Linear head.

    Shapes: tokens (m, T) int64 with T ≤ max_len → logits (m, T, vocab), where logits[:, t]
    predicts token t + 1 from tokens 0..t.

    The position embedding is looked up with a (m, T) index tensor (``arange(T)`` expanded over
    the batch), not a shared (T,) one, so dim 0 of every module input indexes examples (K-FAC's
    factor statistics and its τ-subsets of the batch rely on that).

    Args:
        vocab: vocabulary size V.
        max_len: longest sequence (rows of the position table).
        d_model, heads, layers, mlp_ratio: width, attention heads, blocks, MLP expansion.
    """

    def __init__(self, vocab: int, max_len: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 mlp_ratio: int = 4):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*[TransformerBlock(d_model, heads, mlp_ratio) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        with torch.no_grad():  # GPT-2's scale for the embeddings (PyTorch's default N(0, 1) is large)
            self.tok.weight.normal_(0.0, 0.02)
            self.pos.weight.normal_(0.0, 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (m, T) int64 → logits (m, T, vocab)."""
        m, T = tokens.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
        positions = torch.arange(T, device=tokens.device).expand(m, T)
        h = self.blocks(self.tok(tokens) + self.pos(positions))
        return self.head(self.ln_f(h))


def causal_transformer_lm(vocab: int, max_len: int, *, d_model: int = 64, heads: int = 4, layers: int = 2,
                          mlp_ratio: int = 4, seed: int | None = None) -> CausalTransformerLM:
    """:class:`CausalTransformerLM`, its weights drawn from ``torch.manual_seed(seed)`` inside a
    forked RNG when ``seed`` is given (the global RNG is left as it was)."""
    if seed is None:
        return CausalTransformerLM(vocab, max_len, d_model, heads, layers, mlp_ratio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalTransformerLM(vocab, max_len, d_model, heads, layers, mlp_ratio)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256,
            ignore_index: int = -100) -> float:
    """Mean next-token cross-entropy (nats per token) over the non-ignored positions of
    (inputs, targets), both (N, T), evaluated in chunks without grad."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], chunk):
            z = model(inputs[i : i + chunk])
            y = targets[i : i + chunk]
            total += float(F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=ignore_index,
                                           reduction="sum"))
            count += int((y != ignore_index).sum())
    return total / max(count, 1)
