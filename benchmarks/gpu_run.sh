#!/usr/bin/env bash
# A GPU visit in two calls of the device tool (the two `run` calls: benchmarks/README.md), each a list of
# phases with time limits inside the call's budget:
#
#   bash benchmarks/gpu_run.sh --call 1   # at most 480 s: the tests marked cuda, table, tma, e2e, qlora, multi
#   bash benchmarks/gpu_run.sh --call 2   # at most 210 s, right after, on the same warm machine: sweep,
#                                         # overhead, sanitize, cuda-ext, the other tests
#   bash benchmarks/gpu_run.sh --plan     # the plan: each phase's limit and estimate, whether it fits 900 s
#   bash benchmarks/gpu_run.sh --dry      # here, on the CPU: the plan, then both calls' phases in seconds (CI)
#   bash benchmarks/gpu_run.sh --call 2 --only sweep,tests   # some phases of a call (a confirming re-run)
#
# Phases: wheels (the wheels carried in .whl/, `bash benchmarks/fetch_wheels.sh`, installed into /tmp/site),
# env (nvidia-smi, versions, measured ceilings and floors), build (lora_kernels._C for sm_90 in the
# background, into build/gpu_ext, which stays on the warm machine for call 2: there it is reused, or built
# again on a fresh machine), tests-gpu (`-m cuda`), table (the timing table, from which the routing table is
# written), tma (issue 21's GEMM paths), e2e (a Llama-style training step), qlora (NF4 bases), multi (many
# adapters over one base), sweep (tile
# configs), overhead (host time per call), sanitize (compute-sanitizer memcheck), cuda-ext
# (tests/test_cuda_ext.py, once the build is there), tests (`-m "not cuda"`, the files where the GPU changes
# the result), then the summary. Each phase is a function of benchmarks/ that `gpu_run.py PHASE` calls.
# Nothing is installed but the wheels: the package is imported from this checkout through PYTHONPATH.
# Results go to $OUT, at most 8 files a call, named by call so that both calls' files can be committed side
# by side under benchmarks/results/<device>/: SUMMARY-callN.md, results-callN.json, junit-<phase>-callN.xml,
# raw-logs-callN.tar.gz, and from call 1 tuning-<device>.json (the routing table, under the name routing
# looks up for this GPU, to commit as lora_kernels/tuning/<device>.json); refreshed after every phase, so a
# phase that dies loses nothing that came before it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ------------------------------------------------------------------------------------------------ the plan
# Device time: 900 s a session, the machine's start (1-2 min) and idle time included, at most 600 s a
# command. 900 - 120 (start) - 60 (one spare minute) = 720 s for both calls: 480 + 210, and 30 s for the
# transfers and the step between the calls.
DEVICE_S=900 START_S=120 SPARE_S=60
CALL_BUDGET_S=(0 480 210)
# call, phase, limit (s), estimated GPU seconds, where the estimate comes from ("bg": in the background,
# beside the phases that follow, so not counted in the call's total). The estimates are read off the first
# GPU run (H200, benchmarks/results/h200/: raw/phases.tsv, the rows' wall_s in raw/*.jsonl, the logs) and
# scaled by today's counts of cases and tests; an H100 is taken to be as fast (these phases wait mostly on
# the host and on Triton's compiles). To fit call 2 (and said where each is): the tma phase's cases 16 -> 12
# and its child processes 7 -> 1 (benchmarks/tma_sweep.py), the sweep's rows 40 -> 26
# (tile_sweep.sweep_plan), sanitize's rows 24 -> 12 (gpu_checks.sanitize_cases), the TMA paths out of
# overhead (gpu_tables.overhead_providers). A phase's limit is cut to what is left of the call's budget.
PLAN='
1 wheels      15    5  pip install of the 43 MB bitsandbytes wheel (1.6 s on the CPU machine)
1 env         45   30  H200: 28 s (nvidia-smi, three Python starts, the matmul and copy of tools/floors.py)
1 build      300   40  bg H200: 37 s (build.log), beside tests-gpu
1 tests-gpu   90   45  93 tests; H200: 441 tests in 120 s on 8 workers (3.7/s) -> 25 s, + 12 s start, + bf16/TMA compiles
1 table       90   60  146 rows (12 LoRA cases x 11 providers, 2 DoRA x 7); H200: 72 rows in 26 s (0.36 s a row), + TMA compiles
1 tma        100   60  7 candidates x 12 cases in one child; 0.2 s a case, ~24 compiles of 1.5 s, 6 s start (no H200 figure)
1 e2e         60   40  6 rows; H200: 4 rows in 26 s
1 qlora       60   40  70 rows (14 cases x 5 providers) at 0.36 s, + the bitsandbytes import and NF4 compiles
1 multi       60   35  predicted, never run on a GPU: 24 rows (4 cases x 6 providers) at 0.36 s a row as the H200 table -> 9 s, + ~10 compiles (6 grouped kernels, the single op at M = 1024/2048) of 1.5 s -> 15 s, + 8 s start and peft import
1 summary     20   10  the summary and the packing of the raw logs
2 wheels      15    5  as in call 1
2 build      120    5  bg reused from call 1 (its fingerprint); built again (40 s) only on a fresh machine
2 sweep       35   25  26 rows; H200: 38 rows in 32 s (0.68 s a row + 6 s start)
2 overhead    30   20  9 providers x 610 calls; H200: 3 providers in 15 s, then cut at the first Triton compile
2 sanitize    35   25  12 rows under memcheck; H200: 16 rows in 28 s
2 cuda-ext    40   25  230 tests of tests/test_cuda_ext.py; H200: about 310 cuda-backend tests in 30 s
2 tests      130   95  817 tests on 16 workers; H200: 3.7/s on 8 over the whole suite, taken as 10/s for these small parity tests -> 82 s, + 12 s start
2 summary     10    5  the summary and the packing of the raw logs
'

plan_field() { awk -v c="$1" -v n="$2" -v f="$3" '$1 == c && $2 == n { print $f; exit }' <<< "$PLAN"; }

# The plan as a table per call, the totals, and whether the visit fits the device time; exit 1 if not.
print_plan() {
  awk -v b1="${CALL_BUDGET_S[1]}" -v b2="${CALL_BUDGET_S[2]}" -v dev="$DEVICE_S" -v start="$START_S" \
    -v spare="$SPARE_S" '
    NF >= 4 {
      bg = ($5 == "bg")
      rows[$1] = rows[$1] sprintf("  %-10s %8d %11d%s\n", $2, $3, $4, bg ? "   (background: not counted)" : "")
      if (!bg) total[$1] += $4
    }
    END {
      budget[1] = b1; budget[2] = b2; ok = 1
      print "## Plan: a GPU visit in two calls, " dev " s of device time in all"
      for (c = 1; c <= 2; c++) {
        fits = total[c] <= budget[c]
        if (!fits) ok = 0
        printf "call %d (budget %d s)\n  %-10s %8s %11s\n%s", c, budget[c], "phase", "limit s", "estimate s", rows[c]
        printf "  %-10s %8s %11d   %s %d s: %s\n", "total", "", total[c], fits ? "<=" : ">", budget[c], \
          fits ? "fits" : "DOES NOT FIT"
      }
      used = start + b1 + b2 + spare
      if (used > dev) ok = 0
      printf "machine start %d s + call 1 %d s + call 2 %d s + spare %d s = %d s %s %d s: %s\n", start, b1, b2, \
        spare, used, used <= dev ? "<=" : ">", dev, used <= dev ? "fits" : "DOES NOT FIT"
      print ok ? "the plan fits" : "the plan DOES NOT FIT"
      exit !ok
    }' <<< "$PLAN"
}

# ------------------------------------------------------------------------------------------------ arguments
usage() {
  echo "usage: bash benchmarks/gpu_run.sh (--call 1|2 | --dry [--call 1|2] | --plan) [--only phase,phase]" >&2
  exit 2
}
DRY=0 CALL="" ONLY="" ONLY_ARG="" INNER=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --call) [ $# -ge 2 ] && [[ "$2" =~ ^[12]$ ]] || usage; CALL=$2; shift ;;
    --only) [ $# -ge 2 ] || usage; ONLY=",$2,"; ONLY_ARG=$2; shift ;;
    --plan) print_plan; exit ;;
    --inner) INNER=1 ;;  # a dry run of the whole visit runs each call so: no plan, --only not checked
    *) usage ;;
  esac
  shift
done
[ -n "$CALL" ] || [ "$DRY" = 1 ] || usage
if [ "$INNER" = 0 ]; then
  for name in ${ONLY_ARG//,/ }; do
    if [ -z "$(plan_field "${CALL:-1}" "$name" 2)$([ -z "$CALL" ] && plan_field 2 "$name" 2)" ]; then
      echo "--only: $name is no phase of call ${CALL:-1 or 2} (see --plan)" >&2
      exit 2
    fi
  done
  print_plan
  echo
fi
OUT=${OUT:-$ROOT/build/gpu_run}

if [ -z "$CALL" ]; then  # a dry run of the whole visit: each call in turn, one SUMMARY.md for both
  rc=0
  for call in 1 2; do
    OUT=$OUT bash "$ROOT/benchmarks/gpu_run.sh" --dry --call "$call" --inner ${ONLY_ARG:+--only "$ONLY_ARG"} || rc=1
  done
  cat "$OUT"/SUMMARY-call1.md "$OUT"/SUMMARY-call2.md > "$OUT/SUMMARY.md" 2>/dev/null
  exit $rc
fi

# ------------------------------------------------------------------------------------------------ one call
SFX=-call$CALL
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run$SFX.XXXXXX")
mkdir -p "$OUT"
rm -f "$OUT"/*"$SFX".*
[ "$CALL" = 1 ] && rm -f "$OUT"/tuning-*.json
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BUDGET_S=${GPU_RUN_BUDGET_S:-${CALL_BUDGET_S[$CALL]}}
SCALE=1
if [ "$DRY" = 1 ]; then
  export LORA_GPU_RUN_DRY=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  SCALE=3  # the CPU's seconds are not the GPU's: limits and budget three times the plan's
  BUDGET_S=$((BUDGET_S * SCALE))
fi
START=$(date +%s)
echo "== call $CALL: budget ${BUDGET_S}s, results in $OUT"

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
pack() { tar -czf "$OUT/raw-logs$SFX.tar.gz" --exclude=./site -C "$WORK" . 2>/dev/null; }
limit_of() { echo $(($(plan_field "$CALL" "$1" 3) * SCALE)); }
# record NAME STATUS SECONDS LIMIT: a line of $WORK/phases.tsv (the summary's table of phases)
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(plan_field "$CALL" "$1" 4)" >> "$WORK/phases.tsv"; }

# phase NAME COMMAND...: run with the plan's limit (no longer than the budget left, the summary's share kept
# back), log to $WORK/NAME.log, record status and seconds, pack the raw logs.
phase() {
  local name=$1
  shift
  wanted "$name" || return 0
  local limit left
  limit=$(limit_of "$name")
  left=$((BUDGET_S - ($(date +%s) - START) - $(limit_of summary)))
  if [ "$left" -lt 10 ]; then
    record "$name" "skipped: budget spent" 0 "$limit"
    echo "== $name: skipped, budget spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, estimate $(plan_field "$CALL" "$name" 4)s)"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="exit $rc" ;;
  esac
  record "$name" "$status" "$(($(date +%s) - t0))" "$limit"
  echo "   $status, $(($(date +%s) - t0)) s; last lines:"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
  pack
}

# --- wheels: what .whl/ carries (bitsandbytes), into a folder of its own on PYTHONPATH; every call, whatever
# --only says. A dry run installs into $WORK, so that nothing outside it changes.
SITE=/tmp/site
[ "$DRY" = 1 ] && SITE=$WORK/site
if compgen -G ".whl/*.whl" > /dev/null; then
  t0=$(date +%s)
  if timeout -k 5 "$(limit_of wheels)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" .whl/*.whl > "$WORK/wheels.log" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:$SITE
    status=ok
  else
    status="exit $? (see wheels.log)"
  fi
  ls .whl >> "$WORK/wheels.log"
  record wheels "$status" "$(($(date +%s) - t0))" "$(limit_of wheels)"
  echo "== wheels: $status: $(ls .whl | tr '\n' ' ')"
else
  record wheels "skipped: $([ "$DRY" = 1 ] && echo 'dry run, ')no .whl/ (bash benchmarks/fetch_wheels.sh)" 0 0
  echo "== wheels: none (.whl/ is empty or missing: bash benchmarks/fetch_wheels.sh)"
fi

# --- build: lora_kernels._C for this GPU, in the background; reused where call 1 built it
BUILD_PID=""
if wanted build || { [ "$CALL" = 2 ] && wanted cuda-ext; }; then
  echo "== build (background)"
  BUILD_T0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/gpu_build_ext.py --reuse --dry > "$WORK/build.log" 2>&1 &
  else
    timeout -k 10 "$(limit_of build)" "$PY" benchmarks/gpu_build_ext.py --reuse > "$WORK/build.log" 2>&1 &
  fi
  BUILD_PID=$!
fi
BUILD_OK=0
# finish_build SECONDS: wait for the build at most that long; record how it ended (BUILD_OK=1 if it worked).
finish_build() {
  [ -n "$BUILD_PID" ] || return 0
  local waited=0 status
  while kill -0 "$BUILD_PID" 2> /dev/null && [ "$waited" -lt "$1" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$BUILD_PID" 2> /dev/null; then
    kill "$BUILD_PID" 2> /dev/null
    status="not finished: stopped"
  else
    wait "$BUILD_PID"
    case $? in
      0) status=ok BUILD_OK=1 ;;
      124 | 137) status="timed out after $(limit_of build)s" ;;
      *) status="failed, see build.log" ;;
    esac
    grep -q '^reused' "$WORK/build.log" && status="$status (reused)"
  fi
  # its own seconds: until it last wrote its log
  record build "$status" "$(($(stat -c %Y "$WORK/build.log") - BUILD_T0))" "$(limit_of build)"
  echo "== build: $status"
  BUILD_PID=""
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
# --- sanitize: compute-sanitizer memcheck over every kernel variant on odd shapes
sanitize_phase() {
  if command -v compute-sanitizer > /dev/null && [ "$DRY" = 0 ]; then
    compute-sanitizer --tool memcheck --target-processes all "$PY" benchmarks/gpu_run.py sanitize --work "$WORK"
  else
    echo "compute-sanitizer skipped ($([ "$DRY" = 1 ] && echo dry run || echo not installed)): workload only"
    "$PY" benchmarks/gpu_run.py sanitize --work "$WORK"
  fi
}
export -f env_phase sanitize_phase
export PY WORK DRY

# pytest_args WORKERS [collect]: -v (one line a test, so a cut-off run still tells), xdist and a per-test
# timeout where installed (no workers in a dry run); with "collect", a dry run only collects: the selection
# is checked, the Triton interpreter would take minutes.
pytest_args() {
  local args=(-p no:cacheprovider -v -rfE)
  if [ "$DRY" = 1 ]; then
    [ "${2:-}" = collect ] && args+=(--collect-only)
  elif "$PY" -c "import xdist" 2> /dev/null; then
    args+=(-n "$1")
  fi
  "$PY" -c "import pytest_timeout" 2> /dev/null && args+=(--timeout 120)
  printf '%s\n' "${args[@]}"
}

if [ "$CALL" = 1 ]; then
  phase env env_phase
  # What only a GPU can decide. First the tests marked cuda (bf16 kernels, direct launches against
  # kernel[grid] bit for bit, CUDA graphs, the TMA kernels on Hopper), then the measurements the routing and
  # issues 15, 21, 23 wait for. CPU-only suites left out: the kernels' compile checks, gloo distributed, the
  # cuda backend's tests (call 2, after its build). A dry run runs the cuda tests (they skip).
  mapfile -t ARGS < <(pytest_args 8)
  phase tests-gpu "$PY" -m pytest tests/ --ignore=tests/test_triton_compile.py --ignore=tests/test_distributed.py \
    --ignore=tests/test_cuda_ext.py -m cuda "${ARGS[@]}" --junitxml="$OUT/junit-tests-gpu$SFX.xml"
  phase table "$PY" benchmarks/gpu_run.py table --work "$WORK"
  phase tma "$PY" benchmarks/gpu_run.py tma --work "$WORK"
  phase e2e "$PY" benchmarks/gpu_run.py e2e --work "$WORK"
  phase qlora "$PY" benchmarks/gpu_run.py qlora --work "$WORK"  # its rows say why, without bitsandbytes
  phase multi "$PY" benchmarks/gpu_run.py multi --work "$WORK"  # many adapters over one base (issue 33)
  finish_build $((BUDGET_S - ($(date +%s) - START) - $(limit_of summary)))  # long done, normally
else
  # The rest: timings first, while nothing else runs (the build, when reused, is done in a second), then
  # the checks, then the tests where the GPU changes the result, last (a cut-off run's -v log still tells).
  phase sweep "$PY" benchmarks/gpu_run.py sweep --work "$WORK"
  phase overhead "$PY" benchmarks/gpu_run.py overhead --work "$WORK"
  phase sanitize sanitize_phase
  if wanted cuda-ext; then
    finish_build 30
    if [ "$BUILD_OK" = 1 ]; then
      mapfile -t ARGS < <(pytest_args 8 collect)
      phase cuda-ext "$PY" -m pytest tests/test_cuda_ext.py "${ARGS[@]}" --junitxml="$OUT/junit-cuda-ext$SFX.xml"
    else
      record cuda-ext "skipped: no extension (see build.log)" 0 "$(limit_of cuda-ext)"
    fi
  fi
  # the files where the GPU changes the result: parity, robustness, properties, DoRA, the Triton kernels'
  # (not their compile check for sm_80/sm_90, the same on any machine)
  TEST_FILES=(tests/test_lora_linear.py tests/test_robustness.py tests/test_properties.py tests/test_dora.py)
  for file in tests/test_triton_*.py; do [ "$file" = tests/test_triton_compile.py ] || TEST_FILES+=("$file"); done
  mapfile -t ARGS < <(pytest_args 16 collect)
  phase tests "$PY" -m pytest "${TEST_FILES[@]}" -m "not cuda" "${ARGS[@]}" --junitxml="$OUT/junit-tests$SFX.xml"
  finish_build 0
fi

"$PY" benchmarks/gpu_run.py summary --work "$WORK" --out "$OUT" --call "$CALL" > "$WORK/summary.log" 2>&1
SUMMARY_RC=$?
[ "$SUMMARY_RC" = 0 ] || tail -20 "$WORK/summary.log"
rm -rf "$WORK/site"
pack
mapfile -t FILES < <(find "$OUT" -maxdepth 1 -type f \( -name "*$SFX.*" -o -name "tuning-*.json" \) | sort)
[ "$CALL" = 2 ] && mapfile -t FILES < <(printf '%s\n' "${FILES[@]}" | grep -- "$SFX\.")
echo "== call $CALL done in $(($(date +%s) - START)) s; its ${#FILES[@]} files in $OUT:"
ls -la "${FILES[@]}"
[ -f "$OUT/SUMMARY$SFX.md" ] && head -c 6000 "$OUT/SUMMARY$SFX.md"
# The call has worked when its summary exists and it wrote at most 8 files (what the device tool brings
# back); failing tests are results, not a failure of this script.
[ -f "$OUT/SUMMARY$SFX.md" ] && [ "${#FILES[@]}" -le 8 ] || exit 1
# A dry run must be clean: every phase ok, no row with an error (the summary's exit status says so).
if [ "$DRY" = 1 ]; then
  if grep -Pv '\tok( \(reused\))?\t|\tskipped: dry' "$WORK/phases.tsv"; then
    echo "dry run: the phases above failed"
    exit 1
  fi
  [ "$SUMMARY_RC" = 0 ] || { echo "dry run: rows with errors (see SUMMARY$SFX.md)"; exit 1; }
fi
