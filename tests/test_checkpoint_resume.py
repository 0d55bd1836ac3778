"""A checkpoint (``state_dict`` / ``load_state_dict`` with the model's own state) taken in the
middle of a run resumes the same trajectory: the resumed run's λ and θ equal the uninterrupted
run's, bit for bit, step after step.

The checkpoint is taken right after a rejected step, where Nielsen's ν (:mod:`kfac_fast.rules`)
is 4, not its initial 2, and the first resumed step is rejected too: λ ← ν·λ, so a resume that
lost ν would raise λ by 2 instead of 4 (hand-derived check on the first resumed step).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from kfac_fast import KFAC

BAD = (3, 4)  # 0-based step indices fed a NaN batch (k = 4, 5): two consecutive rejections
CUT = 4  # checkpoint after this many steps (right after the first rejection)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(9):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        if i in BAD:
            x[0, 0] = float("nan")
        batches.append((x, y))
    return model, batches


def _kfac(model):
    return KFAC(model, loss="softmax_cross_entropy", T3=3, T2=6, tau1=0.5,
                generator=torch.Generator().manual_seed(2))


def _step(opt, model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = opt.step(*batch)
    return bool(s["rejected"]), float(s["lambda_"]), [p.detach().clone() for p in model.parameters()]


def test_resume_after_a_rejection_continues_the_same_trajectory():
    model, batches = _problem()
    opt = _kfac(model)
    full = [_step(opt, model, b) for b in batches]
    assert [r for r, _, _ in full] == [i in BAD for i in range(len(batches))]

    model2, _ = _problem()
    opt2 = _kfac(model2)
    for b in batches[:CUT]:
        _step(opt2, model2, b)
    state = copy.deepcopy(opt2.state_dict())
    model_state = copy.deepcopy(model2.state_dict())
    assert state["nu"] == 4.0  # one rejection doubled ν: the value the resume must carry

    model3, _ = _problem()
    model3.load_state_dict(model_state)
    opt3 = _kfac(model3)
    opt3.load_state_dict(state)
    resumed = [_step(opt3, model3, b) for b in batches[CUT:]]
    lam_at_cut = full[CUT - 1][1]
    assert resumed[0][0] and resumed[0][1] == 4.0 * lam_at_cut  # λ ← ν·λ with ν = 4
    for i, ((r0, l0, p0), (r1, l1, p1)) in enumerate(zip(full[CUT:], resumed)):
        assert r0 == r1 and l0 == l1, (CUT + i, l0, l1)
        for a, b in zip(p0, p1):
            assert torch.equal(a, b), CUT + i
