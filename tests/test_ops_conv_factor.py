"""conv_factor_update: the Conv2d factor A from the layer input, chunked torch and the
implicit-im2col Triton kernel (interpreter on CPU here) against float64 unfold math."""
import itertools

import pytest
import torch
import torch.nn.functional as tnf

from _kernel_utils import assert_close_scaled, needs_compiled_triton
from kfac_fast.ops import conv_factor_update, conv_factor_update_ref
from kfac_fast.ops.conv_factor import _conv_factor_update_triton, split_override

# (C_in, kernel, stride, padding, dilation, batch, (H, W)): every value of every axis, and
# the awkward combinations (2x3 kernels with padding (2, 1), stride 2 with dilation 2).
GRID = [
    (c, k, s, p, d, m, hw)
    for (c, k, s, p, d), (m, hw) in zip(
        itertools.product((1, 3, 5), ((1, 1), (3, 3), (2, 3)), (1, 2), (0, 1, (2, 1)), (1, 2)),
        itertools.cycle([(1, (7, 6)), (3, (6, 9)), (3, (8, 5)), (1, (5, 7))]))
]
# A covering subset for the (slow) interpreter: each value of each axis at least twice.
SUBSET = [
    (1, (1, 1), 1, 0, 1, 1, (7, 6)),
    (3, (3, 3), 1, 1, 1, 3, (6, 9)),
    (5, (2, 3), 2, (2, 1), 2, 3, (8, 5)),
    (3, (2, 3), 1, 0, 2, 1, (5, 7)),
    (1, (3, 3), 2, (2, 1), 1, 3, (7, 6)),
    (5, (1, 1), 2, 1, 2, 1, (6, 9)),
    (3, (1, 1), 1, (2, 1), 1, 3, (8, 5)),
    (5, (3, 3), 2, 0, 2, 3, (9, 7)),
    (1, (2, 3), 1, 1, 1, 1, (5, 7)),
]


def _layers(cases, dtype=torch.float32, hs=None):
    xs = [torch.randn(m, c, *hw).to(dtype) for c, k, s, p, d, m, hw in cases]
    geo = dict(kernel_size=[k for _, k, *_ in cases], stride=[c[2] for c in cases],
               padding=[c[3] for c in cases], dilation=[c[4] for c in cases])
    if hs is None:
        hs = [i % 2 == 0 for i in range(len(cases))]
    return xs, geo, hs


def _factors(cases, hs, dtype=torch.float32):
    out = []
    for (c, k, *_), h in zip(cases, hs):
        n = c * k[0] * k[1] + h
        A = torch.randn(n, n, dtype=torch.float64)
        out.append((A + A.T).to(dtype))
    return out


def _expected64(F0, x, k, s, p, d, h, eps, scale):
    """float64: eps·F0 + scale·X̄ᵀX̄ with X the unfold patches as rows."""
    P = tnf.unfold(x.double(), k, dilation=d, padding=p, stride=s)
    X = P.transpose(1, 2).reshape(-1, P.shape[1])
    if h:
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)
    return eps * F0.double() + scale * (X.T @ X)


def _check_all(Fs, F0, xs, geo, hs, eps, scale, dtype, *, factor=1.0):
    for i, (F, F_0, x, h) in enumerate(zip(Fs, F0, xs, hs)):
        e = _expected64(F_0, x, geo["kernel_size"][i], geo["stride"][i], geo["padding"][i], geo["dilation"][i],
                        h, eps, scale[i] if isinstance(scale, list) else scale)
        assert_close_scaled(F, e, dtype, factor=factor)


def _direct_patches(x, k, s, p, d):
    """Patches from the definition (no unfold): x_pad[n, c, oh·s + i·d, ow·s + j·d]."""
    k, s, p, d = (tnf._pair(v) for v in (k, s, p, d))
    m, C, H, W = x.shape
    xp = tnf.pad(x, (p[1], p[1], p[0], p[0]))
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for n in range(m):
        for oh in range(Ho):
            for ow in range(Wo):
                rows.append(torch.stack([xp[n, c, oh * s[0] + i * d[0], ow * s[1] + j * d[1]]
                                         for c in range(C) for i in range(k[0]) for j in range(k[1])]))
    return torch.stack(rows)


@pytest.mark.parametrize("case", [SUBSET[2], SUBSET[4], (2, (3, 3), 2, 1, 2, 2, (7, 8))])
def test_convention_is_the_unfold_columns(case):
    c, k, s, p, d, m, hw = case
    x = torch.randn(m, c, *hw, dtype=torch.float64)
    X = _direct_patches(x, k, s, p, d)
    F = torch.zeros(X.shape[1] + 1, X.shape[1] + 1, dtype=torch.float64)
    conv_factor_update([F], [x], kernel_size=k, stride=s, padding=p, dilation=d, eps=0.0, scale=1.0,
                       homogeneous=True, backend="torch", chunk_bytes=64)
    Xb = torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(F, Xb.T @ Xb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes, flip", [(None, False), (1, True), (700, False)])
def test_torch_chunked_grid_fp64(chunk_bytes, flip):
    """All 108 geometries in one grouped call, homogeneous on every other layer (``flip``
    swaps which): one chunk per layer; chunk_bytes=1 forces one output row per chunk;
    700 mixes runs of examples and bands of rows. The chunked runs take every 5th
    geometry (still every value of every axis: 5 is prime to the axis sizes 2 and 3)."""
    grid = GRID if chunk_bytes is None else GRID[::5]
    xs, geo, hs = _layers(grid, torch.float64)
    hs = [h != flip for h in hs]
    Fs = _factors(grid, hs, torch.float64)
    F0 = [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.9, scale=0.05, homogeneous=hs, backend="torch", chunk_bytes=chunk_bytes)
    _check_all(Fs, F0, xs, geo, hs, 0.9, 0.05, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_chunked_equals_reference(dtype):
    xs, geo, hs = _layers(GRID[1::5], dtype)
    Fs = _factors(GRID[1::5], hs)
    ref = [F.clone() for F in Fs]
    F0 = [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.5, scale=0.1, homogeneous=hs, backend="torch", chunk_bytes=300)
    conv_factor_update_ref(ref, xs, **geo, eps=0.5, scale=0.1, homogeneous=hs)
    for F, R in zip(Fs, ref):
        assert_close_scaled(F, R, torch.float32)
    # both against float64 of the (quantised) inputs: fp32 accumulation for 16-bit inputs
    _check_all(Fs, F0, xs, geo, hs, 0.5, 0.1, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flip", [False, True])
def test_triton_matches_float64(dtype, flip):
    xs, geo, hs = _layers(SUBSET, dtype)
    hs = [h != flip for h in hs]
    Fs = _factors(SUBSET, hs)
    F0 = [F.clone() for F in Fs]
    scale = [0.01 * (i + 1) for i in range(len(SUBSET))]
    conv_factor_update(Fs, xs, **geo, eps=0.95, scale=scale, homogeneous=hs, backend="triton")
    for F in Fs:
        assert torch.equal(F, F.T), "the Triton update must leave F exactly symmetric"
    # against float64 of the inputs as stored (the kernel accumulates in fp32) ...
    _check_all(Fs, F0, xs, geo, hs, 0.95, scale, torch.float32)
    if dtype != torch.float32:
        # ... and of the unrounded inputs, with the input dtype's tolerance
        torch.manual_seed(0)
        xs_full, _, _ = _layers(SUBSET, torch.float32)
        _check_all(Fs, F0, xs_full, geo, hs, 0.95, scale, dtype)


def test_triton_equals_torch_chunked_and_reference():
    xs, geo, hs = _layers(SUBSET[:5])
    Fs = _factors(SUBSET[:5], hs)
    chunked, ref = [F.clone() for F in Fs], [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.9, scale=0.1, homogeneous=hs, backend="triton")
    conv_factor_update(chunked, xs, **geo, eps=0.9, scale=0.1, homogeneous=hs, backend="torch", chunk_bytes=200)
    conv_factor_update_ref(ref, xs, **geo, eps=0.9, scale=0.1, homogeneous=hs)
    for F, C, R in zip(Fs, chunked, ref):
        assert_close_scaled(F, R, torch.float32)
        assert_close_scaled(C, R, torch.float32)


def test_triton_split_reduction_atomic_path():
    """The split-K path (fp32 atomics into eps·F, then mirrored): forced in the interpreter."""
    cases = [SUBSET[1], SUBSET[2], SUBSET[7]]
    xs, geo, hs = _layers(cases)
    Fs = _factors(cases, hs)
    Fs[0].fill_(float("nan"))  # eps = 0 must ignore it here too
    F0 = [F.clone() for F in Fs]
    with split_override(40):
        conv_factor_update(Fs, xs, **geo, eps=0.0, scale=0.2, homogeneous=hs, backend="triton")
    for F in Fs:
        assert torch.equal(F, F.T)
    _check_all(Fs, [torch.zeros_like(F) for F in F0], xs, geo, hs, 0.0, 0.2, torch.float32)
    Fs = [F.clone() for F in F0[1:]]
    with split_override(64):
        conv_factor_update(Fs, xs[1:], kernel_size=geo["kernel_size"][1:], stride=geo["stride"][1:],
                           padding=geo["padding"][1:], dilation=geo["dilation"][1:], eps=0.7, scale=0.2,
                           homogeneous=hs[1:], backend="triton")
    _check_all(Fs, F0[1:], xs[1:], {k: v[1:] for k, v in geo.items()}, hs[1:], 0.7, 0.2, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ema_semantics(backend):
    x = torch.randn(3, 2, 5, 6)
    kw = dict(kernel_size=(2, 3), stride=1, padding=(1, 0), dilation=1, homogeneous=True, backend=backend)
    R = 6 * 4  # H_out = 5 + 2 - 2 + 1, W_out = 6 - 3 + 1
    # eps = 0 ignores the old factor (NaN included); the ones coordinate counts the patches
    F = torch.full((13, 13), float("nan"))
    conv_factor_update([F], [x], eps=0.0, scale=1.0, **kw)
    assert torch.isfinite(F).all()
    assert F[-1, -1].item() == 3 * R
    patches = tnf.unfold(x.double(), (2, 3), padding=(1, 0))
    torch.testing.assert_close(F[-1, :-1].double(), patches.sum(dim=(0, 2)), rtol=1e-5, atol=1e-4)
    # scale = 0 with eps = 1 leaves F as it was; two steps compose as the running average
    F1 = F.clone()
    conv_factor_update([F], [x], eps=1.0, scale=0.0, **kw)
    assert torch.equal(F, F1)
    A = torch.randn(13, 13)
    A = A + A.T
    F = A.clone()
    x2 = torch.randn(3, 2, 5, 6)
    e, s = 0.95, 0.05 / (3 * R)
    conv_factor_update([F], [x], eps=e, scale=s, **kw)
    conv_factor_update([F], [x2], eps=e, scale=s, **kw)
    want = e * (e * A.double() + s * F1.double()) + s * _expected64(torch.zeros(13, 13), x2, (2, 3), 1, (1, 0), 1,
                                                                   True, 0.0, 1.0)
    assert_close_scaled(F, want, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noncontiguous_and_channels_last_inputs(backend):
    cases = [SUBSET[1], SUBSET[2]]
    base, geo, hs = _layers(cases)
    xs = [base[0].transpose(2, 3).contiguous().transpose(2, 3),  # transposed H/W storage
          base[1].contiguous(memory_format=torch.channels_last)]
    xs.append(torch.randn(6, 3, 16, 13)[::2, :, 1::2, ::2])  # strided slice, shape (3, 3, 8, 7)
    assert not any(x.is_contiguous() for x in xs)
    cases.append((3, (3, 3), 2, 1, 1, 3, (8, 7)))
    geo = {k: v + [c] for (k, v), c in zip(geo.items(), cases[2][1:5])}
    hs = hs + [True]
    Fs = _factors(cases, hs)
    F0 = [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.5, scale=0.3, homogeneous=hs, backend=backend, chunk_bytes=500)
    _check_all(Fs, F0, xs, geo, hs, 0.5, 0.3, torch.float32)


def test_fp64_factors_and_inputs_on_torch_and_auto():
    xs, geo, hs = _layers(SUBSET[:3], torch.float64)
    Fs = _factors(SUBSET[:3], hs, torch.float64)
    F0 = [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.9, scale=0.1, homogeneous=hs)  # auto -> chunked torch
    _check_all(Fs, F0, xs, geo, hs, 0.9, 0.1, torch.float64)
    # auto never fails on a dtype the kernel lacks, even inside use_backend("triton")
    from kfac_fast import use_backend

    Fs = [F.clone() for F in F0]
    with use_backend("triton"):
        conv_factor_update(Fs, xs, **geo, eps=0.9, scale=0.1, homogeneous=hs)
    _check_all(Fs, F0, xs, geo, hs, 0.9, 0.1, torch.float64)


def test_mixed_input_dtypes_in_one_call_and_empty_batch():
    cases = [SUBSET[1], SUBSET[3], SUBSET[5]]
    xs, geo, hs = _layers(cases)
    xs[1] = xs[1].bfloat16()
    xs[2] = xs[2][:0]  # m = 0: only the decay
    Fs = _factors(cases, hs)
    F0 = [F.clone() for F in Fs]
    conv_factor_update(Fs, xs, **geo, eps=0.5, scale=0.25, homogeneous=hs, backend="triton")
    _check_all(Fs[:2], F0[:2], xs[:2], {k: v[:2] for k, v in geo.items()}, hs[:2], 0.5, 0.25, torch.float32)
    assert_close_scaled(Fs[2], 0.5 * F0[2].double(), torch.float32)
    F = F0[2].clone()
    conv_factor_update([F], [xs[2]], kernel_size=cases[2][1], stride=cases[2][2], padding=cases[2][3],
                       dilation=cases[2][4], eps=0.5, scale=0.25, homogeneous=hs[2], backend="torch")
    assert_close_scaled(F, 0.5 * F0[2].double(), torch.float32)


def test_geometry_broadcast_forms():
    x = [torch.randn(2, 3, 6, 7), torch.randn(1, 3, 5, 5)]
    F = [torch.zeros(28, 28), torch.zeros(28, 28)]
    R = [torch.zeros(28, 28), torch.zeros(28, 28)]
    conv_factor_update(F, x, kernel_size=3, stride=(1, 2), padding=[1, (0, 1)], dilation=1, eps=0.0, scale=1.0,
                       homogeneous=True)
    conv_factor_update_ref(R, x, kernel_size=[(3, 3), (3, 3)], stride=[(1, 2)] * 2, padding=((1, 1), (0, 1)),
                           dilation=[1, 1], eps=0.0, scale=1.0, homogeneous=[True, True])
    for a, b in zip(F, R):
        assert_close_scaled(a, b, torch.float32)


def test_errors():
    x = [torch.randn(2, 3, 6, 6)]
    kw = dict(kernel_size=3, eps=1.0, scale=1.0, homogeneous=True)
    with pytest.raises(ValueError, match=r"expected \(28, 28\)"):
        conv_factor_update([torch.zeros(27, 27)], x, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        conv_factor_update([torch.zeros(28, 28).T], x, **kw, backend="triton")
    with pytest.raises(TypeError, match="float32"):
        conv_factor_update([torch.zeros(28, 28, dtype=torch.float64)], x, **kw, backend="triton")
    with pytest.raises(TypeError, match="inputs of dtype"):
        conv_factor_update([torch.zeros(28, 28)], [x[0].double()], **kw, backend="triton")
    with pytest.raises(ValueError, match=r"\(m, C_in, H, W\)"):
        conv_factor_update([torch.zeros(28, 28)], [x[0][0]], **kw)
    with pytest.raises(ValueError, match="does not fit"):
        conv_factor_update([torch.zeros(28, 28)], x, kernel_size=3, dilation=3, eps=1.0, scale=1.0,
                           homogeneous=True)
    with pytest.raises(ValueError, match="one per layer"):
        conv_factor_update([torch.zeros(28, 28)], x, kernel_size=[3, 3], eps=1.0, scale=1.0, homogeneous=True)
    with pytest.raises(TypeError, match="pair of ints"):
        conv_factor_update([torch.zeros(28, 28)], x, kernel_size=[(3, 3, 3)], eps=1.0, scale=1.0, homogeneous=True)
    with pytest.raises(ValueError, match=">= 1"):
        conv_factor_update([torch.zeros(28, 28)], x, kernel_size=3, stride=0, eps=1.0, scale=1.0, homogeneous=True)
    with pytest.raises(ValueError, match="one entry per layer"):
        conv_factor_update([torch.zeros(28, 28)] * 2, x, **kw)
    with pytest.raises(ValueError, match="chunk_bytes"):
        conv_factor_update([torch.zeros(28, 28)], x, **kw, backend="torch", chunk_bytes=0)


def test_opcheck():
    xs = [torch.randn(2, 3, 5, 6), torch.randn(1, 1, 4, 4).half()]
    Fs = [torch.randn(28, 28), torch.randn(4, 4)]
    Fs = [F + F.T for F in Fs]
    geometry = [3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 0, 1, 1, 1]
    torch.library.opcheck(_conv_factor_update_triton, (Fs, xs, geometry, [0.5, 0.0], [1.0, 2.0], [True, False]))


# ResNet-like shapes: stem 7x7/2 on 3 channels, 3x3 convs, a 1x1/2 downsample.
CUDA_CASES = [(3, (7, 7), 2, 3, 1, 8, (64, 64)), (64, (3, 3), 1, 1, 1, 8, (28, 28)),
              (128, (3, 3), 2, 1, 1, 8, (14, 14)), (64, (1, 1), 2, 0, 1, 8, (28, 28)),
              (256, (3, 3), 1, 1, 1, 8, (7, 7))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_factor_cuda(dtype):
    needs_compiled_triton()
    xs, geo, hs = _layers(CUDA_CASES, dtype, hs=[True] * len(CUDA_CASES))
    xs = [x.cuda() for x in xs]
    Fs = [F.cuda() for F in _factors(CUDA_CASES, hs)]
    ref = [F.clone() for F in Fs]
    scale = [0.05 / (x.shape[0] * 64) for x in xs]
    conv_factor_update(Fs, xs, **geo, eps=0.95, scale=scale, homogeneous=hs, backend="triton")
    conv_factor_update_ref(ref, xs, **geo, eps=0.95, scale=scale, homogeneous=hs)
    torch.cuda.synchronize()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for F, R in zip(Fs, ref):
        assert torch.equal(F, F.T)
        assert_close_scaled(F, R, torch.float32, factor=10.0 if tf32 else 1.0)
