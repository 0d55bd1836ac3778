"""Small float64 models of the architectures K-FAC must handle (tests only): a residual CNN with
BatchNorm and a custom parameter, and a causal transformer LM (Embedding, attention from
nn.Linear projections, LayerNorm, MLP) whose forward takes keyword arguments."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class TinyResNet(nn.Module):
    """(m, 1, 8, 8) -> (m, 10) logits."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = ResBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(2 * width, 10)
        self.temperature = nn.Parameter(torch.ones(()))  # a loose parameter: a diagonal block

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = F.relu(self.down(x))
        return self.head(x.mean((2, 3))) * self.temperature


class TinyLM(nn.Module):
    """ids (m, T) -> logits (m, T, V); forward(ids=..., ...) so dict batches work."""

    def __init__(self, vocab: int = 11, d: int = 8, T: int = 6, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), q=nn.Linear(d, d), k=nn.Linear(d, d),
                                                  v=nn.Linear(d, d), o=nn.Linear(d, d), ln2=nn.LayerNorm(d),
                                                  up=nn.Linear(d, 2 * d), down=nn.Linear(2 * d, d))))
        self.lnf = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        for b in self.blocks:
            a = b["ln1"](h)
            q, k, v = b["q"](a), b["k"](a), b["v"](a)
            att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
            h = h + b["o"](att.masked_fill(causal, float("-inf")).softmax(-1) @ v)
            h = h + b["down"](torch.tanh(b["up"](b["ln2"](h))))
        return self.out(self.lnf(h))


def cnn_problem(m: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyResNet().double()
    x = torch.randn(m, 1, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (m,), generator=g)
    return model, x, y


def lm_problem(m: int = 12, seed: int = 0, vocab: int = 11, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyLM(vocab=vocab, T=T).double()
    ids = torch.randint(0, vocab, (m, T), generator=g)
    tgt = ids.roll(-1, 1).clone()
    lengths = torch.randint(2, T + 1, (m,), generator=g)
    pad = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)
    tgt[pad] = -100  # padded positions
    tgt[:, -1] = -100
    return model, ids, tgt
