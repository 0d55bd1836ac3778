"""Data-parallel K-FAC on 2 gloo processes (tests/_distributed_finite_flags_worker.py): a
statistic that is non-finite on ONE rank only, with a finite objective on both, rejects the step
on EVERY rank (the finite flags are an AND over the ranks): the same code (non-finite
statistics) on both, θ and the running factors unchanged on both, and the next steps go on.
"""
import os

import pytest
import torch

import _distributed_finite_flags_worker as W
from _gloo import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks("_distributed_finite_flags_worker.py", tmp_path_factory.mktemp("kfac_flags"), timeout=300)


def test_the_poison_hit_only_rank_one_statistics(ranks):
    assert ranks[0]["fired"] == 0 and ranks[1]["fired"] == 1
    for r in range(2):  # the objective stayed finite: the statistics alone are non-finite
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in ranks[r]["steps"])


def test_non_finite_statistics_on_one_rank_reject_on_both(ranks):
    for r in range(2):
        codes = [s["code"] for s in ranks[r]["steps"]]
        want = [2 if s["k"] == W.POISON_STEP else 0 for s in ranks[r]["steps"]]
        assert codes == want, (r, codes)
        bad = next(s for s in ranks[r]["steps"] if s["k"] == W.POISON_STEP)
        for a, b in zip(bad["before"][0], bad["after"][0]):
            assert torch.equal(a, b)  # θ unchanged
        for a, b in zip(bad["before"][1], bad["after"][1]):
            assert torch.equal(a, b)  # running factors unchanged
        assert all(torch.isfinite(t).all() for s in ranks[r]["steps"] for t in s["after"][1])


def test_ranks_stay_identical(ranks):
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        for a, b in zip(s0["after"][0] + s0["after"][1], s1["after"][0] + s1["after"][1]):
            assert torch.equal(a, b)
