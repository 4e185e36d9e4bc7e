#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the demo (examples/finetune_demo.py): fine-tuning a small Llama with
# FusedLoRALinear on the best backend here, next to PEFT. Arguments go to the demo (--quick, --steps N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python examples/finetune_demo.py "$@"
