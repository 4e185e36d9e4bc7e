"""The phases of a GPU visit, one sub-command each; ``benchmarks/gpu_run.sh`` runs them, in two calls.

    python benchmarks/gpu_run.py PHASE --work DIR      # PHASE: env, table, qlora, multi, overhead, sweep, tma, sanitize, e2e
    python benchmarks/gpu_run.py summary --work DIR --out OUT --call N
    python benchmarks/gpu_run.py tuning --from RESULTS_JSON --out FILE [--stand-in provider=path,...]

Each phase is a function of its own module, which this command line only calls:

| phase | module | what |
|---|---|---|
| env | gpu_checks | the device, its properties, the versions |
| table, qlora, multi, overhead | gpu_tables | the timing table, the QLoRA table, many adapters, host time per call |
| sweep | tile_sweep | tile configs of the Triton kernels |
| tma | tma_sweep | issue 21's GEMM paths, forward and dX |
| sanitize, e2e | gpu_checks | the compute-sanitizer workload, a training step |
| summary, tuning | gpu_summary | a call's SUMMARY and results, the routing table |

They share :mod:`gpu_rows` (rows, the dry-run switch, the device) and :mod:`harness` (cases, providers, the
timing loop); none of them imports this file, nor a sibling phase. With ``LORA_GPU_RUN_DRY=1``
(``gpu_run.sh --dry``) every phase runs on the CPU in seconds: tiny shapes, the Triton kernels through the
interpreter, so that this code cannot rot before a GPU is at hand. Dry numbers are no measurement of
anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_kernels.quant4bit import quiet_bitsandbytes_cpu_notice

import gpu_checks
import gpu_summary
import gpu_tables
import tile_sweep
import tma_sweep
from gpu_rows import DRY

PHASES = {
    "env": gpu_checks.phase_env,
    "table": gpu_tables.phase_table,
    "qlora": gpu_tables.phase_qlora,
    "multi": gpu_tables.phase_multi,
    "overhead": gpu_tables.phase_overhead,
    "sweep": tile_sweep.phase_sweep,
    "tma": tma_sweep.phase_tma,
    "sanitize": gpu_checks.phase_sanitize,
    "e2e": gpu_checks.phase_e2e,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=[*PHASES, "summary", "tuning"])
    parser.add_argument(
        "--work", type=Path, help="folder of the raw per-phase files (every phase but tuning)"
    )
    parser.add_argument(
        "--out", type=Path, help="where summary writes SUMMARY and the results; tuning: the file"
    )
    parser.add_argument("--call", type=int, choices=(1, 2), help="summary: which call of the visit")
    parser.add_argument("--from", dest="results", type=Path, help="tuning: the results.json to read")
    parser.add_argument(
        "--stand-in", help="tuning: provider=path,... (a run that measured backends, not paths)"
    )
    parser.add_argument("--note", help="tuning: a note written into the table")
    args = parser.parse_args(argv)
    quiet_bitsandbytes_cpu_notice()
    if args.phase == "tuning":
        if not (args.results and args.out):
            parser.error("tuning needs --from RESULTS_JSON and --out FILE")
        return gpu_summary.tuning_from_results(args.results, args.out, args.stand_in, args.note)
    if args.work is None:
        parser.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "summary":
        out = args.out or args.work
        out.mkdir(parents=True, exist_ok=True)
        errors = gpu_summary.phase_summary(args.work, out, args.call)
        return 1 if errors and DRY else 0  # on the GPU, errors are results; in a dry run, rot
    PHASES[args.phase](args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
