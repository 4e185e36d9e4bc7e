"""The grouped op (many adapters over one base) in ``pytest benchmarks/``: one benchmark per case × provider
of :mod:`multi_adapter` (the fused op, from segments and from ids; a loop of the single-adapter op; PEFT's
mixed batch; one adapter; the base GEMM). The medians' ratios per case are in ``extra_info`` and in
``python benchmarks/multi_adapter.py``'s table."""

from __future__ import annotations

import pytest
import torch

import multi_adapter
from test_lora_linear import record_times

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = multi_adapter.gpu_cases() if DEVICE.type == "cuda" else multi_adapter.cpu_cases()


@pytest.mark.parametrize("provider", multi_adapter.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_multi_adapter(benchmark, case: multi_adapter.MultiCase, provider: str) -> None:
    row = multi_adapter.measure(provider, case, DEVICE, timed=not benchmark.disabled)
    if "skipped" in row:
        pytest.skip(row["skipped"])
    benchmark.group = f"multi-{case.label}"
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "times_ms"})
    record_times(benchmark, row["times_ms"])
