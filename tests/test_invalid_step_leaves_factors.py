"""A step whose loss is non-finite is rejected and leaves no trace in the running factors (Sec 5
statistics, kept out by the sync-free selection): every block kind, the Embedding block's
diagonal Ā (token counts, an integer input the NaN cannot reach) included.

Hand-derived: the factors after the rejected step are bitwise the factors before it, read
through the public ``state_dict``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from kfac_fast import KFAC


class _TokensAndFeatures(nn.Module):
    """Embedding (diagonal Ā), LayerNorm (small dense blocks), a bare scale (diagonal block) and
    Linear layers; the float features carry the NaN, the tokens cannot."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.feat = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.scale = nn.Parameter(torch.ones(6))
        self.out = nn.Linear(6, 4)

    def forward(self, tok, x):
        h = self.emb(tok).mean(1) + self.feat(x)
        return self.out(torch.tanh(self.norm(h)) * self.scale)


def _factor_tensors(opt: KFAC) -> list[tuple[str, torch.Tensor]]:
    state = opt.state_dict()
    out = []
    for name, rec in zip(state["layers"], state["factors"]["factors"]):
        for k, v in sorted(rec.items()):
            if isinstance(v, torch.Tensor):
                out.append((f"{name}.{k}", v.clone()))
    return out


def test_non_finite_loss_on_an_ordinary_iteration_keeps_every_factor():
    torch.manual_seed(0)
    model = _TokensAndFeatures()
    tok = torch.randint(0, 9, (24, 5))
    x = torch.randn(24, 3)
    y = torch.randint(0, 4, (24,))
    opt = KFAC(model, loss="softmax_cross_entropy", T3=10, T2=10, tau1=0.5,
               generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # k = 1, 2, 3 refresh the inverse; k = 4 is an ordinary iteration
        assert not opt.step((tok, x), y)["rejected"]
    before = _factor_tensors(opt)
    kinds = {k.rsplit(".", 1)[1] for k, _ in before}
    assert {"A", "G", "F"} <= kinds  # Kronecker, diagonal-Ā and small dense blocks all present
    theta = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[:, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = opt.step((tok, bad), y)
    assert stats["rejected"] and stats["reject_code"] == 1
    after = _factor_tensors(opt)
    assert [k for k, _ in before] == [k for k, _ in after]
    for (name, a), (_, b) in zip(before, after):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    # the next finite batch moves the factors again (the test would pass vacuously otherwise)
    assert not opt.step((tok, x), y)["rejected"]
    moved = _factor_tensors(opt)
    assert dict(before)["model.emb.A"].dim() == 1  # the Embedding block's diagonal Ā (token counts)
    assert not torch.equal(dict(before)["model.emb.A"], dict(moved)["model.emb.A"])
