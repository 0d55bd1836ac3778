"""Data-parallel KFAC on 2 gloo processes (tests/_distributed_kfac_worker.py, run once
per session): the same batch and seed on both ranks reproduces the world-1 trajectory (float64,
≤ 1e-12 relative after 20 iterations) for both inverses, with and without momentum; shards with
per-rank streams keep the parameters bitwise identical; a NaN on one rank rejects the step on
both; the reduced MC factors equal those of the union of the ranks' S₁ with their sampled
targets; a DDP-wrapped model trains with the plain model's block names.
"""
import os

import pytest
import torch

import _distributed_kfac_worker as W
from _gloo import run_ranks
from kfac_fast.curvature import kronecker_factors

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfac_dist")
    res = run_ranks("_distributed_kfac_worker.py", out, timeout=600)
    for r in res:
        r["_dir"] = str(out)
    return res


@pytest.mark.parametrize("inverse,momentum,mode", W.CONFIGS)
def test_same_batch_and_seed_reproduces_world_one(ranks, inverse, momentum, mode):
    """Every distributed_mode: the blocks' owners build (and broadcast, or apply and gather) the
    same inverse world 1 builds whole."""
    ref = W.same_batch_run(inverse, momentum)  # this process: world 1
    for r in range(2):
        got = ranks[r][f"same/{inverse}/{momentum}/{mode}"]
        for it, (a, b) in enumerate(zip(got, ref)):
            for x, y in zip(a, b):
                rel = float((x - y).norm() / y.norm().clamp_min(1e-300))
                assert rel <= 1e-12, (r, it, rel)


def test_shards_keep_parameters_identical_and_train(ranks):
    for a, b in zip(ranks[0]["shards/params"], ranks[1]["shards/params"]):
        assert torch.equal(a, b)
    assert ranks[0]["shards/lambda"] == ranks[1]["shards/lambda"]
    for r in range(2):
        first, last = ranks[r]["shards/loss"]
        assert last < first


def test_nan_on_one_rank_rejects_on_all(ranks):
    f0, f1 = ranks[0]["nan/flags"], ranks[1]["nan/flags"]
    assert f0 == f1
    assert f0[6] == (True, True) and not any(rej for rej, _ in f0[:6] + f0[7:])
    for a, b in zip(ranks[0]["nan/params"], ranks[1]["nan/params"]):
        assert torch.equal(a, b)


def test_reduced_mc_factors_equal_the_union_of_the_ranks_samples(ranks):
    x = torch.cat([ranks[r]["mc/x"] for r in range(2)])
    y = torch.cat([ranks[r]["mc/y_sampled"] for r in range(2)])
    union = kronecker_factors(W.make_model(), x, "softmax_cross_entropy", fisher="empirical", targets=y)
    for r in range(2):
        for (A, G), f in zip(ranks[r]["mc/factors"], union):
            torch.testing.assert_close(A, f.A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(G, f.G, rtol=1e-12, atol=1e-14)


def test_ddp_wrapped_model_has_the_plain_block_names(ranks):
    assert ranks[0]["ddp/names"] == ["model.0", "model.2", "model.4"]
    # BatchNorm statistics: each rank's gradient pass updates them from its own shard; the next
    # step starts from rank 0's (broadcast, as DDP does before every forward)
    assert not torch.equal(ranks[0]["ddp/bn_after_step"][0], ranks[1]["ddp/bn_after_step"][0])
    for a, b in zip(ranks[0]["ddp/bn_at_gradient_pass"], ranks[1]["ddp/bn_at_gradient_pass"]):
        assert torch.equal(a, b)
    assert torch.equal(ranks[1]["ddp/bn_at_gradient_pass"][1], ranks[0]["ddp/bn_after_step"][0])
    for a, b in zip(ranks[0]["ddp/params"], ranks[1]["ddp/params"]):
        assert torch.equal(a, b)


def test_checkpoint_gathers_generators_and_resumes_on_world_one(ranks):
    """state_dict on 2 ranks holds both generators (resumed on the same world: the same stream);
    loaded into a single process it continues (a fresh stream), with the replicated state."""
    from kfac_fast import KFAC

    assert all(ranks[r]["shards/n_generators"] == 2 and ranks[r]["shards/resumed_same_stream"] for r in range(2))
    # the sharded inverse is checkpointed as its records and rebuilt by the owners on load
    assert ranks[0]["shards/inverse_type"] == "ShardedInverse" and ranks[0]["shards/resumed_apply_equal"]
    state = torch.load(os.path.join(ranks[0]["_dir"], "kfac_state.pt"), weights_only=False)
    model = W.make_model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ranks[0]["shards/params"]):
            p.copy_(q)
    opt = KFAC(model, loss="softmax_cross_entropy", T3=5, T2=10)
    opt.load_state_dict(state)
    assert opt.k == state["k"] and opt.lambda_ == ranks[0]["shards/lambda"]
    x, y = W.data(10)
    s = opt.step(x, y)
    assert s["k"] == state["k"] and all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_preconditioner_under_torch_distributed_is_the_distributed_one(ranks):
    assert ranks[0]["pre/type"] == ranks[1]["pre/type"] == "DistributedKFACPreconditioner"
    assert "not data-parallel yet" in ranks[0]["pre/hooks_error"]
