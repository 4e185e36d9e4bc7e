"""The sweep that decides issue 21: every candidate GEMM path for the forward and for dX, timed per case.

    python benchmarks/tma_sweep.py --work DIR                    # all candidates, one child process each
    python benchmarks/tma_sweep.py --work DIR --candidate tma_ws # one candidate, in this process

Cases: bf16, r = 16, no dropout, M ∈ {16, 512, 4096, 8192} for 4096→4096 and 4096→11008, forward (``y`` and
``t``) and dX (the backward with only x's gradient: ``s·dY·B`` and ``dX``). Candidates: ``F.linear`` (the
base GEMM alone, the baseline of the ratios), ``fused`` (triton_lora's kernel, today's), the TMA persistent
variants of :mod:`lora_kernels.ops.triton_tma` and ``split`` (``triton_lora.split_forward`` /
``split_backward`` where the branch that adds them is merged; recorded as skipped otherwise). Each
candidate is checked against the float64 reference before it is timed; a mismatch, a compile failure or an
exception is recorded in its row and the next case goes on. Each candidate runs in a child process of its
own (on the GPU), so a fault, which poisons the CUDA context, loses that candidate only.

Rows go to ``DIR/tma.jsonl`` as they are measured; :func:`decision_table` turns them into ``{case key:
{candidate: ms}}`` (the key of :func:`lora_kernels.ops.routing.case_key` where it exists, mode ``fwd`` or
``dx``), written to ``DIR/tma_table.json`` for the routing-table writer. With ``LORA_GPU_RUN_DRY=1`` the
cases are tiny, fp32, on the CPU through the interpreter: the machinery is checked, nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and gpu_run, beside this file
from gpu_run import _emit, _read

import harness

DRY = os.environ.get("LORA_GPU_RUN_DRY") == "1"
DEVICE = torch.device("cpu" if DRY else "cuda")
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
        shapes, ms, r, dtype = [(4096, 4096), (4096, 11008)], [16, 512, 4096, 8192], 16, torch.bfloat16
    return [
        dict(direction=direction, M=M, K=K, N=N, r=r, dtype=dtype)
        for direction in ("fwd", "dx")
        for K, N in shapes
        for M in ms
    ]


def case_key(case: dict) -> str:
    dtype = _DTYPE_NAMES[case["dtype"]]
    args = (case["direction"], dtype, dtype, False, case["M"], case["N"], case["K"], case["r"])
    try:  # the routing table's key, where the routing module exists
        from lora_kernels.ops.routing import case_key as routing_key

        return routing_key(*args)
    except ImportError:
        return f"{args[0]}|{dtype}|{dtype}|p0|M{case['M']}|N{case['N']}|K{case['K']}|r{case['r']}"


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
    from lora_kernels.ops import triton_lora, triton_tma

    if name == "fused":
        return triton_lora.lora_forward, triton_lora.lora_backward
    if name in triton_tma.VARIANTS:
        if not triton_tma.tma_available(DEVICE):
            return "TMA not available on this device / triton (needs sm_90+, or the 3.8 interpreter)"
        return triton_tma.PATH_FUNCTIONS[name]
    if name == "split":
        if not hasattr(triton_lora, "split_forward"):
            return "triton_lora.split_forward is not in this checkout (issue 16's split path)"
        return triton_lora.split_forward, triton_lora.split_backward
    raise ValueError(name)


def _step(name: str, case: dict, tensors) -> tuple[Callable[[], object], Callable[[], tuple]] | str:
    """``(step, outputs)``: the timed call and the one whose outputs are checked; or a skip reason."""
    from lora_kernels.ops import LoRAParams

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
        except Exception as err:  # a miss, a compile failure, a fault: recorded, the sweep goes on
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            traceback.print_exc()
        row["wall_s"] = round(time.perf_counter() - started, 2)
        _emit(out, row)


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
    table = decision_table(_read(work / "tma.jsonl"))
    (work / "tma_table.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def run_all(work: Path, timeout_s: int = 120) -> int:
    """Each candidate in a child process (a fault loses that candidate only); returns the rows with an
    error. Writes ``tma.jsonl`` and ``tma_table.json`` in ``work``."""
    out = work / "tma.jsonl"
    for name in CANDIDATES:
        if DRY:  # the CPU: in this process (a child's imports cost more than its cases)
            run_candidate(name, out)
            _write_table(work)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--candidate", name]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, text=True, capture_output=True)
            status = f"exit {proc.returncode}"
            sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s} s"
        done = {r["case"] for r in _read(out) if r["candidate"] == name}
        if status != "exit 0":  # the cases the child did not reach, so the table says why they are missing
            for case in cases():
                if case_key(case) not in done:
                    _emit(
                        out, {"case": case_key(case), "candidate": name, "error": f"child process: {status}"}
                    )
        print(f"== {name}: {status}, {time.perf_counter() - started:.1f} s", flush=True)
        _write_table(work)  # after every candidate: a run cut short keeps what it measured
    table = _write_table(work)
    for key, (best, ratio) in sorted(winners(table).items()):
        print(f"{key}: {best} ({ratio:.3f}x {BASELINE})")
    return sum(1 for r in _read(out) if r.get("error"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--candidate", choices=CANDIDATES, help="run one candidate in this process")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per candidate's child process")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.candidate:
        run_candidate(args.candidate, args.work / "tma.jsonl")
        return 0
    return 1 if run_all(args.work, args.timeout) and DRY else 0


if __name__ == "__main__":
    sys.exit(main())
