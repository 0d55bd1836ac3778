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


# --------------------------------------------------------------------------------------------
# General models (any nn.Module; tensor, tuple or dict batches; outputs (m, ..., k)).
# Everything below is built from torch only: functional_call/jacrev/vmap for Jacobians, plain
# forward hooks to read a layer's input/output, explicit loops for convolution patches.
# --------------------------------------------------------------------------------------------
import itertools  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch.func import vmap  # noqa: E402

LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")


def call(model: nn.Module, inputs):
    """model(x), model(*x) or model(**x) as the API's batch rule."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _map_tensors(inputs, fn):
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fn(v) for v in inputs)
    return fn(inputs)


def num_examples(inputs) -> int:
    if isinstance(inputs, dict):
        return next(iter(inputs.values())).shape[0]
    if isinstance(inputs, (tuple, list)):
        return inputs[0].shape[0]
    return inputs.shape[0]


def loss_terms(z: torch.Tensor, loss: str, targets=None, ignore_index: int = -100):
    """(F_R (T, k, k), mask (T,), N): per loss term (all positions of z but the last dim, in
    z.flatten(0, -2) order) the output-space Fisher, whether it counts, and N = #counted terms.
    Only softmax cross-entropy has ignored positions (targets == ignore_index)."""
    zf = z.detach().reshape(-1, z.shape[-1])
    FR = fisher_R(zf, loss)
    mask = torch.ones(zf.shape[0], dtype=zf.dtype)
    if loss == "softmax_cross_entropy" and targets is not None:
        mask = (targets.reshape(-1) != ignore_index).to(zf.dtype)
    return FR, mask, int(mask.sum().item())


def param_jacobians(model: nn.Module, inputs, names) -> dict:
    """Per-example Jacobians of the outputs w.r.t. the named parameters, by
    vmap(jacrev(functional_call)) over dim 0 of every input tensor.
    Returns name -> (T, k, *param.shape), T = m * P terms in z.flatten(0, -2) order."""
    names = list(names)
    params = dict(model.named_parameters())
    frozen = {**{k: v.detach() for k, v in params.items() if k not in names},
              **dict(model.named_buffers())}

    def f_any(sel, one):
        one_b = _map_tensors(one, lambda t: t.unsqueeze(0))
        if isinstance(one_b, dict):
            out = functional_call(model, {**frozen, **sel}, (), one_b)
        elif isinstance(one_b, (tuple, list)):
            out = functional_call(model, {**frozen, **sel}, tuple(one_b))
        else:
            out = functional_call(model, {**frozen, **sel}, (one_b,))
        return out.squeeze(0)  # (P..., k)

    sel = {k: params[k].detach() for k in names}
    jac = vmap(jacrev(f_any), in_dims=(None, 0))(sel, inputs)  # name -> (m, P..., k, *pshape)
    out = {}
    for k in names:
        J = jac[k]
        pnd = params[k].dim()
        kdim = J.shape[J.dim() - pnd - 1]
        out[k] = J.reshape(-1, kdim, *params[k].shape)
    return out


def ggn_from_jacobian(J: torch.Tensor, FR: torch.Tensor, mask: torch.Tensor, N: int) -> torch.Tensor:
    """(1/N) Σ_t mask_t J_tᵀ F_R,t J_t for J (T, k, n): the exact Fisher (= GGN) of the mean loss."""
    return (torch.einsum("tkp,tkl,tlq,t->pq", J, FR, J, mask) / N).contiguous()


def exact_fisher_params(model: nn.Module, inputs, loss: str, names, targets=None, ignore_index=-100):
    """Exact Fisher of the mean loss over the named parameters, each flattened row-major
    (p.reshape(-1)) and concatenated in the given order."""
    with torch.no_grad():
        z = call(model, inputs)
    FR, mask, N = loss_terms(z, loss, targets, ignore_index)
    Js = param_jacobians(model, inputs, names)
    J = torch.cat([Js[k].reshape(Js[k].shape[0], Js[k].shape[1], -1) for k in names], -1)
    return ggn_from_jacobian(J, FR, mask, N)


def exact_fisher_diagonal(model, inputs, loss, name, targets=None, ignore_index=-100):
    """Diagonal of the exact Fisher of one parameter, shape (numel,) in p.reshape(-1) order."""
    with torch.no_grad():
        z = call(model, inputs)
    FR, mask, N = loss_terms(z, loss, targets, ignore_index)
    J = param_jacobians(model, inputs, [name])[name]
    J = J.reshape(J.shape[0], J.shape[1], -1)
    return torch.einsum("tkp,tkl,tlp,t->p", J, FR, J, mask) / N


def norm_fisher_2x2(model, inputs, loss, weight_name, bias_name=None, targets=None, ignore_index=-100):
    """Per channel c (flattened weight) the exact Fisher of (weight_c, bias_c): (C, 2, 2), or
    (C, 1, 1) without bias."""
    with torch.no_grad():
        z = call(model, inputs)
    FR, mask, N = loss_terms(z, loss, targets, ignore_index)
    names = [weight_name] + ([bias_name] if bias_name else [])
    Js = param_jacobians(model, inputs, names)
    U = torch.stack([Js[k].reshape(Js[k].shape[0], Js[k].shape[1], -1) for k in names], -1)  # (T,k,C,b)
    return torch.einsum("tkca,tkl,tlcb,t->cab", U, FR, U, mask) / N


def kron_param_jacobian(model: nn.Module, inputs, path: str) -> torch.Tensor:
    """(T, k, g*a): per-term Jacobian w.r.t. the layer's W in vec order (columns stacked), with
    W = [weight | bias] (Linear), [weight.reshape(C_out, -1) | bias] (Conv2d), weight.T (Embedding)."""
    mod = model.get_submodule(path)
    wn = f"{path}.weight" if path else "weight"
    bn = f"{path}.bias" if path else "bias"
    has_b = getattr(mod, "bias", None) is not None
    Js = param_jacobians(model, inputs, [wn] + ([bn] if has_b else []))
    Jw = Js[wn]
    T, k = Jw.shape[:2]
    if isinstance(mod, nn.Embedding):
        W = Jw.transpose(-1, -2)  # (T, k, D, V)
    else:
        W = Jw.reshape(T, k, Jw.shape[2], -1)  # (T, k, g, a_w)
        if has_b:
            W = torch.cat([W, Js[bn].unsqueeze(-1)], -1)
    return W.transpose(-1, -2).reshape(T, k, -1)


def kron_fisher_block(model, inputs, loss, path, targets=None, ignore_index=-100):
    """Exact Fisher block of one Kronecker layer in vec([W]) coordinates."""
    with torch.no_grad():
        z = call(model, inputs)
    FR, mask, N = loss_terms(z, loss, targets, ignore_index)
    return ggn_from_jacobian(kron_param_jacobian(model, inputs, path), FR, mask, N)


def capture_io(model: nn.Module, inputs, path: str):
    """The module's (first) input and its output in a plain forward (torch hooks)."""
    mod = model.get_submodule(path)
    got = {}

    def hook(m, args, out):
        got["in"], got["out"] = args[0].detach(), out.detach()

    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            z = call(model, inputs)
    finally:
        h.remove()
    return got["in"], got["out"], z


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(m, R, C_in*kh*kw) patches by explicit indexing: location (i, j) in row-major order
    (R = H_out*W_out), entries ordered (channel, kernel row, kernel col), zero padding included."""
    assert conv.padding_mode == "zeros" and conv.groups == 1
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    m, C, H, W = x.shape
    xp = torch.zeros(m, C, H + 2 * ph, W + 2 * pw, dtype=x.dtype)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(Ho):
        for j in range(Wo):
            patch = torch.empty(m, C, kh, kw, dtype=x.dtype)
            for c in range(C):
                for a in range(kh):
                    for b in range(kw):
                        patch[:, c, a, b] = xp[:, c, i * sh + a * dh, j * sw + b * dw]
            rows.append(patch.reshape(m, -1))
    return torch.stack(rows, 1)


def layer_rows_in(model, inputs, path) -> torch.Tensor:
    """A-side rows (m, R, a) of a Kronecker layer WITHOUT the homogeneous coordinate."""
    mod = model.get_submodule(path)
    a, _, _ = capture_io(model, inputs, path)
    m = a.shape[0]
    if isinstance(mod, nn.Conv2d):
        return conv_patches(a, mod)
    if isinstance(mod, nn.Linear):
        return a.reshape(m, -1, a.shape[-1])
    raise TypeError(type(mod))


def dense_A(model, inputs, path, approx: str = "expand") -> torch.Tensor:
    """A = mean over rows of ā āᵀ, ā = [a; 1] (homogeneous LAST) when the layer has a bias;
    expand: rows = m·R positions; reduce: one row per example, ā_n = mean_r ā_{n,r}."""
    mod = model.get_submodule(path)
    a = layer_rows_in(model, inputs, path)
    if mod.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], -1)
    if approx == "reduce":
        a = a.mean(1)
    else:
        a = a.reshape(-1, a.shape[-1])
    return a.t() @ a / a.shape[0]


def output_rows_jacobian(model, inputs, path) -> torch.Tensor:
    """J (T, k, m, R, d_out) = ∂z_t/∂s_{n,r}: the outputs' Jacobian w.r.t. the layer's output rows
    (Conv2d: the C_out vector at each output location, row-major; Linear/Embedding: the last dim),
    by adding a zero probe to the layer output in a forward hook and differentiating at 0."""
    mod = model.get_submodule(path)
    _, s, _ = capture_io(model, inputs, path)
    m = s.shape[0]
    conv = isinstance(mod, nn.Conv2d)

    def run(delta):
        def hook(mm, args, out):
            return out + delta

        h = mod.register_forward_hook(hook)
        try:
            return call(model, inputs)
        finally:
            h.remove()

    J = torch.autograd.functional.jacobian(run, torch.zeros_like(s))  # (*z.shape, *s.shape)
    zshape = J.shape[: J.dim() - s.dim()]
    k = zshape[-1]
    J = J.reshape(-1, k, *s.shape)
    if conv:
        Co = s.shape[1]
        J = J.permute(0, 1, 2, 4, 5, 3).reshape(J.shape[0], k, m, -1, Co)
    else:
        J = J.reshape(J.shape[0], k, m, -1, s.shape[-1])
    return J


def dense_G(model, inputs, loss, path, approx="expand", targets=None, ignore_index=-100):
    """G = (1/N) Σ_rows E[g gᵀ], g = ∂(Σ_t ℓ_t)/∂s_row with each term's target drawn from the model:
    E[g gᵀ] = Σ_t J_{t,row}ᵀ F_R,t J_{t,row} (targets of different terms are independent and each
    E[∂ℓ_t/∂z_t] = 0). expand: rows = m·R; reduce: g_n = Σ_r g_{n,r}, one row per example."""
    with torch.no_grad():
        z = call(model, inputs)
    FR, mask, N = loss_terms(z, loss, targets, ignore_index)
    J = output_rows_jacobian(model, inputs, path)
    if approx == "reduce":
        Jr = J.sum(3)  # (T, k, m, d)
        return (torch.einsum("tkni,tkl,tlnj,t->ij", Jr, FR, Jr, mask) / N).contiguous()
    return (torch.einsum("tknri,tkl,tlnrj,t->ij", J, FR, J, mask) / N).contiguous()


def embedding_A(model, inputs, path) -> torch.Tensor:
    """Diagonal A of an Embedding: A[v] = (count of token v)/(m·R), shape (V,)."""
    mod = model.get_submodule(path)
    idx, _, _ = capture_io(model, inputs, path)
    counts = torch.zeros(mod.num_embeddings, dtype=torch.float64)
    for v in idx.reshape(-1).tolist():
        counts[v] += 1
    return counts / idx.numel()


def enumerate_label_draws(z: torch.Tensor, loss: str, targets=None, ignore_index=-100):
    """For softmax CE only: every joint assignment of the counted terms' classes with its
    probability, as (probabilities (S,), one-hot residuals p - e_y (S, T, k)) for ∇ℓ = Jᵀ(p - e_y)."""
    assert loss == "softmax_cross_entropy"
    zf = z.detach().reshape(-1, z.shape[-1])
    p = torch.softmax(zf, -1)
    T, k = p.shape
    _, mask, _ = loss_terms(z, loss, targets, ignore_index)
    live = [t for t in range(T) if mask[t] > 0]
    probs, resid = [], []
    for ys in itertools.product(range(k), repeat=len(live)):
        r = torch.zeros(T, k, dtype=p.dtype)
        pr = 1.0
        for t, y in zip(live, ys):
            r[t] = p[t] - F.one_hot(torch.tensor(y), k).to(p.dtype)
            pr *= float(p[t, y])
        probs.append(pr)
        resid.append(r)
    return torch.tensor(probs, dtype=p.dtype), torch.stack(resid)
