"""Smoke test of an installed kfac_fast wheel (run outside the source tree).

Checks: import from site-packages, backend report, native ops (symmetrize, eigh) through their
custom ops, one K-FAC step, and that the compiled module links neither libtorch nor a CUDA
runtime or driver library (no libtorch, libc10, libcudart, libcuda in ``ldd``). A CUDA build
reports the driver it would use (it opens libcuda.so.1 only then); without a GPU its CUDA entry
point raises the driver's reason.
With ``--triton`` it also runs Triton kernels (grouped sandwich and factor update) in the Triton
interpreter on CPU tensors (sets TRITON_INTERPRET=1 before triton is imported; needs triton).
"""
import argparse
import glob
import os
import subprocess
import sys

p = argparse.ArgumentParser()
p.add_argument("--expect-cuda", choices=["auto", "yes", "no"], default="auto")
p.add_argument("--triton", action="store_true", help="also run Triton kernels in the interpreter")
args = p.parse_args()
if args.triton:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.ops import symmetrize, symmetrize_ref  # noqa: E402

pkg_dir = os.path.dirname(kfac_fast.__file__)
assert "site-packages" in pkg_dir, f"kfac_fast imported from {pkg_dir}, not an installed wheel"
backends = kfac_fast.available_backends()
for name, info in backends.items():
    print(" ", info)
info = kfac_fast.build_info()
print("build:", info)
assert info["native"], info
if args.expect_cuda == "yes":
    assert info["cuda"] != "none", info
elif args.expect_cuda == "no":
    assert info["cuda"] == "none", info
from kfac_fast._native import native  # noqa: E402

mod = native()
print("CUDA driver:", mod.cuda_driver_status())
if info["cuda"] != "none" and not torch.cuda.is_available():
    try:
        mod.symmetrize_cuda(1, 1, 1, 2, 0, 0)
        raise AssertionError("symmetrize_cuda on a bogus pointer did not raise")
    except mod.NativeError as exc:
        print("CUDA entry point without a GPU:", exc)
A = torch.randn(3, 7, 7, dtype=torch.float64)
torch.testing.assert_close(symmetrize(A, backend="native"), symmetrize_ref(A))
from kfac_fast.linalg import eigh  # noqa: E402

S = symmetrize_ref(A)
r = eigh(S, backend="native")
torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(S), rtol=0, atol=1e-10)

so = glob.glob(os.path.join(pkg_dir, "_C*.so"))[0]
ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
assert "not found" not in ldd, f"{so} has unresolved libraries:\n{ldd}"
for bad in ("libtorch", "libc10", "libcudart", "libcuda"):
    assert bad not in ldd, f"{so} links {bad}:\n{ldd}"

# One K-FAC step (whole Python package present, default backends).
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
stats = opt.step(torch.randn(32, 6), torch.randint(0, 3, (32,)))
assert torch.isfinite(torch.as_tensor(float(stats["loss"]))), stats

if args.triton:
    assert backends["triton"].available, backends["triton"]
    from kfac_fast.ops import factor_update, factor_update_ref, sandwich, sandwich_ref  # noqa: E402

    L = [torch.randn(5, 4), torch.randn(3, 6)]
    W = [torch.randn(4, 7), torch.randn(6, 2)]
    R = [torch.randn(7, 3), torch.randn(2, 5)]
    for got, want in zip(sandwich(L, W, R, alpha=0.5, backend="triton"), sandwich_ref(L, W, R, alpha=0.5)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    X = [torch.randn(16, 5), torch.randn(16, 3)]
    F = [torch.eye(6), torch.eye(4)]
    F_ref = [f.clone() for f in F]
    factor_update(F, X, eps=0.9, scale=0.1 / 16, homogeneous=True, backend="triton")
    factor_update_ref(F_ref, X, eps=0.9, scale=0.1 / 16, homogeneous=True)
    for got, want in zip(F, F_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    print("triton interpreter kernels match the references")
print("smoke test passed:", sys.version.split()[0], "torch", torch.__version__)
