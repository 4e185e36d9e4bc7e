#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the demo: fine-tuning with FusedLoRALinear on the best backend here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m lora_kernels demo "$@"
