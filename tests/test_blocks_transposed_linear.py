"""Weight-transposed Linear (transformers' Conv1D, recognised by structure) and RMSNorm modules of
other libraries, in a GPT-2-style block: factors against float64 references from autograd, the
parameter layout against per-example Jacobians, and training with KFAC / KFACPreconditioner."""
import pytest
import torch
from torch import nn

import dense as dn
from block_models import CE, D, Conv1D, LlamaRMSNorm, close, empirical_G, gpt2_problem, record, rows_A, train
from kfac_fast import KFACPreconditioner
from kfac_fast.curvature.blocks import ScaleShiftBlock, TransposedLinearBlock, find_blocks
from kfac_fast.curvature.batch_factors import block_factors

CONV1D = ("c_attn", "c_proj", "c_fc", "mlp_proj")


def test_conv1d_and_rms_norm_are_recognised_by_structure():
    model, _, _ = gpt2_problem(norm="rms")
    kinds = {b.name: type(b) for b in find_blocks(model)}
    for p in CONV1D:
        assert kinds[f"model.{p}"] is TransposedLinearBlock
    assert kinds["model.ln_1"] is ScaleShiftBlock and kinds["model.ln_2"] is ScaleShiftBlock

    class Conv1DLookalike(nn.Module):  # the name alone is not enough: no nf
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))

    class OtherRMSNorm(nn.Module):  # a second parameter: not the RMSNorm structure
        def __init__(self):
            super().__init__()
            self.weight, self.bias, self.eps = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3)), 1e-6

    Conv1DLookalike.__name__ = "Conv1D"
    with pytest.raises(ValueError, match="unsupported layer .*Conv1D"):
        find_blocks(nn.Sequential(Conv1DLookalike()))
    with pytest.raises(ValueError, match="unsupported layer .*OtherRMSNorm"):
        find_blocks(nn.Sequential(OtherRMSNorm()))


def test_layout_is_weight_transposed_with_bias_last():
    """grad_matrix = Σ_rows g āᵀ (g from retain_grad, ā the captured input with a trailing 1)."""
    model, x, y = gpt2_problem()
    blocks = {b.name: b for b in find_blocks(model)}
    for p in CONV1D:
        mod = model.get_submodule(p)
        got = {}

        def hook(m, args, o):
            o.retain_grad()
            got.update(a=args[0].detach(), s=o)

        h = mod.register_forward_hook(hook)
        model.zero_grad()
        z = model(x)
        h.remove()
        torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="sum").backward()
        a = got["a"].reshape(-1, got["a"].shape[-1])
        abar = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], 1)
        g = got["s"].grad.reshape(-1, got["s"].shape[-1])
        b = blocks[f"model.{p}"]
        close(b.grad_matrix(), g.t() @ abar, msg=p)
        assert (b.g_dim, b.a_dim) == (mod.nf, mod.weight.shape[0] + 1)
        back = b.from_matrix(b.param_matrix())
        assert torch.equal(back[0], mod.weight) and torch.equal(back[1], mod.bias)


def test_one_example_one_position_is_the_exact_fisher_block():
    """m = 1, T = 1: Ā ⊗ G equals the exact Fisher of vec([weightᵀ | bias]) from jacrev."""
    model, x, _ = gpt2_problem(m=1, T=1)
    recs = block_factors(model, x, CE, fisher="exact")
    for p in CONV1D:
        Js = dn.param_jacobians(model, x, [f"{p}.weight", f"{p}.bias"])
        Jw = Js[f"{p}.weight"].transpose(-1, -2)  # (T, k, nf, nx): weightᵀ
        W = torch.cat([Jw, Js[f"{p}.bias"].unsqueeze(-1)], -1)
        J = W.transpose(-1, -2).reshape(W.shape[0], W.shape[1], -1)  # vec: columns stacked
        with torch.no_grad():
            z = model(x)
        FR, mask, N = dn.loss_terms(z, CE)
        F_exact = dn.ggn_from_jacobian(J, FR, mask, N)
        r = record(recs, p)
        close(torch.kron(r.A, r.G), F_exact, msg=p)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_factors_equal_dense_references(norm):
    model, x, _ = gpt2_problem(norm=norm)
    recs = block_factors(model, x, CE, fisher="exact")
    for p in CONV1D:
        a, _, _ = dn.capture_io(model, x, p)
        r = record(recs, p)
        close(r.A, rows_A(a.reshape(-1, a.shape[-1]), True), msg=f"{p} A")
        close(r.G, dn.dense_G(model, x, CE, p), msg=f"{p} G")
    if norm == "rms":
        for p in ("ln_1", "ln_2"):
            close(record(recs, p).F, dn.norm_fisher_2x2(model, x, CE, f"{p}.weight"), msg=f"{p} F (1×1 per channel)")


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_preconditioner_factors_equal_the_empirical_reference(capture):
    model, x, y = gpt2_problem(norm="rms")
    pre = KFACPreconditioner(model, loss=CE, fisher="empirical", damping=0.1, capture=capture, step_size=None,
                             **({"tau1": 1.0} if capture == "pass" else {}))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    pre.step(x, y) if capture == "pass" else pre.step(targets=y)
    cur = pre.factors.current
    for p in CONV1D:
        a, G = empirical_G(model, x, y, p)
        close(record(cur, p).A, rows_A(a, True), msg=f"{p} A")
        close(record(cur, p).G, G, msg=f"{p} G")


@pytest.mark.parametrize("how", ["kfac", "pass", "hooks"])
def test_gpt2_block_trains(how):
    model, x, y = gpt2_problem(m=16, T=6, dtype=torch.float32, norm="rms")
    losses = train(model, x, y, how)
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.8 * losses[0], losses
