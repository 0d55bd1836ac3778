"""Smoke test of an installed kfac_fast wheel (run outside the source tree).

Checks: import, backend report, native ops (symmetrize, eigh) through their custom ops, and that the
compiled module links neither libtorch nor a shared CUDA runtime.
"""
import argparse
import glob
import os
import subprocess
import sys

import torch

import kfac_fast
from kfac_fast.ops import symmetrize, symmetrize_ref

p = argparse.ArgumentParser()
p.add_argument("--expect-cuda", choices=["auto", "yes", "no"], default="auto")
args = p.parse_args()

pkg_dir = os.path.dirname(kfac_fast.__file__)
assert "site-packages" in pkg_dir, f"kfac_fast imported from {pkg_dir}, not an installed wheel"
for name, info in kfac_fast.available_backends().items():
    print(" ", info)
info = kfac_fast.build_info()
print("build:", info)
assert info["native"], info
if args.expect_cuda == "yes":
    assert info["cuda"] != "none"
elif args.expect_cuda == "no":
    assert info["cuda"] == "none"
A = torch.randn(3, 7, 7, dtype=torch.float64)
torch.testing.assert_close(symmetrize(A, backend="native"), symmetrize_ref(A))
from kfac_fast.linalg import eigh  # noqa: E402

S = symmetrize_ref(A)
r = eigh(S, backend="native")
torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(S), rtol=0, atol=1e-10)
so = glob.glob(os.path.join(pkg_dir, "_C*.so"))[0]
ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
for bad in ("libtorch", "libc10", "libcudart.so"):
    assert bad not in ldd, f"{so} links {bad}:\n{ldd}"
print("smoke test passed:", sys.version.split()[0], "torch", torch.__version__)
