#!/usr/bin/env bash
# The whole test job (README's second command; CI runs exactly this):
#   1. install CPU torch, build and release tools (requirements-wheel.txt) and the test extras
#   2. scripts/build_wheels.sh: the sdist, the wheel built from it (CPU + CUDA sm_80/sm_90 when
#      nvcc exists), repaired by auditwheel into a manylinux wheel in wheelhouse/; install it
#   3. run the test suite with TRITON_INTERPRET=1 against the installed wheel: the quick group, then the heavy one
#   4. packaging test: the repaired wheel in a fresh venv beside CPU torch (its Requires-Dist
#      resolved by pip), native + Triton-interpreter smoke tests, tests/test_packaging.py
#   5. the sdist built from scratch with nvcc hidden (CPU-only _C) passes the native tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor"

step() { echo; echo "=== $* ($(date +%T))"; }

step "install torch (CPU), build and release tools"
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -r requirements-wheel.txt

step "release build: sdist, wheel from the sdist, auditwheel repair (KFAC_FAST_CUDA=${KFAC_FAST_CUDA:-AUTO})"
PYTHON="$PY" bash scripts/build_wheels.sh
WHEEL=$(ls "$ROOT"/wheelhouse/kfac_fast-*-manylinux_*.whl)
SDIST=$(ls "$ROOT"/wheelhouse/kfac_fast-*.tar.gz)
$PY -m pip install -q --force-reinstall --no-deps "$WHEEL"
$PY -m pip install -q "$WHEEL[test,demo,integrations]"
# timm without its dependencies: its torchvision requirement resolves to a CUDA build that cannot
# import beside CPU torch (tests/_torchvision_placeholder.py stands in for it)
$PY -m pip install -q --no-deps "timm>=1.0,<2"

# Run from tests/ so `import kfac_fast` resolves to the installed wheel, not the source tree.
# Two groups, everything runs: the quick one (plain `pytest tests` runs just this), then the
# heavy one (marker `heavy`: the 2000-iteration soak, end-to-end demo runs, torch.compile).
# PYTEST_MARKERS narrows both (e.g. "not slow" leaves the soak out). GPU tests skip themselves.
# One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' tensors are small, and on
# a loaded machine spinning thread pools made single files up to 5x slower.
suite() {  # suite GROUP MARK_EXPRESSION: exit status 5 (no test selected) is not a failure
  step "test suite, $1 group (TRITON_INTERPRET=1, installed wheel)"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
    -m "$2${PYTEST_MARKERS:+ and ($PYTEST_MARKERS)}" "$ROOT/tests" ${PYTEST_ARGS:-} || [ $? -eq 5 ]
}
suite quick "not heavy"
suite heavy "heavy"

step "packaging test: fresh venv + CPU torch + the repaired wheel"
EXPECT=auto
if [ "${KFAC_FAST_CUDA:-AUTO}" = OFF ]; then EXPECT=no
elif command -v "${CUDACXX:-nvcc}" >/dev/null 2>&1; then EXPECT=yes; fi
VENV="$ROOT/build/smoke-venv"
rm -rf "$VENV"
$PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
# With its dependencies: pip must find the installed CPU torch inside the wheel's Requires-Dist bound.
"$VENV/bin/python" -m pip install -q "$WHEEL[test]"
"$VENV/bin/python" -m pip check
(cd /tmp && "$VENV/bin/python" "$ROOT/scripts/smoke_test.py" --expect-cuda "$EXPECT" --triton)
KFAC_FAST_REQUIRE_WHEEL=1 KFAC_FAST_WHEELHOUSE="$ROOT/wheelhouse" "$VENV/bin/python" -m pytest -q \
  -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "$ROOT/tests/test_packaging.py"

step "sdist without nvcc: CPU-only build from scratch, native tests"
# A machine without nvcc: drop every PATH entry holding one, and the variables CMake reads.
PY_EXE=$($PY -c 'import sys; print(sys.executable)')
NO_NVCC_PATH=
IFS=: read -ra _dirs <<<"$PATH"
for d in "${_dirs[@]}"; do [ -x "$d/nvcc" ] || NO_NVCC_PATH=${NO_NVCC_PATH:+$NO_NVCC_PATH:}$d; done
if PATH="$NO_NVCC_PATH" command -v nvcc >/dev/null || ! PATH="$NO_NVCC_PATH" command -v c++ >/dev/null; then
  echo "cannot hide nvcc from PATH without hiding the C++ compiler"; exit 1
fi
rm -rf dist-cpu && mkdir dist-cpu
env -u CUDACXX -u CUDA_PATH -u CUDA_HOME -u CUDAHOSTCXX PATH="$NO_NVCC_PATH" KFAC_FAST_CUDA=AUTO \
  "$PY_EXE" -m pip wheel -v --no-build-isolation --no-deps -w dist-cpu "$SDIST" >dist-cpu/build.log 2>&1 \
  || { tail -50 dist-cpu/build.log; exit 1; }
grep -q "kfac_fast: nvcc not found, building the CPU-only module" dist-cpu/build.log \
  || { echo "CMake did not take the no-nvcc path:"; grep -i cuda dist-cpu/build.log; exit 1; }
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps dist-cpu/kfac_fast-*.whl
(cd /tmp && "$VENV/bin/python" "$ROOT/scripts/smoke_test.py" --expect-cuda no)
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" -m native "$ROOT/tests"

step "all test steps passed"
