"""Fused LoRA linear against ``F.linear``, PEFT and the unfused composite: every provider × mode × case.

Run with ``pytest benchmarks/ --benchmark-only`` (timings; the GPU set on CUDA, a small fp32 set on the
CPU) or ``pytest benchmarks/ --benchmark-disable -q`` (each benchmark once: the CI check that this code
still runs). Cases, providers and memory accounting come from :mod:`lora_kernels.bench`, shared with
``python -m lora_kernels bench``.
"""

from __future__ import annotations

import time

import pytest
import torch

from lora_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: Seconds of timed calls per benchmark (after warm-up); at least MIN_ROUNDS calls.
BUDGET_S = 0.3 if DEVICE.type == "cuda" else 0.4
MIN_ROUNDS, MAX_ROUNDS = (5, 200) if DEVICE.type == "cuda" else (3, 100)

PARAMS = [
    pytest.param(case, provider, id=f"{case.label}-{provider}")
    for case in bench.default_cases(DEVICE)
    for provider in bench.providers(case.mode, DEVICE)
]


def _rounds(call) -> int:
    """Calls that fit the time budget, from one timed call after one warm-up call (so no more warm-up)."""
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-6)
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(BUDGET_S / once)))


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_lora_linear(benchmark, bench_rows, case: bench.Case, provider: str) -> None:
    if provider == "peft" and bench.peft_import_error():
        pytest.skip(bench.peft_import_error())
    inputs = bench.make_inputs(case, DEVICE)
    row = {
        "name": benchmark.name,
        "device": bench.device_name(DEVICE),
        "provider": provider,
        "order": bench.providers(case.mode, DEVICE).index(provider),
        **bench.case_fields(case),
        "versions": bench.versions(),
    }
    if case.dropout == 0.0:  # same function before timing (dropout masks differ between providers)
        row["max_rel_error"] = bench.check_provider(provider, case, inputs)
        assert row["max_rel_error"] <= bench.CHECK_TOLERANCE[case.dtype], row
    step = bench.make_step(provider, case, inputs)
    row["saved_bytes"] = (
        bench.saved_bytes(provider, case, inputs).activation_bytes if case.mode == "fwd_bwd" else None
    )
    row["peak_bytes"] = bench.peak_memory_bytes(step, DEVICE)

    call = bench.synchronized(step, DEVICE)  # the timer stops after the device has finished
    setup = (lambda: bench.flush_l2(DEVICE)) if DEVICE.type == "cuda" else None  # untimed
    benchmark.group = case.label
    benchmark.extra_info.update(row)
    if benchmark.disabled:
        benchmark.pedantic(call, setup=setup, rounds=1, iterations=1)
    else:
        benchmark.pedantic(call, setup=setup, rounds=_rounds(call), iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    benchmark.extra_info["median_ms"] = stats.median * 1e3 if stats is not None else None
    bench_rows.append(benchmark.extra_info)
    if DEVICE.type == "cuda":
        del step, call, inputs
        torch.cuda.empty_cache()
