"""Every registered curvature block against tests/dense.py (float64), and the block registry."""
import math

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast.curvature.blocks import (DIAGONAL, KRONECKER, CurvatureBlock, LinearBlock, find_blocks, register_block,
                                        registered_blocks)
from kfac_fast.curvature.blocks import registry as block_registry
from kfac_fast.curvature.capture import capture
from kfac_fast.curvature.batch_factors import per_example_derivatives
from kfac_fast.curvature.losses import get_loss
from kfac_fast.curvature.running import RunningFactors
from kfac_fast.curvature.statistics import BatchStatistics
from kfac_fast.quadratic import linearized_forward_many

from dense import block_sizes, blocks_to_vec, dense_factors, per_example_param_jacobian

LOSS = "softmax_cross_entropy"


def _linear_example() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Sigmoid(),
                         nn.Linear(4, 3)).double()


# One small float64 nn.Sequential per registered module type (the dense references walk a
# Sequential); a new block class adds its module type here.
EXAMPLES = {nn.Linear: _linear_example}
# Block types whose dense references need more than a Sequential walk (patches, positions,
# normalised inputs, token ids): tested against tests/dense.py in the file named.
TESTED_ELSEWHERE = {t: "tests/test_arch_factors_dense.py" for t in (
    nn.Conv2d, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    getattr(nn, "RMSNorm", nn.LayerNorm))}
TESTED_ELSEWHERE[nn.Conv1d] = "tests/test_blocks_grouped_conv.py"
TESTED_ELSEWHERE[nn.MultiheadAttention] = "tests/test_blocks_attention.py"
REGISTERED = sorted(((t, c) for t, c in registered_blocks().items() if t in EXAMPLES), key=lambda kv: kv[0].__name__)
IDS = [t.__name__ for t, _ in REGISTERED]


class _Wrap(nn.Module):
    """Hides the Sequential so the linearized forward takes the generic (block.tangent) path."""

    def __init__(self, seq: nn.Module):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        return self.seq(x)


def _example(module_type, block_cls):
    model = EXAMPLES[module_type]()
    x = torch.randn(9, model[0].in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(model)
    assert any(isinstance(b.module, module_type) for b in blocks)
    assert all(type(b) is block_cls for b in blocks if isinstance(b.module, module_type))
    return model, x, blocks


def test_every_registered_block_has_an_example():
    missing = [t.__name__ for t in registered_blocks() if t not in EXAMPLES and t not in TESTED_ELSEWHERE]
    assert not missing, f"add a dense example for {missing} to EXAMPLES"


@pytest.mark.parametrize("module_type,block_cls", REGISTERED, ids=IDS)
def test_block_factor_rows_match_dense(module_type, block_cls):
    """Rows → the grouped factor update (torch backend, ε = 0) → exact Ā_{i,j}, G_{i,j}."""
    model, x, blocks = _example(module_type, block_cls)
    with torch.enable_grad():
        with capture(blocks) as rec:
            z = model(x)
        draws = per_example_derivatives(rec, z, get_loss(LOSS), fisher="exact")
    acts = [b.a_rows(rec.inputs[i]) for i, b in enumerate(blocks)]
    gs = [torch.cat([b.g_rows(d[i]) for d in draws]) for i, b in enumerate(blocks)]  # all draws: G = E_y[g gᵀ]
    running = RunningFactors(blocks, dtype=torch.float64, device=x.device, tridiagonal=True)
    running.update(BatchStatistics(a=acts, g=gs, u=[None] * len(blocks), n_terms=x.shape[0]), eps=0.0,
                   backend="torch")
    A, G = dense_factors(model, x, LOSS)
    for i, (b, f) in enumerate(zip(blocks, running.pending)):
        spec = b.factor_spec
        assert spec.kind == block_cls.factor_kind == KRONECKER
        assert (spec.a_dim, spec.g_dim) == (A[i][i].shape[0], G[i][i].shape[0]) == (b.a_dim, b.g_dim)
        torch.testing.assert_close(f.A, A[i][i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.G, G[i][i], rtol=1e-9, atol=1e-12)
        if i + 1 < len(blocks):
            torch.testing.assert_close(f.A_next, A[i][i + 1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(f.G_next, G[i][i + 1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("module_type,block_cls", REGISTERED, ids=IDS)
def test_block_matrix_layout_matches_dense(module_type, block_cls):
    """to_matrix/from_matrix round trip, and the layout of gradients and tangents is dense.py's
    vec([W_i | b_i]) (per-example Jacobians by jacrev)."""
    model, x, blocks = _example(module_type, block_cls)
    g = torch.Generator().manual_seed(2)
    for b, shape in zip(blocks, block_sizes(model)):
        parts = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in b.params()]
        M = b.to_matrix(*parts)
        assert tuple(M.shape) == shape == (b.g_dim, b.a_dim)
        for back, part in zip(b.from_matrix(M), parts):
            assert torch.equal(back.reshape(part.shape), part)
        M2 = torch.randn(shape, dtype=torch.float64, generator=g)
        back = [t.reshape(p.shape) for t, p in zip(b.from_matrix(M2), b.params())]
        assert torch.equal(b.to_matrix(*back), M2)
        assert torch.equal(b.param_matrix(), b.to_matrix(*[p.detach() for p in b.params()]))

    J = per_example_param_jacobian(model, x)  # (m, k, n_params)
    c = torch.randn(J.shape[:2], dtype=torch.float64, generator=g)
    model.zero_grad()
    (model(x) * c).sum().backward()
    torch.testing.assert_close(blocks_to_vec([b.grad_matrix() for b in blocks]),
                               torch.einsum("nkp,nk->p", J, c), rtol=1e-10, atol=1e-12)

    wrapped = _Wrap(model)
    wblocks = find_blocks(wrapped)
    dirs = [[torch.randn(s, dtype=torch.float64, generator=g) for s in block_sizes(model)] for _ in range(2)]
    z, jvs = linearized_forward_many(wrapped, wblocks, x, dirs)
    torch.testing.assert_close(z, model(x).detach(), rtol=0, atol=0)
    for d, jv in zip(dirs, jvs):
        torch.testing.assert_close(jv, torch.einsum("nkp,p->nk", J, blocks_to_vec(d)), rtol=1e-10, atol=1e-12)


class _MyLinear(nn.Linear):
    pass


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test end with it."""
    monkeypatch.setattr(block_registry, "_REGISTRY", dict(block_registry._REGISTRY))


def test_user_registered_block_is_picked_up(scratch_registry):
    calls = []

    class MyBlock(LinearBlock):
        def a_rows(self, x):
            calls.append(self.name)
            return super().a_rows(x)

    kfac_fast.register_block(_MyLinear, MyBlock)
    torch.manual_seed(0)
    model = nn.Sequential(_MyLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    assert [type(b) for b in find_blocks(model)] == [MyBlock, LinearBlock]
    opt = kfac_fast.KFAC(model, loss=LOSS, backend="torch", generator=torch.Generator().manual_seed(0))
    assert [type(b) for b in opt.layers] == [MyBlock, LinearBlock]
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    stats = opt.step(x, y)
    assert math.isfinite(stats["loss"]) and calls == ["model.0"]


def test_subclass_without_a_block_uses_its_parents(scratch_registry):
    model = nn.Sequential(_MyLinear(4, 5))
    assert [type(b) for b in find_blocks(model)] == [LinearBlock]

    class Replacement(LinearBlock):
        pass

    register_block(nn.Linear, Replacement)  # a second registration replaces the first
    assert [type(b) for b in find_blocks(model)] == [Replacement]


def test_register_block_rejects_what_is_not_a_module_type_or_block_class(scratch_registry):
    before = registered_blocks()
    for bad in ("nn.Linear", nn.Linear(2, 2), int, None):
        with pytest.raises(TypeError, match="module_type must be a subclass of torch.nn.Module"):
            register_block(bad, LinearBlock)
    for bad in (object, nn.Linear, LinearBlock("model.0", nn.Linear(2, 2)), "LinearBlock"):
        with pytest.raises(TypeError, match="block_cls must be a subclass of .*CurvatureBlock"):
            register_block(_MyLinear, bad)

    class BadKind(LinearBlock):
        factor_kind = "blockwise"

    with pytest.raises(ValueError, match="factor_kind is 'blockwise'"):
        register_block(_MyLinear, BadKind)
    assert registered_blocks() == before


def test_block_interface_is_abstract_and_kinds_are_checked():
    with pytest.raises(TypeError):
        CurvatureBlock("model.0", nn.Linear(2, 2))

    class Diagonal(LinearBlock):
        factor_kind = DIAGONAL

    with pytest.raises(NotImplementedError, match="'kronecker' block: no per-example rows"):
        LinearBlock("model.0", nn.Linear(2, 2)).per_example(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="unknown kfac_approx 'mean'"):
        LinearBlock("model.0", nn.Linear(2, 2), kfac_approx="mean")
    # a diagonal-kind block gets a (k, b, b) running Fisher, not Kronecker factors
    r = RunningFactors([Diagonal("model.0", nn.Linear(2, 2))], dtype=torch.float64, device="cpu", tridiagonal=False)
    assert tuple(r.current[0].F.shape) == (2, 3, 3)
