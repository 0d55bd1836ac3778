#!/usr/bin/env bash
# Developer build: compiles kfac_fast._C into python/kfac_fast/ so that
#   PYTHONPATH=python python -m pytest tests
# runs against the source tree without installing. KFAC_FAST_CUDA=AUTO|ON|OFF as for wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/inplace-${KFAC_FAST_CUDA:-AUTO}}
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="${PYTHON:-$(command -v python3 || command -v python)}" \
  -DKFAC_FAST_CUDA="${KFAC_FAST_CUDA:-AUTO}" -DKFAC_FAST_CUDA_ARCHS="${KFAC_FAST_CUDA_ARCHS:-80;90}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
cp "$BUILD_DIR"/_C*.so python/kfac_fast/
echo "built $(ls python/kfac_fast/_C*.so)"
