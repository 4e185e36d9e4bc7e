"""The sweep that decides issue 21 (phase ``tma`` of a GPU visit): every candidate GEMM path for the forward
and for dX, timed per case.

    python benchmarks/tma_sweep.py --work DIR                          # all candidates, in a child process
    python benchmarks/tma_sweep.py --work DIR --candidates tma,tma_ws  # these, in this process

Cases: bf16, r = 16, no dropout, M ∈ {16, 512, 8192} for 4096→4096 and 4096→11008, forward (``y`` and ``t``)
and dX (the backward with only x's gradient: ``s·dY·B`` and ``dX``). Candidates: ``F.linear`` (the base GEMM
alone, the baseline of the ratios), ``fused`` and ``split`` (the Triton backend's paths of those names, as
:func:`lora_kernels.ops.routing.path_functions` gives them) and the TMA persistent variants of
:mod:`lora_kernels.ops.triton_tma`. Each candidate is checked against the float64 reference before it is
timed; a mismatch, a compile failure or an exception is recorded in its row and the next case goes on.

On the GPU the candidates run in a child process, one after the other: a fault, which poisons the CUDA
context, ends the child; the candidate it was running gets an error row for each case it did not reach and
a new child goes on with the candidates after it, so a fault loses that candidate only. (Until the visit
had to fit two calls, each candidate had a child of its own, 7 process starts; and M = 4096 was a case too.)

Rows go to ``DIR/tma.jsonl`` as they are measured (:mod:`gpu_rows`); :func:`decision_table` turns them into
``{case key: {candidate: ms}}`` (the key of :func:`lora_kernels.ops.routing.case_key`, mode ``fwd`` or
``dx``), written to ``DIR/tma_table.json``. With ``LORA_GPU_RUN_DRY=1`` the cases are tiny, fp32, on the CPU
through the interpreter, in this process: the machinery is checked, nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.ops import LoRAParams, routing

import harness
from gpu_rows import DEVICE, DRY, emit, error_text, read

BASELINE = "F.linear"
#: In the order they run: the baseline and today's kernel first (every ratio needs them), then the
#: candidates most likely to decide, so that a phase cut short by the run's budget loses the least.
CANDIDATES = (BASELINE, "fused", "tma", "tma_ws", "split", "tma_t_fused", "tma_ws_t_fused")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cases() -> list[dict]:
    """The sweep's cases: direction, M, K (in), N (out), r, dtype."""
    if DRY:
        shapes, ms, r, dtype = [(64, 48)], [40], 8, torch.float32  # 6 tiles on 3 persistent programs
    else:
        shapes, ms, r, dtype = [(4096, 4096), (4096, 11008)], [16, 512, 8192], 16, torch.bfloat16
    return [
        dict(direction=direction, M=M, K=K, N=N, r=r, dtype=dtype)
        for direction in ("fwd", "dx")
        for K, N in shapes
        for M in ms
    ]


def case_key(case: dict) -> str:
    dtype = _DTYPE_NAMES[case["dtype"]]
    return routing.case_key(
        case["direction"], dtype, dtype, False, case["M"], case["N"], case["K"], case["r"]
    )


def _problem(case: dict):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * std).to(case["dtype"])

    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    x, w, b = rand(M, K), rand(N, K, std=K**-0.5), rand(N)
    A, B = rand(r, K, std=K**-0.5), rand(N, r, std=0.5)
    return x, w, b, A, B, rand(M, N)


def _paths(name: str) -> tuple[Callable, Callable] | str:
    """``(forward, backward)`` of a LoRA candidate (backend interface), or why it is not here."""
    from lora_kernels.ops import triton_tma

    if name in triton_tma.VARIANTS:
        if not triton_tma.tma_available(DEVICE):
            return "TMA not available on this device / triton (needs sm_90+, or the 3.8 interpreter)"
        return triton_tma.PATH_FUNCTIONS[name]
    try:
        return routing.path_functions("triton", name)
    except RuntimeError as err:
        return str(err)


def _step(name: str, case: dict, tensors) -> tuple[Callable[[], object], Callable[[], tuple]] | str:
    """``(step, outputs)``: the timed call and the one whose outputs are checked; or a skip reason."""
    x, w, b, A, B, grad_y = tensors
    params = LoRAParams(2.0, 0.0, 0)
    if name == BASELINE:
        base = (lambda: F.linear(x, w, b)) if case["direction"] == "fwd" else (lambda: torch.mm(grad_y, w))
        return base, lambda: ()
    found = _paths(name)
    if isinstance(found, str):
        return found
    forward, backward = found
    if case["direction"] == "fwd":
        return (lambda: forward(x, w, b, A, B, params)), (lambda: forward(x, w, b, A, B, params))
    t = x.float() @ A.float().t()
    needs = (True, False, False, False, False)

    def dx():
        return backward(grad_y, x, w, A, B, t, params, needs)[:1]

    return dx, dx


def _check(case: dict, tensors, outputs: tuple) -> float:
    """The largest relative error of ``outputs`` (``(y, t)`` or ``(dX,)``) against float64; raises on a miss."""
    from lora_kernels.reference import lora_linear_reference
    from lora_kernels.testing import assert_close, relative_error

    x, w, b, A, B, grad_y = tensors
    if case["direction"] == "fwd":
        expected = (lora_linear_reference(x, w, b, A, B, 2.0, upcast=True), x.double() @ A.double().t())
    else:
        g = grad_y.double()
        expected = (g @ w.double() + (2.0 * g @ B.double()) @ A.double(),)
    errors = []
    for name, got, want in zip(("out", "t"), outputs, expected, strict=False):
        assert_close(got, want, case["dtype"], name, slack=2.0)
        errors.append(relative_error(got, want))
    return max(errors)


def run_candidate(name: str, out: Path) -> None:
    """Every case of candidate ``name``, one row each, appended to ``out``."""
    for case in cases():
        row = {"case": case_key(case), "candidate": name, "direction": case["direction"], "M": case["M"],
               "K": case["K"], "N": case["N"]}  # fmt: skip
        started = time.perf_counter()
        try:
            tensors = _problem(case)
            step = _step(name, case, tensors)
            if isinstance(step, str):
                row["skipped"] = step
            else:
                timed, checked = step
                outputs = checked()
                if outputs:
                    row["max_rel_error"] = float(f"{_check(case, tensors, outputs):.3g}")
                row["ms"] = round(harness.median_ms(timed, DEVICE, quick=True), 4)
        except Exception as err:  # a miss, a compile failure: recorded, the sweep goes on
            row["error"] = error_text(err)
            traceback.print_exc()
        row["wall_s"] = round(time.perf_counter() - started, 2)
        emit(out, row)


def decision_table(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{case key: {candidate: ms}}`` of the rows that were checked and timed, baseline included."""
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        if "ms" in row:
            table.setdefault(row["case"], {})[row["candidate"]] = row["ms"]
    return table


def winners(table: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """Per case, the fastest LoRA candidate and its ratio to the baseline GEMM (``nan`` without one)."""
    result = {}
    for key, times in table.items():
        lora = {k: v for k, v in times.items() if k != BASELINE}
        if lora:
            best = min(lora, key=lora.get)
            result[key] = (best, lora[best] / times[BASELINE] if BASELINE in times else float("nan"))
    return result


def _write_table(work: Path) -> dict[str, dict[str, float]]:
    table = decision_table(read(work / "tma.jsonl"))
    (work / "tma_table.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def _unfinished(names: list[str], out: Path) -> list[str]:
    """The candidates of ``names`` from the first one that lacks a row for some case on."""
    keys = {case_key(case) for case in cases()}
    done: dict[str, set[str]] = {}
    for row in read(out):
        done.setdefault(row.get("candidate"), set()).add(row.get("case"))
    for i, name in enumerate(names):
        if not keys <= done.get(name, set()):
            return names[i:]
    return []


def run_all(work: Path, timeout_s: int = 90) -> int:
    """Every candidate, in a child process that a new one replaces after a fault (the faulting candidate's
    missing cases get an error row); returns the rows with an error. Writes ``tma.jsonl`` and
    ``tma_table.json`` in ``work``."""
    out = work / "tma.jsonl"
    todo = list(CANDIDATES)
    if DRY:  # the CPU: in this process (a child's imports cost more than its cases)
        for name in todo:
            run_candidate(name, out)
        todo = []
    started = time.perf_counter()
    while todo:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--work",
            str(work),
            "--candidates",
            ",".join(todo),
        ]
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, text=True, capture_output=True)
            status = f"exit {proc.returncode}"
            sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s} s"
        left = _unfinished(todo, out)
        print(f"== child for {','.join(todo)}: {status}, {time.perf_counter() - started:.1f} s", flush=True)
        if not left:
            break
        # the candidate the child was running when it ended: the cases it did not reach get a row saying why
        done = {r.get("case") for r in read(out) if r.get("candidate") == left[0]}
        for case in cases():
            if case_key(case) not in done:
                emit(out, {"case": case_key(case), "candidate": left[0], "error": f"child process: {status}"})
        todo = [] if "timed out" in status else left[1:]  # after a timeout the phase's time is spent
        _write_table(work)  # a run cut short keeps what it measured
    table = _write_table(work)
    for key, (best, ratio) in sorted(winners(table).items()):
        print(f"{key}: {best} ({ratio:.3f}x {BASELINE})")
    return sum(1 for r in read(out) if r.get("error"))


def phase_tma(work: Path) -> None:
    """The phase ``tma`` of ``benchmarks/gpu_run.sh``: :func:`run_all`."""
    run_all(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--candidates", help=f"comma-separated, of {','.join(CANDIDATES)}: run these in this process"
    )
    parser.add_argument("--timeout", type=int, default=90, help="seconds for a child process")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.candidates:
        names = [n.strip() for n in args.candidates.split(",") if n.strip()]
        if unknown := sorted(set(names) - set(CANDIDATES)):
            parser.error(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
        for name in names:
            run_candidate(name, args.work / "tma.jsonl")
        return 0
    return 1 if run_all(args.work, args.timeout) and DRY else 0


if __name__ == "__main__":
    sys.exit(main())
