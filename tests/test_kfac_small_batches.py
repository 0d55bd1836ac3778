"""KFAC on batches of 1 and 2 examples (a language model fine-tuned on a few sequences): the τ₁
and τ₂ subsets hold at least one example (Sec 8's subsets, never empty), so every step is
finite and the loss falls; a batch of 0 examples is refused."""
import math

import pytest
import torch
from torch import nn

from kfac_fast import KFAC


class TinyLM(nn.Module):
    """(m, T) token ids -> (m, T, V) logits: embedding, a tanh MLP, a head."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.mlp(h))


@pytest.mark.parametrize("m", [1, 2])
def test_kfac_trains_a_tiny_lm_on_one_or_two_sequences(m):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (m, 6))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = KFAC(model, loss="softmax_cross_entropy")  # default τ₁ = 1/8, τ₂ = 1/4
    assert opt.config.tau1 * m < 0.5  # round(τ₁·m) = 0: the subset is one example, not empty
    losses = []
    for _ in range(20):
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))))
        opt.step(x, y)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        losses.append(float(nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses
    for f in opt.factors.current:  # the factors saw the one-example subsets: finite and non-zero
        assert torch.isfinite(f.A).all() and torch.isfinite(f.G).all()
        assert f.G.abs().sum() > 0


def test_kfac_subsets_hold_one_example_on_tiny_batches():
    torch.manual_seed(0)
    opt = KFAC(TinyLM(), loss="softmax_cross_entropy")
    for m in (1, 2, 3, 9):
        assert opt._subset(m, 1 / 8).numel() == max(1, round(m / 8))
        assert opt._subset(m, 1 / 4, 5).numel() == min(m, 5)


def test_kfac_refuses_an_empty_batch():
    torch.manual_seed(0)
    model = TinyLM()
    opt = KFAC(model, loss="softmax_cross_entropy")
    ids = torch.randint(0, 11, (2, 6))
    with pytest.raises(ValueError, match="empty batch"):
        opt.step(ids[:0, :-1], ids[:0, 1:])
