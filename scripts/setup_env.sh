#!/usr/bin/env bash
# Create .venv and install lora_kernels with everything its tests, demo and benchmarks need; with
# LORA_KERNELS_VERSIONS=floor, .venv-floor with the oldest supported versions (scripts/versions/).
# Idempotent: a second run only re-installs the package itself. Works on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The version set (scripts/versions/<set>.txt): "current" (default) into .venv, with the extension built;
# "floor", the oldest supported versions, into .venv-floor, the pure-Python package only (CI's second leg).
VERSIONS=${LORA_KERNELS_VERSIONS:-current}
PINS=scripts/versions/$VERSIONS.txt
[ -f "$PINS" ] || { echo "no version set $PINS (LORA_KERNELS_VERSIONS=current or floor)" >&2; exit 2; }
VENV=.venv
[ "$VERSIONS" = current ] || VENV=.venv-$VERSIONS
pin() { grep -E "^$1([=~<>!]|$)" "$PINS" | head -1; }  # the set's requirement line for a package

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel ninja
python -m pip install -q "$(pin torch)" "$(pin triton)" numpy \
  pytest hypothesis pytest-benchmark ruff tqdm matplotlib \
  "$(pin peft)" "$(pin transformers)" safetensors "$(pin bitsandbytes)"
# DeepSpeed (tests/test_deepspeed.py runs ZeRO-2/3 on CPU ranks): --no-deps, so that it cannot change torch;
# its own dependencies by name
python -m pip install -q einops hjson msgpack py-cpuinfo psutil pydantic packaging
python -m pip install -q --no-deps "$(pin deepspeed)"

mkdir -p build
if [ "$VERSIONS" != current ]; then
  # The extension of this checkout, if the first set built it, is for that set's torch: the cuda backend
  # then reports it as built for another torch, and its tests skip.
  if ! LORA_KERNELS_SKIP_EXT=1 python -m pip install -v --no-build-isolation --no-deps -e . > "build/install-$VERSIONS.log" 2>&1; then
    tail -50 "build/install-$VERSIONS.log"
    exit 1
  fi
  python -c "import lora_kernels, torch, triton, numpy, peft, transformers; print('lora_kernels', lora_kernels.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
  exit 0
fi

# Build the optional extension against the torch above (no build isolation: it would fetch a second torch).
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
# setup.py takes the standard CUDA_HOME. Where `nvcc` on PATH is a wrapper script (torch would guess its
# parent folder), the toolkit is the folder nvcc reports as its own in a dry run.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  nvcc_bin=$( (nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 || true) | sed -n 's/^#\$ _HERE_=//p' | head -1)
  if [ -n "$nvcc_bin" ]; then export CUDA_HOME=${nvcc_bin%/bin}; fi
fi
# A toolkit without the cuBLAS/cuSPARSE headers (torch's CUDA headers include them): take pip's nvidia ones.
if [ -n "${CUDA_HOME:-}" ] && [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  nvidia_include=$(python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2> /dev/null || true)
  if [ -f "$nvidia_include/cublas_v2.h" ]; then export CPATH="$nvidia_include${CPATH:+:$CPATH}"; fi
fi
if ! python -m pip install -v --no-build-isolation --no-deps -e . > build/install.log 2>&1; then
  tail -50 build/install.log
  exit 1
fi
echo "extension build (full log: build/install.log):"
grep -E "\[lora_kernels setup\]|nvcc .* -c |Successfully installed" build/install.log | sed -E 's/(.{220}).*/\1 .../' || true
python -c "import lora_kernels, torch; print('lora_kernels', lora_kernels.__version__, '| torch', torch.__version__, '| backends here:', lora_kernels.available_backends())"
