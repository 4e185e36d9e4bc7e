"""The provider tables of a GPU visit: the timing table (phase ``table``), the QLoRA table (``qlora``), the
many-adapter table (``multi``) and the host time per call (``overhead``).

    python benchmarks/gpu_run.py table --work DIR      # (and qlora, overhead), as benchmarks/gpu_run.sh calls them

``table`` and ``qlora`` record one :func:`harness.measure` row per case × provider (checked against the
float64 reference before it is timed), the rows from which ``gpu_summary`` writes the routing table;
``overhead`` times a tiny eager fwd+bwd call with the host's clock. Rows go to ``DIR/<phase>.jsonl`` as they
are measured (:mod:`gpu_rows`).
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lora_kernels.dispatch import available_backends

import harness
import multi_adapter
from gpu_rows import DEVICE, DRY, emit, error_text, sync

Case = harness.Case

# ----------------------------------------------------------------------------------------------- table


def table_cases() -> list[Case]:
    """The timing table of the GPU visit (bf16 unless said): 12 LoRA cases and 2 DoRA cases."""
    if DRY:
        return [
            Case(64, 96, 80, 8, 0.0, "fp32", "fwd"),
            Case(64, 96, 80, 8, 0.1, "fp32", "fwd_bwd"),
            Case(8, 96, 80, 8, 0.0, "fp16", "fwd"),
            Case(64, 96, 80, 8, 0.0, "fp16", "fwd_bwd", adapter_dtype="fp32"),
            Case(64, 96, 80, 8, 0.0, "fp32", "fwd_bwd", dora=True),
            Case(64, 96, 80, 8, 0.1, "fp32", "fwd_bwd", dora=True),
        ]
    square = [Case(8192, 4096, 4096, 16, p, "bf16", mode) for mode in ("fwd", "fwd_bwd") for p in (0.0, 0.1)]
    # DoRA (issue 15's targets: fwd+bwd at most 1.25x our LoRA above, at least 2x faster than PEFT's DoRA)
    dora = [Case(8192, 4096, 4096, 16, p, "bf16", "fwd_bwd", dora=True) for p in (0.0, 0.1)]
    mlp = [
        Case(4096, k, n, r, 0.0, "bf16", "fwd_bwd")
        for k, n in ((4096, 11008), (11008, 4096))
        for r in (16, 64)
    ]
    return [
        *square,
        *dora,
        *mlp,
        Case(512, 4096, 4096, 16, 0.0, "bf16", "fwd_bwd"),
        Case(16, 4096, 4096, 16, 0.0, "bf16", "fwd"),
        Case(8192, 4096, 4096, 16, 0.0, "fp16", "fwd_bwd"),
        Case(8192, 4096, 4096, 16, 0.0, "bf16", "fwd_bwd", adapter_dtype="fp32"),
    ]


def table_providers(case: Case) -> list[str]:
    names = harness.providers(case.mode, DEVICE, case.dora, case.quant)
    if DRY and "triton" in available_backends(DEVICE) and case.dtype != "bf16":
        # the interpreter: runs the code (and, through the paths, the routing table's writer), measures nothing
        names += ["triton"] if case.dora else harness.path_providers(["triton"], DEVICE)
    if harness.peft_import_error():
        names.remove(harness.PEFT_DORA if case.dora else "peft")
    return names


def phase_table(work: Path) -> None:
    measure_table(work / "table.jsonl", table_cases(), table_providers)


def measure_table(out: Path, cases: list[Case], providers_of: Callable[[Case], list[str]]) -> None:
    """One :func:`harness.measure` row per case × provider, emitted as measured; a provider that cannot run
    here (a missing optional package) gets a row with its reason."""
    env = {"device": harness.device_name(DEVICE), "versions": harness.versions()}
    for case in cases:
        for order, provider in enumerate(providers_of(case)):
            row = {"provider": provider, **harness.case_fields(case), "order": order, **env}
            if reason := harness.skip_reason(case, provider):
                emit(out, {**row, "skipped": reason})
                continue
            started = time.perf_counter()
            try:
                row.update(harness.measure(provider, case, DEVICE, quick=True))
            except Exception as err:  # recorded in its row; the table goes on
                row["error"] = error_text(err)
                traceback.print_exc()
            row["wall_s"] = round(time.perf_counter() - started, 2)
            emit(out, row)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- qlora


def qlora_cases() -> list[Case]:
    """Issue 23's QLoRA cases (NF4 bases): 4096² and 4096→11008, M = 16, 512, 4096, r = 16, dropout 0 and
    0.1, fwd+bwd, and the decode forward at M = 16."""
    if DRY:
        return [Case(16, 128, 96, 8, 0.0, "fp32", "fwd_bwd", quant="nf4")]
    return harness.qlora_cases("cuda")


def qlora_providers(case: Case) -> list[str]:
    names = harness.providers(case.mode, DEVICE, case.dora, case.quant)
    if DRY and "triton" in available_backends(DEVICE):
        names += list(harness.QLORA_TRITON)  # the interpreter: runs the code, measures nothing
    return names


def phase_qlora(work: Path) -> None:
    """The QLoRA table: ``base`` (dense F.linear), ``peft_qlora``, ours on both paths. Without bitsandbytes
    (``gpu_run.sh`` installs the wheel carried in ``.whl/``) every row says so instead of a time."""
    measure_table(work / "qlora.jsonl", qlora_cases(), qlora_providers)


# ----------------------------------------------------------------------------------------------- multi


def phase_multi(work: Path) -> None:
    """Many adapters over one base (issue 33's GPU cases: 4 and 8 adapters, M = 8192 in segments, 4096²,
    bf16): the grouped op against PEFT's mixed batch, a loop of the single-adapter op and one adapter."""
    out = work / "multi.jsonl"
    env = {"device": harness.device_name(DEVICE), "versions": harness.versions()}
    cases = multi_adapter.cpu_cases(quick=True) if DRY else multi_adapter.gpu_cases()
    rows = []
    for case in cases:
        for provider in multi_adapter.PROVIDERS:
            started = time.perf_counter()
            try:
                row = multi_adapter.measure(provider, case, DEVICE, quick=True)
                row.pop("times_ms", None)
            except Exception as err:  # recorded in its row; the table goes on
                row = {"provider": provider, "label": case.label, "error": error_text(err)}
                traceback.print_exc()
            row.update(env, wall_s=round(time.perf_counter() - started, 2))
            rows.append(row)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        multi_adapter.add_ratios(rows)
        for row in rows[-len(multi_adapter.PROVIDERS) :]:
            emit(out, row)


# ----------------------------------------------------------------------------------------------- overhead


def overhead_providers() -> list[str]:
    """The baselines, ``auto``, each backend and the ``split`` and ``fused`` paths. Cut to fit the visit's
    second call: the TMA paths (``triton:tma``, ``triton:tma_ws``), whose host side is ``fused``'s and which
    no routing takes at this size."""
    ours = available_backends(DEVICE)
    paths = [p for p in harness.path_providers(ours, DEVICE) if p.split(":")[1] in ("split", "fused")]
    providers = [*harness.BASELINES, "auto", *ours, *paths]
    if DRY:  # the interpreter's time is not host overhead
        providers = [p for p in providers if not p.startswith("triton") and p != "auto"]
    if harness.peft_import_error():
        providers.remove("peft")
    return providers


def phase_overhead(work: Path) -> None:
    """Host time of one eager call (forward + backward), on a problem too small to keep the GPU busy.

    The calls are queued without synchronising; on a tiny problem the GPU finishes each kernel before the
    host has issued the next, so wall time / calls is the host's cost per call: Python, dispatch, launches.
    """
    case = Case(16, 256, 256, 8, 0.0, "bf16" if DEVICE.type == "cuda" else "fp32", "fwd_bwd")
    calls, repeats = (5, 2) if DRY else (200, 3)
    for provider in overhead_providers():
        row = {"provider": provider, **harness.case_fields(case), "calls": calls}
        try:
            step = harness.make_step(provider, case, harness.make_inputs(case, DEVICE))
            for _ in range(3 if DRY else 10):
                step()
            sync()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                sync()
                samples.append((time.perf_counter() - start) / calls * 1e6)
            row["host_us_per_call"] = round(statistics.median(samples), 1)
        except Exception as err:
            row["error"] = error_text(err)
            traceback.print_exc()
        emit(work / "overhead.jsonl", row)
