"""Tied weights: an ``nn.Embedding`` whose weight (V, d) is also a bias-free ``nn.Linear`` head's
(:mod:`kfac_fast.curvature.blocks.tied`, :mod:`kfac_fast.curvature.tied_inverse`).

Checked against independent computation: the two records are the factors computed by hand
from the model's own autograd derivatives; the inverse entry is a dense float64 solve of
(G_out + (γ/π)I) ⊗ (Ā_out + πγI) + diag(C) ⊗ G_emb built with torch.kron (row-major vec of the
head's (V, d) layout), with a dense and a diagonal G_out; training falls with both optimizers
and every capture; checkpoints round-trip; and every other sharing keeps the diagonal fallback."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC, KFACPreconditioner
from kfac_fast.curvature import BlockInverse, KroneckerFactors, coverage
from kfac_fast.curvature.batch_factors import block_factors
from kfac_fast.curvature.blocks import DiagonalBlock, LinearBlock, find_blocks
from kfac_fast.curvature.blocks.tied import TiedEmbeddingBlock, TiedHeadBlock
from kfac_fast.curvature.tied_inverse import tied_pi, tied_sum_inverse

D = torch.float64
CE = "softmax_cross_entropy"
V, DIM = 7, 5
TW = "kronecker_sum"  # the pair is opt-in: tied_weights="unsupported" (the fallback) is the default


class TiedLM(nn.Module):
    """(m, T) ids -> (m, T, V): embedding, a hidden Linear, a head sharing the embedding's weight."""

    def __init__(self, vocab: int = V, d: int = DIM):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.hidden(self.embed(ids))))


def problem(m=6, T=4, dtype=D, seed=0, vocab=V):
    torch.manual_seed(seed)
    model = TiedLM(vocab).to(dtype)
    ids = torch.randint(0, vocab - 1, (m, T))  # token V-1 never appears: a zero count
    return model, ids, torch.roll(ids, 1, 1)


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda s: f"{msg}\n{s}")


def rec(records, name):
    (r,) = [r for r in records if r.name == f"model.{name}"]
    return r


# ---------------------------------------------------------------------------- blocks and records
def test_the_pair_is_one_owner_and_other_sharing_keeps_the_fallback():
    model, _, _ = problem()
    for unsupported in ("error", "diagonal", "skip"):
        blocks = find_blocks(model, tied_weights=TW, unsupported=unsupported)
        assert [type(b) for b in blocks] == [TiedEmbeddingBlock, LinearBlock, TiedHeadBlock]
    emb, _, head = blocks
    assert head.partner is emb and emb.owner is head
    assert emb.params() == [] and head.params() == [model.embed.weight]
    assert emb.from_matrix(torch.ones(DIM, V, dtype=D)) == []
    assert torch.equal(emb.to_matrix(), torch.zeros(DIM, V, dtype=D))
    # a head with a bias is not the Kronecker-sum configuration: today's fallback and message
    model.lm_head = nn.Linear(DIM, V).to(D)
    model.lm_head.weight = model.embed.weight
    blocks = find_blocks(model, tied_weights=TW, unsupported="diagonal")
    assert [type(b) for b in blocks] == [LinearBlock, DiagonalBlock, DiagonalBlock]
    with pytest.raises(ValueError, match=r"sharing a parameter with model.lm_head \(tied weights"):
        find_blocks(model, tied_weights=TW, unsupported="error")
    # two Linear layers sharing a weight: the fallback too
    lin = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False)).to(D)
    lin[2].weight = lin[0].weight
    assert [type(b) for b in find_blocks(lin, unsupported="diagonal")] == [DiagonalBlock]
    with pytest.raises(ValueError, match="tied weights"):
        find_blocks(lin, unsupported="error")


def _hand_factors(model, ids, y):
    """Ā_out, G_out, C, G_emb of the empirical Fisher from the model's own derivatives: N = m·T
    loss terms, g = ∂(Σ loss)/∂(module output)."""
    e = model.embed(ids).detach().requires_grad_(True)
    h = torch.tanh(model.hidden(e))
    z = h @ model.embed.weight.t()
    zl = z.detach().requires_grad_(True)
    loss = F.cross_entropy(zl.reshape(-1, V), y.reshape(-1), reduction="sum")
    (gz,) = torch.autograd.grad(loss, zl)
    (ge,) = torch.autograd.grad(z, e, grad_outputs=gz)
    N = ids.numel()
    H, GZ, GE = h.detach().reshape(N, DIM), gz.reshape(N, V), ge.reshape(N, DIM)
    C = torch.bincount(ids.reshape(-1), minlength=V).to(D) / N
    return H.t() @ H / N, GZ.t() @ GZ / N, C, GE.t() @ GE / N


def test_the_two_records_are_the_two_uses_factors():
    model, ids, y = problem()
    recs = block_factors(model, ids, CE, fisher="empirical", targets=y, tied_weights=TW)
    A_out, G_out, C, G_emb = _hand_factors(model, ids, y)
    head, emb = rec(recs, "lm_head"), rec(recs, "embed")
    close(head.A, A_out, "Ā_out")
    close(head.G, G_out, "G_out")
    close(emb.A, C, "C: token frequencies")
    close(emb.G, G_emb, "G_emb")
    assert float(C[-1]) == 0.0
    pos = {id(r): i for i, r in enumerate(recs)}
    assert head.tied_partner == pos[id(emb)] and emb.tied_owner == pos[id(head)]
    assert rec(recs, "hidden").tied is False
    # the tridiagonal chain skips the pair: no cross factors towards or from the head
    tri = block_factors(model, ids, CE, fisher="empirical", targets=y, tridiagonal=True, tied_weights=TW)
    assert rec(tri, "lm_head").A_next is None and rec(tri, "hidden").A_next is None


# ---------------------------------------------------------------------------- the inverse entry
def _random_factors(diag_g: bool, seed=1, diag_a: bool = False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    X = r(DIM, 3 * DIM)
    A_out = X @ X.t() / X.shape[1]
    Y = r(V, 2 * V)
    G_out = (Y @ Y.t() / Y.shape[1]) if not diag_g else Y.pow(2).mean(1)
    C = torch.rand(V, generator=g, dtype=D)
    C[2] = 0.0  # a token never seen
    Z = r(DIM, 2)  # G_emb of rank 2: singular
    if diag_a:  # Ā_out and G_emb stored as diagonals too
        return A_out.diagonal().clone(), G_out, C, (Z @ Z.t()).diagonal().clone()
    return A_out, G_out, C, Z @ Z.t()


def _dense_damped(A_out, G_out, C, G_emb, gamma, pi):
    """The damped Kronecker sum as a dense (V·d, V·d) matrix acting on the row-major vec of (V, d)."""
    sq = lambda M: torch.diag(M) if M.dim() == 1 else M  # noqa: E731
    I = lambda n: torch.eye(n, dtype=D)  # noqa: E731, E741
    return (torch.kron(sq(G_out) + gamma / pi * I(V), sq(A_out) + pi * gamma * I(DIM))
            + torch.kron(torch.diag(C), sq(G_emb)))


@pytest.mark.parametrize("diag_g", [False, True], ids=["dense_G_out", "diagonal_G_out"])
@pytest.mark.parametrize("gamma", [0.3, 1e-3])
def test_the_inverse_entry_is_the_dense_solve_of_the_damped_kronecker_sum(diag_g, gamma):
    A_out, G_out, C, G_emb = _random_factors(diag_g)
    X = torch.randn(V, DIM, generator=torch.Generator().manual_seed(5), dtype=D)
    pi = tied_pi(A_out, G_out)
    tg = (G_out.sum() if diag_g else torch.diagonal(G_out).sum()) / V
    assert abs(pi - float((torch.diagonal(A_out).sum() / DIM / tg).sqrt())) < 1e-12  # Sec 6.3's trace rule
    ref = torch.linalg.solve(_dense_damped(A_out, G_out, C, G_emb, gamma, pi), X.reshape(-1)).reshape(V, DIM)
    inv = tied_sum_inverse(A_out, G_out, C, G_emb, damping=gamma)
    assert inv.K2.dim() == (1 if diag_g else 2)  # a diagonal G_out stays elementwise on the V side
    close(inv.apply(X), ref, "tied inverse vs dense solve")
    # through the block inverse: the head's record with tied_partner, the embedding's with tied_owner,
    # a Kronecker block between; both inverse kinds treat the pair as one block-diagonal entry
    hid = KroneckerFactors(A=A_out + torch.eye(DIM, dtype=D), G=torch.eye(DIM, dtype=D) * 2, name="hidden",
                           homogeneous=False)
    recs = [KroneckerFactors(A=C, G=G_emb, name="embed", homogeneous=False, tied_owner=2), hid,
            KroneckerFactors(A=A_out, G=G_out, name="head", homogeneous=False, tied_partner=0)]
    for kind in ("block_diagonal", "block_tridiagonal"):
        if kind == "block_tridiagonal":
            recs[1].A_next = recs[1].G_next = None
        bi = BlockInverse(recs, kind=kind, damping=gamma)
        out = bi.apply([torch.ones(DIM, V, dtype=D), torch.ones(DIM, DIM, dtype=D), X])
        close(out[2], ref, f"{kind}: the head's entry")
        assert torch.equal(out[0], torch.zeros(DIM, V, dtype=D))
        close(bi.with_damping(gamma).apply([torch.zeros(DIM, V, dtype=D), torch.zeros(DIM, DIM, dtype=D), X])[2], ref)


@pytest.mark.parametrize("diag_g", [False, True], ids=["dense_G_out", "diagonal_G_out"])
def test_the_inverse_entry_with_every_factor_a_diagonal_on_the_d_side(diag_g):
    A_out, G_out, C, G_emb = _random_factors(diag_g, diag_a=True)
    X = torch.randn(V, DIM, generator=torch.Generator().manual_seed(6), dtype=D)
    pi = tied_pi(A_out, G_out)
    ref = torch.linalg.solve(_dense_damped(A_out, G_out, C, G_emb, 0.2, pi), X.reshape(-1)).reshape(V, DIM)
    inv = tied_sum_inverse(A_out, G_out, C, G_emb, damping=0.2)
    assert inv.K1.dim() == 1 and inv.K2.dim() == (1 if diag_g else 2)
    close(inv.apply(X), ref, "tied inverse with diagonal d-side factors vs dense solve")


def test_the_embedding_term_needs_no_damping_but_the_head_term_does():
    A_out, G_out, C, G_emb = _random_factors(False)
    X = torch.randn(V, DIM, dtype=D)
    # γ = 0 with positive definite head factors: the undamped sum, singular G_emb and a zero count
    ref = torch.linalg.solve(_dense_damped(A_out, G_out, C, G_emb, 0.0, 1.0), X.reshape(-1)).reshape(V, DIM)
    torch.testing.assert_close(tied_sum_inverse(A_out, G_out, C, G_emb, damping=0.0).apply(X), ref,
                               rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="positive definite.*damping"):
        tied_sum_inverse(torch.zeros(DIM, DIM, dtype=D), G_out, C, G_emb, damping=0.0)
    with pytest.raises(ValueError, match=r"G_out \(V, V\).*got .*G_out \(3, 3\)"):
        tied_sum_inverse(A_out, G_out[:3, :3], C, G_emb, damping=0.1)


# ---------------------------------------------------------------------------- training
def _train(how, fisher, autocast, steps=20):
    model, ids, y = problem(m=32, T=4, dtype=torch.float32)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CoverageWarning (and nothing else)
        if how == "kfac":
            opt = KFAC(model, tied_weights=TW, loss=CE, generator=torch.Generator().manual_seed(0))
            cov = opt.coverage() if hasattr(opt, "coverage") else coverage(model, opt.layers, tied_weights=TW)
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    losses.append(float(opt.step(ids, y)["loss"]))
            return losses, cov
        pre = KFACPreconditioner(model, tied_weights=TW, loss=CE, damping=0.3, capture=how, step_size=None, fisher=fisher,
                                 generator=torch.Generator().manual_seed(0))
        cov = pre.coverage()
        sgd = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(steps):
            sgd.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                z = model(ids)
                loss = F.cross_entropy(z.flatten(0, -2).float(), y.flatten())
            loss.backward(retain_graph=how == "hooks")
            pre.step(ids, y) if how == "pass" else pre.step()
            sgd.step()
            losses.append(loss.item())
        return losses, cov


CASES = [("kfac", "mc")] + [(c, f) for c in ("pass", "hooks") for f in ("mc", "empirical")]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
@pytest.mark.parametrize("how,fisher", CASES)
def test_a_tied_lm_trains_with_every_capture_and_full_kronecker_coverage(how, fisher, autocast):
    losses, cov = _train(how, fisher, autocast)
    assert all(v == v and abs(v) < float("inf") for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    assert cov.kronecker_fraction == 1.0, str(cov)
    (pair,) = [e for e in cov.entries if e.kind == "kronecker_sum"]
    assert pair.name == "model.lm_head + model.embed" and pair.params == V * DIM
    assert cov.trainable == V * DIM + DIM * DIM + DIM


def test_the_sum_block_steps_the_shared_weight_by_its_inverse():
    """KFACPreconditioner's update of W is the Kronecker-sum inverse applied to W.grad (the
    embedding use's gradient included: autograd sums both uses into one .grad)."""
    model, ids, y = problem()
    pre = KFACPreconditioner(model, tied_weights=TW, loss=CE, damping=0.1, capture="pass", fisher="empirical", step_size=None,
                             tau1=1.0)  # first step: the factors are this batch's (ε = 0), the inverse fresh
    F.cross_entropy(model(ids).flatten(0, -2), y.flatten()).backward()
    g = model.embed.weight.grad.clone()
    pre.step(ids, y)
    A_out, G_out, C, G_emb = _hand_factors(model, ids, y)
    pi = tied_pi(A_out, G_out)
    ref = torch.linalg.solve(_dense_damped(A_out, G_out, C, G_emb, 0.1, pi), g.reshape(-1)).reshape(V, DIM)
    close(model.embed.weight.grad, ref, "preconditioned W.grad")


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_resumes_the_same_steps():
    def run(opt, model, ids, y, n):
        out = []
        for _ in range(n):
            opt.step(ids, y)
            out.append(model.embed.weight.detach().clone())
        return out

    model, ids, y = problem()
    opt = KFAC(model, tied_weights=TW, loss=CE, T3=2, generator=torch.Generator().manual_seed(3))
    run(opt, model, ids, y, 3)
    state, mstate = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    after = run(opt, model, ids, y, 3)
    model2, _, _ = problem(seed=7)
    model2.load_state_dict(mstate)
    opt2 = KFAC(model2, tied_weights=TW, loss=CE, T3=2, generator=torch.Generator().manual_seed(99))
    opt2.load_state_dict(state)
    for a, b in zip(after, run(opt2, model2, ids, y, 3)):
        assert torch.equal(a, b)
    # KFACPreconditioner: the inverse (the pair's records) survives state_dict / load_state_dict
    pre = KFACPreconditioner(model, tied_weights=TW, loss=CE, capture="pass", fisher="empirical", step_size=None)
    F.cross_entropy(model(ids).flatten(0, -2), y.flatten()).backward()
    pre.step(ids, y)
    st = copy.deepcopy(pre.state_dict())
    model.zero_grad()
    F.cross_entropy(model(ids).flatten(0, -2), y.flatten()).backward()
    g = model.embed.weight.grad.clone()
    pre2 = KFACPreconditioner(model, tied_weights=TW, loss=CE, capture="pass", fisher="empirical", step_size=None)
    pre2.load_state_dict(st)
    ref = pre.inverse.apply([l.grad_matrix() for l in pre.layers])
    got = pre2.inverse.apply([l.grad_matrix() for l in pre2.layers])
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert any(float(u.abs().max()) > 0 for u in got) and g.abs().max() > 0


# ---------------------------------------------------------------------------- data parallel
class _TwoRanks:
    """rank ``rank`` of a world of 2 whose collectives do nothing (the test combines the ranks)."""

    world_size = 2

    def __init__(self, rank):
        self.rank = rank

    def all_gather_directions(self, directions, owners, *, kind="directions"):
        pass


def test_sharded_inverse_keeps_the_pair_on_one_owner():
    """LPT alone would put the embedding's record (cost V + d³) on the other rank than the head's
    (d³ + V³); the pair gets the head's owner, and the union of the ranks' blocks is the whole
    block inverse."""
    from kfac_fast.distributed import ShardedInverse, assign, record_cost

    A_out, G_out, C, G_emb = _random_factors(False)
    hid = KroneckerFactors(A=A_out + torch.eye(DIM, dtype=D), G=torch.eye(DIM, dtype=D) * 2, name="hidden",
                           homogeneous=False)
    recs = [KroneckerFactors(A=C, G=G_emb, name="embed", homogeneous=False, tied_owner=2), hid,
            KroneckerFactors(A=A_out, G=G_out, name="head", homogeneous=False, tied_partner=0)]
    lpt = assign([record_cost(r) for r in recs], 2)
    assert lpt[0] != lpt[2]  # the case the pairing rule exists for
    grads = [torch.zeros(DIM, V, dtype=D), torch.randn(DIM, DIM, dtype=D), torch.randn(V, DIM, dtype=D)]
    ref = BlockInverse(recs, damping=0.2).apply(grads)
    got = [None] * 3
    for rank in (0, 1):
        sh = ShardedInverse(_TwoRanks(rank), mode="shard_inverses", kind="block_diagonal",
                            build=lambda r, warm: BlockInverse(r, damping=0.2))
        sh.refresh(recs)
        assert sh.owners[0] == sh.owners[2]
        out = sh.apply(grads)
        for i in sh._own:
            got[i] = out[i]
    for a, b in zip(got, ref):
        close(a, b, "sharded vs whole")


class TiedLM2(TiedLM):
    """TiedLM with a second hidden layer: a Kronecker chain of two blocks beside the pair."""

    def __init__(self):
        super().__init__()
        self.hidden2 = nn.Linear(DIM, DIM)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.hidden2(torch.tanh(self.hidden(self.embed(ids))))))


def test_block_tridiagonal_couples_the_chain_and_leaves_the_pair_block_diagonal():
    torch.manual_seed(0)
    model = TiedLM2()
    ids = torch.randint(0, V, (32, 4))
    y = torch.roll(ids, 1, 1)
    pre = KFACPreconditioner(model, tied_weights=TW, loss=CE, damping=0.3, capture="pass", fisher="empirical", step_size=None,
                             inverse="block_tridiagonal", generator=torch.Generator().manual_seed(0))
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(20):
        sgd.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, -2), y.flatten())
        loss.backward()
        pre.step(ids, y)
        sgd.step()
        losses.append(loss.item())
    names = [l.name for l in pre.layers]
    links = [(names[i], names[j], linked) for i, j, linked in pre.factors.links]
    assert links == [("model.hidden", "model.hidden2", True)]
    cur = pre.factors.current
    assert cur[names.index("model.hidden")].A_next is not None and cur[names.index("model.lm_head")].A_next is None
    assert losses[-1] < 0.9 * losses[0], losses


def test_the_exact_fisher_products_see_both_uses_of_the_shared_weight():
    """KFAC's quadratic model (Appendix C) moves W through the owner's direction only; J·v must
    still include the embedding use: every provider against a central finite difference."""
    from kfac_fast.curvature import linearize

    model, ids, _ = problem()
    blocks = find_blocks(model, tied_weights=TW)
    Dm = torch.randn(V, DIM, generator=torch.Generator().manual_seed(8), dtype=D)
    direction = [torch.zeros(b.g_dim, b.a_dim, dtype=D) for b in blocks]
    direction[2] = Dm  # the head's block: W
    W, h = model.embed.weight, 1e-6
    with torch.no_grad():
        W.add_(h * Dm)
        zp = model(ids)
        W.sub_(2 * h * Dm)
        zm = model(ids)
        W.add_(h * Dm)
        head_only = torch.tanh(model.hidden(model.embed(ids))) @ Dm.t()
    fd = (zp - zm) / (2 * h)
    assert float((fd - head_only).norm()) > 0.1 * float(fd.norm())  # the embedding use matters here
    for provider in ("forward", "reverse_over_reverse"):
        _, (jv,) = linearize.jvp(model, blocks, ids, [direction], provider=provider)
        torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("diag_g", [False, True], ids=["dense_G_out", "diagonal_G_out"])
def test_without_the_embedding_term_the_head_is_damped_as_an_ordinary_kronecker_block(diag_g):
    """C = 0, G_emb = 0: the pair's inverse must be the head's own Kronecker inverse with the
    damping convention of every other block (Sec 6.3: Ā + πγI, G + (γ/π)I, π = sqrt((tr Ā/d)/(tr G/V))).
    Swapping the two damping terms keeps the dense-solve test above passing (its reference is
    built from the same formula) but is wrong by a factor π² on one side; this pins the convention."""
    A_out, G_out, _, _ = _random_factors(diag_g)
    G_out = G_out * 1e-2  # a head's logit-gradient factor is far smaller than its input factor: π ≫ 1
    X = torch.randn(V, DIM, generator=torch.Generator().manual_seed(8), dtype=D)
    zero_c, zero_g = torch.zeros(V, dtype=D), torch.zeros(DIM, DIM, dtype=D)
    tied = tied_sum_inverse(A_out, G_out, zero_c, zero_g, damping=0.3).apply(X)
    plain = BlockInverse([KroneckerFactors(A=A_out, G=G_out, name="head", homogeneous=False)],
                         kind="block_diagonal", damping=0.3).apply([X])[0]
    close(tied, plain, "the tied head without its embedding term vs an ordinary Kronecker block")


def test_the_default_is_the_fallback_and_its_reason_names_the_option():
    """tied_weights="unsupported" (the default): the shared weight follows unsupported= (KFAC: one
    diagonal block; the preconditioner: skipped), and coverage() says how to get the pair."""
    model, _, _ = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cov in (KFAC(model, loss=CE).coverage(), KFACPreconditioner(model, loss=CE).coverage()):
            (e,) = [e for e in cov.entries if e.name.endswith("embed.weight")]
            assert e.kind in ("diagonal", "skipped") and "tied_weights='kronecker_sum'" in e.reason, str(cov)
            assert not any(x.kind == "kronecker_sum" for x in cov.entries)
    with pytest.raises(ValueError, match="tied_weights"):
        KFAC(model, loss=CE, tied_weights="sum")
