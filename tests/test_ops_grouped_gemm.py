"""The shared grouped GEMM: host-side layout/alignment claims, and an offline compile of
the kernel for sm_90 (no GPU needed: Triton's bundled ptxas), which the interpreter
cannot check (it ignores hints and never lowers the kernel)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kfac_fast.ops._grouped_gemm import Operand, Problem, _layout, _pow2_div, grouped_gemm

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_codes_and_unused_strides():
    assert _layout(5, 7, 7, 1) == (1, 7, 1)        # row-major
    assert _layout(5, 7, 1, 5) == (2, 1, 5)        # column-major (a transposed view)
    assert _layout(5, 7, 14, 2) == (0, 14, 2)      # strided both ways
    assert _layout(1, 7, 99, 3) == (2, 0, 3)       # one row: its stride is never used
    assert _layout(5, 1, 3, 99) == (1, 3, 0)       # one column


def test_pow2_div():
    assert _pow2_div([], 16) == 16
    assert _pow2_div([0, 32, 48], 16) == 16
    assert _pow2_div([785], 16) == 1
    assert _pow2_div([1000, 500], 16) == 4
    assert _pow2_div([250], 4) == 2


def test_mixed_layouts_in_one_launch():
    # row-major, column-major and strided operands in one grouped launch fall back to
    # generic strides and must still be exact.
    A = [torch.randn(9, 6), torch.randn(6, 9).T, torch.randn(9, 12)[:, ::2]]
    B = [torch.randn(6, 5), torch.randn(5, 6).T, torch.randn(6, 5)]
    outs = [torch.empty(9, 5) for _ in A]
    grouped_gemm([Problem(Operand.of(a), Operand.of(b), out=o, alpha=2.0) for a, b, o in zip(A, B, outs)])
    for a, b, o in zip(A, B, outs):
        torch.testing.assert_close(o, 2 * a @ b, rtol=1e-5, atol=1e-5)


def test_pointer_table_is_built_once_per_signature(monkeypatch):
    """A repeated launch over the same buffers reuses the cached pointer table (no new host
    table, no copy) and computes the same result; new data in the same buffers is honoured."""
    from kfac_fast.ops import _grouped_gemm as gg

    gg._META_CACHE.clear()
    A, B = [torch.randn(7, 5), torch.randn(4, 3)], [torch.randn(5, 6), torch.randn(3, 2)]
    outs = [torch.empty(7, 6), torch.empty(4, 2)]
    probs = lambda: [Problem(Operand.of(a), Operand.of(b), out=o) for a, b, o in zip(A, B, outs)]  # noqa: E731
    grouped_gemm(probs())
    assert len(gg._META_CACHE) == 1
    built = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(1) or torch.as_tensor(*a, **k))
    A[0].mul_(2.0)  # same buffers, new values
    grouped_gemm(probs())
    assert not built and len(gg._META_CACHE) == 1
    for a, b, o in zip(A, B, outs):
        torch.testing.assert_close(o, a @ b, rtol=1e-5, atol=1e-5)


_COMPILE = textwrap.dedent("""
    import json, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kfac_fast.ops import _grouped_gemm as gg
    k = gg._grouped_gemm_kernel
    base = dict(A_CODE=0, B_CODE=0, C_CODE=0, CIN_CODE=0, HAS_ONES=False, GATHER_K=False, SYMMETRIC=False,
                DIVIDE=False, HAS_CIN=False, DOT_FP32=True, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64,
                BLOCK_K=32, GROUP_M=8, A_CONTIG=1, B_CONTIG=1, C_CONTIG=1, CIN_CONTIG=1, A_ALIGN=4, B_ALIGN=4, C_ALIGN=4,
                CIN_ALIGN=4, A_PALIGN=16, B_PALIGN=16, C_PALIGN=16, CIN_PALIGN=16)
    variants = {
        "plain_fp32": {},
        "factor_update_fp32": dict(A_CONTIG=2, HAS_ONES=True, GATHER_K=True, SYMMETRIC=True, HAS_CIN=True),
        "eigen_divide_tf32": dict(DIVIDE=True, INPUT_PRECISION="tf32"),
        "factor_update_bf16": dict(A_CODE=2, B_CODE=2, A_CONTIG=2, A_ALIGN=8, B_ALIGN=8, DOT_FP32=False,
                                   HAS_ONES=True, SYMMETRIC=True, HAS_CIN=True, BLOCK_M=128, BLOCK_N=128),
    }
    out = {}
    for name, v in variants.items():
        cfg = dict(base, **v)
        sig = {"meta": "*i64", "fmeta": "*fp32", "idx_ptr": "*i64", "G": "i32"}
        sig.update({n: "constexpr" for n in k.arg_names if n not in sig})
        c = triton.compile(ASTSource(k, sig, constexprs=cfg), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=8 if cfg["BLOCK_M"] == 128 else 4, num_stages=3))
        ptx = c.asm["ptx"]
        out[name] = dict(cp16=ptx.count("0x10,"), cp4=ptx.count("0x4,"), ldv4=ptx.count("ld.global.v4"))
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="needs Triton's bundled ptxas (Linux)")
def test_kernel_compiles_for_sm90_with_vectorised_loads():
    env = dict(os.environ, PYTHONPATH=os.path.join(_REPO, "python"), TRITON_INTERPRET="0",
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ASTSource" in proc.stderr and "TypeError" in proc.stderr:
        pytest.skip(f"this Triton's offline-compile API differs: {proc.stderr.splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    # 16-byte async copies (or v4 loads) prove the hints reach the compiler.
    for name, r in res.items():
        assert r["cp16"] + r["ldv4"] > 0, (name, r)
    assert res["plain_fp32"]["cp4"] == 0, res["plain_fp32"]


def test_one_launch_per_gemm_stage_for_all_layers(monkeypatch):
    from kfac_fast import ops
    from kfac_fast.ops import _grouped_gemm as gg

    calls = []
    real = gg._launch
    monkeypatch.setattr(gg, "_launch", lambda probs, *a: (calls.append(len(probs)), real(probs, *a))[1])
    shapes = [(7, 9), (1, 3), (12, 2)]  # (d_out, d_in + 1)
    X = [torch.randn(4, n - 1) for _, n in shapes]
    Gm = [torch.randn(4, p) for p, _ in shapes]
    V = [torch.randn(p, n) for p, n in shapes]
    sq = lambda n: torch.randn(n, n)  # noqa: E731
    ops.factor_update([torch.zeros(n, n) for _, n in shapes] + [torch.zeros(p, p) for p, _ in shapes], X + Gm,
                      eps=0.0, scale=1.0, homogeneous=[True] * 3 + [False] * 3, backend="triton")
    assert calls == [6]
    calls.clear()
    ops.eigen_precondition(V, [sq(p) for p, _ in shapes], [torch.rand(p) for p, _ in shapes],
                           [sq(n) for _, n in shapes], [torch.rand(n) + 1 for _, n in shapes], backend="triton")
    assert calls == [3, 3, 3, 3]
    calls.clear()
    ops.sandwich([sq(p) for p, _ in shapes], V, [sq(n) for _, n in shapes], V=V, beta=1.0, alpha=-1.0,
                 transpose_L=True, backend="triton")
    assert calls == [3, 3]
    calls.clear()
    ops.rank_m_precondition(X, Gm, [sq(n) for _, n in shapes], [sq(p) for p, _ in shapes], homogeneous=True,
                            scale=0.25, backend="triton")
    assert calls == [6, 3]
