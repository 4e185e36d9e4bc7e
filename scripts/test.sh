#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the checks: ruff, the test suite (Triton kernels through the
# interpreter when there is no GPU), and the CPU benchmarks in a fast mode so they cannot rot.
# LORA_KERNELS_VERSIONS=floor: the same test suite on the oldest supported versions (scripts/versions/floor.txt),
# in .venv-floor; ruff, the benchmarks and the GPU visit's dry run are left to the default set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VERSIONS=${LORA_KERNELS_VERSIONS:-current}
# torch's JIT-built extensions (DeepSpeed's shm op) per version set: both torch builds would share
# ~/.cache/torch_extensions/py311_cu130, and a build one set started and left locked would hang the other.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions/$VERSIONS}
if [ "$VERSIONS" != current ]; then
  . ".venv-$VERSIONS/bin/activate"
  python -m pytest tests/ -q -p no:cacheprovider "$@"
  exit 0
fi
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest tests/ -v "$@"
# The CPU benchmark set, each benchmark run once (timings off), so the benchmark code cannot rot.
python -m pytest benchmarks/ --benchmark-disable -q -p no:cacheprovider
# The GPU visit's script, every phase on the CPU (interpreter, tiny shapes), so it cannot rot before a GPU.
OUT=build/gpu_run_dry bash benchmarks/gpu_run.sh --dry > build/gpu_run_dry.log 2>&1 \
  || { tail -40 build/gpu_run_dry.log; echo "benchmarks/gpu_run.sh --dry failed"; exit 1; }
grep -A12 "^## Phases" build/gpu_run_dry/SUMMARY.md
