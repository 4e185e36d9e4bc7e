"""Fused LoRA linear against ``F.linear``, PEFT and the unfused composite: every provider × mode × case.

Run with ``pytest benchmarks/ --benchmark-only`` (timings; the GPU set on CUDA, a small fp32 set on the
CPU) or ``pytest benchmarks/ --benchmark-disable -q`` (each benchmark once, untimed: the CI check that
this code still runs).

Each benchmark is one :func:`harness.measure`, the same call ``python benchmarks/report.py`` and
``gpu_run.py``'s table make: pytest-benchmark does not time anything itself here. The harness's per-call
times are handed to pytest-benchmark (:func:`record_times`), so its columns (median, iqr, min, max,
rounds) and its JSON describe the harness's run, and its median is the row's ``median_ms``.
"""

from __future__ import annotations

import pytest
import torch

import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

PARAMS = [
    pytest.param(case, provider, id=f"{case.label}-{provider}")
    for case in harness.default_cases(DEVICE)
    for provider in harness.providers(case.mode, DEVICE, case.dora, case.quant)
]


def record_times(benchmark, times_ms: list[float]) -> None:
    """Give pytest-benchmark the harness's per-call times as its rounds (one call per round).

    pytest-benchmark has no public way to take times measured elsewhere (CUDA events: ``do_bench``), so this
    uses its fixture's ``_make_stats``, the call its own loops make before recording each round.
    """
    if benchmark.disabled:
        benchmark.pedantic(lambda: None)  # the fixture is used; nothing is timed under --benchmark-disable
        return
    if not hasattr(benchmark, "_make_stats"):
        pytest.fail("this pytest-benchmark has no BenchmarkFixture._make_stats: update record_times()")
    benchmark._mode = "lora_kernels benchmarks/harness.py"  # the fixture counts as used, once
    stats = benchmark._make_stats(1)
    stats.options["timer"] = "harness.time_calls"  # what --benchmark-json reports as the timer
    for ms in times_ms:
        stats.update(ms / 1e3)


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_lora_linear(benchmark, bench_rows, case: harness.Case, provider: str) -> None:
    if reason := harness.skip_reason(case, provider):
        pytest.skip(reason)
    times: list[float] = []
    row = harness.measure(provider, case, DEVICE, timed=not benchmark.disabled, samples=times)
    row.update(
        name=benchmark.name,
        device=harness.device_name(DEVICE),
        order=harness.providers(case.mode, DEVICE, case.dora, case.quant).index(provider),
        versions=harness.versions(),
    )
    benchmark.group = case.label
    benchmark.extra_info.update(row)
    record_times(benchmark, times)
    bench_rows.append(benchmark.extra_info)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
