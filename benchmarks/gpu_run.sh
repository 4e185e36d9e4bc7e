#!/usr/bin/env bash
# The whole GPU visit in one command, in phases, each with its own timeout, inside one time budget:
#
#   bash benchmarks/gpu_run.sh                     # on the GPU machine: at most 7.5 minutes
#   bash benchmarks/gpu_run.sh --dry               # here, on the CPU: every phase in seconds (CI runs it)
#   bash benchmarks/gpu_run.sh --only tests-gpu,table  # some phases only (a confirming re-run)
#
# Phases: env (nvidia-smi, versions, measured ceilings and floors), build (the extension for sm_90, in the
# background), tests-gpu and tests (the tests marked cuda first, then the rest; junit XML), table (the
# timing table), tma (issue 21's GEMM paths, forward and dX, each candidate in its own process), qlora (QLoRA, NF4 bases; skipped with a recorded
# reason without bitsandbytes), overhead (host time per call), e2e (a Llama-style training step, PEFT vs
# PEFT + fuse), sweep (tile configs), cuda-ext (the cuda backend's
# tests, if the build finished), sanitize (compute-sanitizer memcheck), then the summary.
# Nothing is installed: the package is imported from this checkout through PYTHONPATH. Results go to $OUT
# (at most 8 files: SUMMARY.md, results.json, results.md, junit*.xml, tuning-<device>.json (the routing table
# the timings imply, to commit as lora_kernels/tuning/<device>.json), raw-logs.tar.gz), refreshed after every
# phase, so a phase that dies loses nothing that came before it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: bash benchmarks/gpu_run.sh [--dry] [--only phase,phase]" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-$ROOT/build/gpu_run}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
mkdir -p "$OUT"
rm -f "$OUT"/SUMMARY.md "$OUT"/results.json "$OUT"/results.md "$OUT"/junit*.xml "$OUT"/raw-logs.tar.gz \
  "$OUT"/tuning-*.json
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BUDGET_S=${GPU_RUN_BUDGET_S:-450}  # the whole run; phases that would overrun it are cut short or skipped
if [ "$DRY" = 1 ]; then
  export LORA_GPU_RUN_DRY=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
START=$(date +%s)

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
pack() { tar -czf "$OUT/raw-logs.tar.gz" --exclude=./ext-build -C "$WORK" . 2>/dev/null; }

# phase NAME TIMEOUT_S COMMAND...: run with a timeout (no longer than the budget left), log to $WORK/NAME.log,
# record status and seconds in $WORK/phases.tsv, pack the raw logs.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START) - 20))  # 20 s kept for the summary
  if ! wanted "$name"; then return 0; fi
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped: budget spent\t0\n' "$name" >> "$WORK/phases.tsv"
    echo "== $name: skipped, budget spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="exit $rc" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$WORK/phases.tsv"
  echo "   $status, $(($(date +%s) - t0)) s; last lines:"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
  pack
}

# --- env: the machine, the versions, the measured ceilings and the floors they give
env_phase() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  "$PY" benchmarks/gpu_run.py env --work "$WORK"
  if [ "$DRY" = 1 ]; then
    "$PY" tools/floors.py --tflops 700 --gbps 3000 > "$WORK/floors.md"
  else
    "$PY" tools/floors.py > "$WORK/floors.md"
  fi
  cat "$WORK/floors.md"
}
export -f env_phase
export PY WORK DRY
phase env 30 env_phase

# --- build: lora_kernels._C for this GPU, in the background while the tests run
BUILD_PID=""
if wanted cuda-ext; then
  echo "== build (background)"
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/gpu_build_ext.py --dry > "$WORK/build.log" 2>&1 &
  else
    timeout -k 10 300 "$PY" benchmarks/gpu_build_ext.py --build-dir "$WORK/ext-build" > "$WORK/build.log" 2>&1 &
  fi
  BUILD_PID=$!
fi

# --- tests: the GPU-side suite (CPU-only suites left out: kernel compile checks, gloo distributed, the
# extension's emulator; the cuda backend's tests come after its build)
PYTEST_ARGS=(-p no:cacheprovider -v -rfE)  # -v: one line a test, so a cut-off run still tells
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && PYTEST_ARGS+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 120)
GPU_TESTS=(tests/ --ignore=tests/test_triton_compile.py --ignore=tests/test_distributed.py
  --ignore=tests/test_cuda_ext.py)
# First the tests marked `cuda`: the checks only a GPU can make (bf16 kernels, direct launches against
# kernel[grid] bit for bit, CUDA graphs), so a run cut short still has them (its junit XML goes with the raw
# logs); then the rest of the suite, on the device. A dry run collects everything and runs the first part
# only (it skips: no GPU).
phase tests-gpu 90 "$PY" -m pytest "${GPU_TESTS[@]}" "${PYTEST_ARGS[@]}" -m cuda --junitxml="$WORK/junit-gpu.xml"
if [ "$DRY" = 0 ]; then
  phase tests 130 "$PY" -m pytest "${GPU_TESTS[@]}" "${PYTEST_ARGS[@]}" -m "not cuda" --junitxml="$OUT/junit.xml"
fi

# The table (which writes the routing table) and issue 21's decision sweep come first after the tests: the
# run must decide between the GEMM paths. Phases are ordered by what a cut-short run loses least; what the
# budget skips is for a second call with --only (e.g. --only qlora,sweep,sanitize,cuda-ext).
phase table 90 "$PY" benchmarks/gpu_run.py table --work "$WORK"
phase tma 150 "$PY" benchmarks/gpu_run.py tma --work "$WORK"
phase e2e 55 "$PY" benchmarks/gpu_run.py e2e --work "$WORK"
phase overhead 40 "$PY" benchmarks/gpu_run.py overhead --work "$WORK"
phase qlora 60 "$PY" benchmarks/gpu_run.py qlora --work "$WORK"  # skips its cases without bitsandbytes
phase sweep 60 "$PY" benchmarks/gpu_run.py sweep --work "$WORK"

# --- sanitize: compute-sanitizer memcheck over every kernel variant on odd shapes, time-boxed
sanitize_phase() {
  if command -v compute-sanitizer > /dev/null && [ "$DRY" = 0 ]; then
    compute-sanitizer --tool memcheck --target-processes all "$PY" benchmarks/gpu_run.py sanitize --work "$WORK"
  else
    echo "compute-sanitizer skipped ($([ "$DRY" = 1 ] && echo dry run || echo not installed)): workload only"
    "$PY" benchmarks/gpu_run.py sanitize --work "$WORK"
  fi
}
export -f sanitize_phase
phase sanitize 45 sanitize_phase

# --- cuda-ext: the cuda backend's tests, only if its build finished (never waits for it)
if [ -n "$BUILD_PID" ]; then
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    printf 'cuda-ext\tskipped: the extension build had not finished\t0\n' >> "$WORK/phases.tsv"
    kill "$BUILD_PID" 2>/dev/null
  elif wait "$BUILD_PID" && [ "$DRY" = 0 ]; then
    phase cuda-ext 60 "$PY" -m pytest tests/test_cuda_ext.py tests/test_lora_linear.py tests/test_robustness.py \
      tests/test_properties.py -k "cuda and not emulat" "${PYTEST_ARGS[@]}" --junitxml="$OUT/junit-cuda-ext.xml"
  else
    printf 'cuda-ext\tskipped: %s\t0\n' "$([ "$DRY" = 1 ] && echo 'dry run (build checked only)' || echo 'build failed, see build.log')" >> "$WORK/phases.tsv"
  fi
  pack
fi

"$PY" benchmarks/gpu_run.py summary --work "$WORK" --out "$OUT" > "$WORK/summary.log" 2>&1
SUMMARY_RC=$?
[ "$SUMMARY_RC" = 0 ] || tail -20 "$WORK/summary.log"
pack
echo "== done in $(($(date +%s) - START)) s; $OUT:"
ls -la "$OUT"
[ -f "$OUT/SUMMARY.md" ] && head -c 6000 "$OUT/SUMMARY.md"
# The run has worked when the summary exists and $OUT holds at most 8 files (what the device tool brings
# back); failing tests are results, not a failure of this script.
[ -f "$OUT/SUMMARY.md" ] && [ "$(find "$OUT" -type f | wc -l)" -le 8 ] || exit 1
# A dry run must be clean: every phase ok, no row with an error (the summary's exit status says so).
if [ "$DRY" = 1 ]; then
  if grep -Pv '\tok\t|\tskipped: dry' "$WORK/phases.tsv"; then echo "dry run: the phases above failed"; exit 1; fi
  [ "$SUMMARY_RC" = 0 ] || { echo "dry run: rows with errors (see SUMMARY.md)"; exit 1; }
fi
