#!/usr/bin/env bash
# One device call's worth of GPU work (under 10 minutes on an H100), for the `device` tool:
#   run(command="bash benchmarks/gpu_session.sh correctness")   # tests (bf16 included), sanitizer, floors
#   run(command="bash benchmarks/gpu_session.sh bench-quick")   # the quick report
#   run(command="bash benchmarks/gpu_session.sh bench MODES")   # the full GPU set for MODES (e.g. fwd)
# Logs and results go to $OUT (the device tool brings them back); commit them under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The device has torch, triton, peft and pytest-benchmark but no registry: install the package alone.
pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || LORA_KERNELS_SKIP_EXT=1 \
  pip install -q --no-build-isolation --no-deps -e . >> "$OUT/install.log" 2>&1
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1

case "${1:-correctness}" in
  correctness)
    python -m pytest tests/ -v -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
    # compute-sanitizer on one forward and one backward launch of every Triton kernel
    compute-sanitizer --tool memcheck --target-processes all python - <<'PY' 2>&1 | tee "$OUT/sanitizer.log" | tail -5
import torch, lora_kernels
from lora_kernels import lora_linear, use_backend
x = torch.randn(3, 333, 515, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(771, 515, device="cuda", dtype=torch.bfloat16) / 23
a = (torch.randn(16, 515, device="cuda", dtype=torch.bfloat16) / 23).requires_grad_()
b = (torch.randn(771, 16, device="cuda", dtype=torch.bfloat16) / 4).requires_grad_()
with use_backend("triton"):
    y = lora_linear(x, w, None, a, b, 2.0, 0.1, training=True)
    y.sum().backward()
torch.cuda.synchronize()
print("sanitizer run done")
PY
    python tools/floors.py 2>&1 | tee "$OUT/floors.md"
    ;;
  bench-quick)
    python -m lora_kernels bench --quick --out "$OUT/quick" 2>&1 | tee "$OUT/bench-quick.log" | tail -40
    ;;
  bench)
    python -m lora_kernels bench --modes "${2:-fwd}" --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -40
    ;;
esac
