#!/usr/bin/env bash
# Create .venv and install lora_kernels with everything its tests, demo and benchmarks need.
# Idempotent: a second run only re-installs the package itself. Works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The CUDA 13.0 build of torch: the C++/CUDA extension compiles against it (CPU-only machines run the
# CPU tests; nothing CUDA runs there). Triton 3.8's interpreter runs the Triton kernels on the CPU.
TORCH_SPEC=${LORA_KERNELS_TORCH:-torch==2.14.1}
TRITON_SPEC=${LORA_KERNELS_TRITON:-triton~=3.8.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel ninja
python -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" numpy \
  pytest hypothesis pytest-benchmark ruff tqdm matplotlib \
  peft transformers safetensors

# Build the optional extension against the torch above (no build isolation: it would fetch a second torch).
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
mkdir -p build
if ! python -m pip install -v --no-build-isolation --no-deps -e . > build/install.log 2>&1; then
  tail -50 build/install.log
  exit 1
fi
echo "extension build (full log: build/install.log):"
grep -E "\[lora_kernels setup\]|nvcc .* -c |Successfully installed" build/install.log | sed -E 's/(.{220}).*/\1 .../' || true
python -c "import lora_kernels, torch; print('lora_kernels', lora_kernels.__version__, '| torch', torch.__version__, '| backends here:', lora_kernels.available_backends())"
