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
