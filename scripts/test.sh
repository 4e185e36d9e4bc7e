#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the checks: ruff, the test suite (Triton kernels through the
# interpreter when there is no GPU), and the CPU benchmarks in a fast mode so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
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
