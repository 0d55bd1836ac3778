"""Independent dense float64 computations for tests: per-example Jacobians, the exact
Fisher, Kronecker blocks, vec with stacked columns. Uses no kfac_fast code."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev


def vec(V: torch.Tensor) -> torch.Tensor:
    """Stack columns: vec(V) for V (r, c) -> (r*c,)."""
    return V.t().reshape(-1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).t()


def linear_layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]


def fisher_R(z: torch.Tensor, loss: str) -> torch.Tensor:
    """Dense F_R per example, (m, k, k)."""
    m, k = z.shape
    if loss == "softmax_cross_entropy":
        p = torch.softmax(z, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if loss == "sigmoid_cross_entropy":
        p = torch.sigmoid(z)
        return torch.diag_embed(p * (1 - p))
    if loss == "squared_error":
        return torch.eye(k, dtype=z.dtype).expand(m, k, k)
    raise ValueError(loss)


def layer_io(model: nn.Sequential, x: torch.Tensor):
    """Per linear layer: input a (m, d_in) and pre-activation s (m, d_out), by a manual forward."""
    ins, outs = [], []
    h = x
    for mod in model:
        if isinstance(mod, nn.Linear):
            ins.append(h)
            h = mod(h)
            outs.append(h)
        else:
            h = mod(h)
    return ins, outs


def rest_of_network(model: nn.Sequential, layer_pos: int):
    """Function s_i -> z: the network after linear layer at index layer_pos of the Sequential."""
    tail = model[layer_pos + 1 :]
    return lambda s: tail(s)


def dense_factors(model: nn.Sequential, x: torch.Tensor, loss: str):
    """Exact Ā_{i,j} (with homogeneous coord last) and G_{i,j} = E[J_iᵀ F_R J_j] densely."""
    idx = linear_layers(model)
    with torch.no_grad():
        ins, outs = layer_io(model, x)
        z = model(x)
    FR = fisher_R(z, loss)
    abar = [torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if model[i].bias is not None else a
            for a, i in zip(ins, idx)]
    # per-example Jacobians dz/ds_i: (m, k, d_out_i)
    Js = []
    for pos, i in enumerate(idx):
        f = rest_of_network(model, i)
        J = torch.stack([torch.autograd.functional.jacobian(f, outs[pos][n]) for n in range(x.shape[0])])
        Js.append(J)
    m = x.shape[0]
    A = [[abar[i].t() @ abar[j] / m for j in range(len(idx))] for i in range(len(idx))]
    G = [[torch.einsum("nki,nkl,nlj->ij", Js[i], FR, Js[j]) / m for j in range(len(idx))] for i in range(len(idx))]
    return A, G


def params_vec_order(model: nn.Sequential):
    """Per linear layer [weight | bias] flattened with vec (columns stacked), concatenated."""
    return linear_layers(model)


def per_example_param_jacobian(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """J (m, k, n_params) with params ordered as vec([W_i | b_i]) layer by layer."""
    params = dict(model.named_parameters())

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = jacrev(f)(params, x[0])  # structure check
    Jrows = []
    for n in range(x.shape[0]):
        jac = jacrev(f)(params, x[n])
        blocks = []
        for i in linear_layers(model):
            Wj = jac[f"{i}.weight"]  # (k, d_out, d_in)
            cols = [Wj]
            if model[i].bias is not None:
                cols.append(jac[f"{i}.bias"].unsqueeze(-1))
            Wb = torch.cat(cols, -1)  # (k, d_out, d_in+1)
            blocks.append(Wb.transpose(1, 2).reshape(Wb.shape[0], -1))  # vec per output
        Jrows.append(torch.cat(blocks, 1))
    return torch.stack(Jrows)


def exact_fisher(model: nn.Sequential, x: torch.Tensor, loss: str) -> torch.Tensor:
    J = per_example_param_jacobian(model, x)
    with torch.no_grad():
        z = model(x)
    FR = fisher_R(z, loss)
    return torch.einsum("nkp,nkl,nlq->pq", J, FR, J) / x.shape[0]


def block_sizes(model: nn.Sequential) -> list[tuple[int, int]]:
    out = []
    for i in linear_layers(model):
        m = model[i]
        out.append((m.out_features, m.in_features + int(m.bias is not None)))
    return out


def blocks_to_vec(blocks) -> torch.Tensor:
    return torch.cat([vec(b) for b in blocks])


def vec_to_blocks(v: torch.Tensor, sizes) -> list[torch.Tensor]:
    out, o = [], 0
    for r, c in sizes:
        out.append(unvec(v[o : o + r * c], r, c))
        o += r * c
    return out


def mlp(sizes, act=nn.Tanh, bias=True, seed=0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(dtype)
