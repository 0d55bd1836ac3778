"""The running factors (Sec 5) when the loss leaves terms out (``ignore_index``) and when the
number of loss terms differs from the number of positions a layer is applied at.

Convention (``RunningFactors.update``): Ā averages a layer's rows, one per position (masked or
not: the inputs exist either way); G averages the per-position outer products g gᵀ over N, the
number of loss terms the objective averages (the unmasked ones). The Embedding block's diagonal
Ā is the token frequency over every position.

Checked against dense float64 computations from a hand-written forward and autograd of the sum
of the unmasked per-term losses (targets fixed: ``fisher="empirical"``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast.curvature import find_blocks, get_loss
from kfac_fast.curvature.running import RunningFactors
from kfac_fast.curvature.statistics import sampled_statistics

IGNORE = -100


def _factors(model, x, y, *, loss="softmax_cross_entropy"):
    """The factors after one update with ε = 0 (the batch estimate alone), sync-free path
    (``check_finite=False``: N stays a device tensor under a mask, as in ``KFAC.step``)."""
    blocks = find_blocks(model)
    stats, _ = sampled_statistics(model, blocks, x, get_loss(loss, ignore_index=IGNORE), fisher="empirical",
                                  targets=y, check_finite=False)
    rf = RunningFactors(blocks, dtype=torch.float64, device=x.device, tridiagonal=False)
    rf.update(stats, eps=0.0, backend="torch", valid=torch.tensor(True))
    rf.commit()
    return {b.name: f for b, f in zip(blocks, rf.current)}


def _sequence_tagger():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _dense_tagger_factors(model, x, y):
    """Ā_i = mean over the m·T positions of ā āᵀ (ā = [a, 1]); G_i = Σ_{positions} g gᵀ / N,
    g = ∂(Σ_{unmasked terms} −log p(y|z))/∂s_i, N = number of unmasked terms."""
    l0, l2 = model[0], model[2]
    s0 = x @ l0.weight.T + l0.bias
    s0.retain_grad()
    a1 = torch.tanh(s0)
    s2 = a1 @ l2.weight.T + l2.bias
    s2.retain_grad()
    valid = y != IGNORE
    n = int(valid.sum())
    total = F.cross_entropy(s2.reshape(-1, 3), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
    total.backward()
    out = {}
    for name, a, s in (("model.0", x, s0), ("model.2", a1.detach(), s2)):
        ab = torch.cat([a.reshape(-1, a.shape[-1]), torch.ones(a.shape[0] * a.shape[1], 1, dtype=a.dtype)], 1)
        g = s.grad.reshape(-1, s.shape[-1])
        out[name] = (ab.T @ ab / ab.shape[0], g.T @ g / n)
    return out, n


def test_G_averages_over_the_unmasked_loss_terms():
    """Per-position softmax terms, a third of them ignored: G = Σ g gᵀ / N_valid (not / N_valid²,
    not / all positions), Ā over every position."""
    model = _sequence_tagger()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6, 5), generator=g)
    y[torch.rand(6, 5, generator=g) < 0.35] = IGNORE
    want, n = _dense_tagger_factors(model, x, y)
    assert 1 < n < y.numel()
    got = _factors(model, x, y)
    for name, (A, G) in want.items():
        torch.testing.assert_close(got[name].A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[name].G, G, rtol=1e-10, atol=1e-12)


def test_G_with_no_term_ignored():
    """No target ignored: N = m·T, the dense formula unchanged."""
    model = _sequence_tagger()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 3), generator=g)
    want, n = _dense_tagger_factors(model, x, y)
    assert n == 12
    got = _factors(model, x, y)
    for name, (A, G) in want.items():
        torch.testing.assert_close(got[name].G, G, rtol=1e-10, atol=1e-12)


class _PooledClassifier(nn.Module):
    """Embedding over T positions, mean-pooled, one classifier term per example: m loss terms
    but m·T embedding positions."""

    def __init__(self, vocab=7, dim=3, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tok):
        return self.out(self.emb(tok).mean(1))


def _dense_embedding_factors(model, tok, y):
    """Ā = token counts over all m·T positions / (m·T); G = Σ_{positions} g gᵀ / N with g the
    gradient of the summed unmasked loss w.r.t. each position's embedding output."""
    e = model.emb.weight[tok].detach().requires_grad_(True)
    z = model.out(e.mean(1))
    valid = y != IGNORE
    n = int(valid.sum())
    F.cross_entropy(z, y, ignore_index=IGNORE, reduction="sum").backward()
    counts = torch.zeros(model.emb.num_embeddings, dtype=torch.float64)
    for t in tok.reshape(-1).tolist():
        counts[t] += 1
    gr = e.grad.reshape(-1, e.shape[-1])
    return counts / tok.numel(), gr.T @ gr / n, n


@pytest.mark.parametrize("masked", [False, True])
def test_embedding_A_is_the_token_frequency_over_positions(masked):
    """m = 5 examples of T = 4 tokens: Ā is per position (/20), not per loss term (/5 or /N);
    ignored examples still count their tokens."""
    torch.manual_seed(4)
    model = _PooledClassifier().double()
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 7, (5, 4), generator=g)
    tok[0, :] = 6  # a frequent token
    y = torch.randint(0, 4, (5,), generator=g)
    if masked:
        y[1] = IGNORE
        y[3] = IGNORE
    A, G, n = _dense_embedding_factors(model, tok, y)
    assert n == (3 if masked else 5)
    got = _factors(model, tok, y)
    torch.testing.assert_close(got["model.emb"].A, A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["model.emb"].G, G, rtol=1e-10, atol=1e-12)
    assert abs(float(got["model.emb"].A.sum()) - 1.0) < 1e-12
