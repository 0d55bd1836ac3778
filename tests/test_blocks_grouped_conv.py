"""nn.Conv1d (Kronecker, KFC on a height-1 view) and grouped / depthwise Conv1d and Conv2d (the
exact Fisher per group) against float64 references from explicit patches and jacrev; a
depthwise-separable CNN and a 1-D CNN trained by KFAC and KFACPreconditioner (both captures)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dense as dn
from block_models import CE, D, close, record, rows_A, train
from kfac_fast import KFACPreconditioner
from kfac_fast.curvature.blocks import Conv1dBlock, Conv2dBlock, GroupedConvBlock, find_blocks
from kfac_fast.curvature.batch_factors import block_factors


def separable_cnn(dtype=D, seed=0):
    """(m, 2, 6, 6) -> (m, 5): stem, depthwise 3×3, pointwise 1×1, a grouped strided conv, head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Tanh(),  # depthwise
        nn.Conv2d(4, 6, 1), nn.Tanh(),  # pointwise
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3, bias=False), nn.Tanh(),  # grouped
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5)).to(dtype)


def cnn_1d(dtype=D, seed=0):
    """(m, 3, 7) -> (m, 5): Conv1d, a depthwise Conv1d with channel multiplier 2 and dilation, head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(),
        nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=4), nn.Tanh(),
        nn.Conv1d(8, 4, 2, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3, 5)).to(dtype)


def data(model, m=4, seed=1, dtype=D):
    g = torch.Generator().manual_seed(seed)
    shape = (m, 2, 6, 6) if isinstance(model[0], nn.Conv2d) else (m, 3, 7)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 5, (m,), generator=g)


def group_jacobian(model, x, path):
    """(T, k, G, b): per-term Jacobian w.r.t. each group's [weight | bias] rows, row-major."""
    mod = model.get_submodule(path)
    names = [f"{path}.weight"] + ([f"{path}.bias"] if mod.bias is not None else [])
    Js = dn.param_jacobians(model, x, names)
    Jw = Js[names[0]]
    T, k, Co = Jw.shape[:3]
    W = Jw.reshape(T, k, Co, -1)
    if mod.bias is not None:
        W = torch.cat([W, Js[names[1]].unsqueeze(-1)], -1)
    return W.reshape(T, k, mod.groups, -1)


def patches_1d(x, conv):
    """(m, R, C_in·k) by explicit indexing (channel-major, zero padding)."""
    (k,), (s,), (p,), (d,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    m, C, L = x.shape
    xp = torch.zeros(m, C, L + 2 * p, dtype=x.dtype)
    xp[:, :, p:p + L] = x
    Lo = (L + 2 * p - d * (k - 1) - 1) // s + 1
    return torch.stack([torch.stack([xp[:, c, r * s + t * d] for c in range(C) for t in range(k)], -1)
                        for r in range(Lo)], 1)


def test_blocks_are_chosen_by_groups():
    kinds = [type(b) for b in find_blocks(separable_cnn())]
    assert kinds == [Conv2dBlock, GroupedConvBlock, Conv2dBlock, GroupedConvBlock, type(find_blocks(nn.Linear(2, 2))[0])]
    kinds = [type(b) for b in find_blocks(cnn_1d())]
    assert kinds[:3] == [Conv1dBlock, GroupedConvBlock, Conv1dBlock]


@pytest.mark.parametrize("make,paths", [(separable_cnn, ["2", "6"]), (cnn_1d, ["2"])])
def test_grouped_blocks_are_the_exact_fisher_per_group(make, paths):
    model = make()
    x, _ = data(model)
    recs = block_factors(model, x, CE, fisher="exact")
    with torch.no_grad():
        z = model(x)
    FR, mask, N = dn.loss_terms(z, CE)
    for p in paths:
        J = group_jacobian(model, x, p)
        ref = torch.stack([dn.ggn_from_jacobian(J[:, :, j], FR, mask, N) for j in range(J.shape[2])])
        close(record(recs, p).F, ref, msg=f"group blocks of {p}")
        # the per-group blocks are the diagonal blocks of the whole layer's exact Fisher
        whole = dn.ggn_from_jacobian(J.reshape(J.shape[0], J.shape[1], -1), FR, mask, N)
        b = J.shape[-1]
        close(whole[:b, :b], ref[0])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv1d_kronecker_factors(approx):
    model = cnn_1d()
    x, _ = data(model)
    recs = block_factors(model, x, CE, fisher="exact", kfac_approx=approx)
    for p, bias in (("0", True), ("4", True)):
        a_in, s, _ = dn.capture_io(model, x, p)
        P = patches_1d(a_in, model.get_submodule(p))  # (m, R, C·k)
        if approx == "reduce":
            abar = torch.cat([P, torch.ones(*P.shape[:2], 1, dtype=D)], -1).mean(1)
            A = abar.t() @ abar / abar.shape[0]
        else:
            A = rows_A(P.reshape(-1, P.shape[-1]), bias)
        J = dn.output_rows_jacobian(model, x, p).transpose(3, 4)  # (T, k, m, L_out, C_out)
        FR, mask, N = dn.loss_terms(model(x).detach(), CE)
        if approx == "reduce":
            Jr = J.sum(3)
            G = torch.einsum("tkni,tkl,tlnj,t->ij", Jr, FR, Jr, mask) / N
        else:
            G = torch.einsum("tknri,tkl,tlnrj,t->ij", J, FR, J, mask) / N
        close(record(recs, p).A, A, msg=f"{p} A")
        close(record(recs, p).G, G, msg=f"{p} G")


def test_conv1d_one_example_one_position_is_exact():
    """m = 1, L_out = 1: Ā ⊗ G = the exact Fisher of vec([weight.reshape(C_out, -1) | bias])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 4), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).to(D)
    x = torch.randn(1, 2, 4, dtype=D)
    r = block_factors(model, x, CE, fisher="exact")[0]
    close(torch.kron(r.A, r.G), dn.kron_fisher_block(model, x, CE, "0"))


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_preconditioner_group_blocks_equal_the_empirical_reference(capture):
    """fisher='empirical': F_j = (1/m) Σ_n u_n u_nᵀ with u_n the gradient of example n's loss
    w.r.t. group j's parameters (one backward per example)."""
    model = separable_cnn()
    x, y = data(model, m=5)
    pre = KFACPreconditioner(model, loss=CE, fisher="empirical", damping=0.1, capture=capture, step_size=None,
                             **({"tau1": 1.0} if capture == "pass" else {}))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step(x, y) if capture == "pass" else pre.step(targets=y)
    for p in ("2", "6"):
        mod = model.get_submodule(p)
        us = []
        for n in range(x.shape[0]):
            ps = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            gs = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum"), ps)
            W = gs[0].reshape(gs[0].shape[0], -1)
            if len(gs) > 1:
                W = torch.cat([W, gs[1].unsqueeze(1)], 1)
            us.append(W.reshape(mod.groups, -1))
        U = torch.stack(us)  # (m, G, b)
        close(record(pre.factors.current, p).F, torch.einsum("mga,mgb->gab", U, U) / x.shape[0], msg=p)


@pytest.mark.parametrize("make", [separable_cnn, cnn_1d])
@pytest.mark.parametrize("how", ["kfac", "pass", "hooks"])
def test_cnns_train(make, how):
    model = make(dtype=torch.float32)
    x, y = data(model, m=32, dtype=torch.float32)
    losses = train(model, x, y, how)
    assert losses[-1] < 0.8 * losses[0], losses
