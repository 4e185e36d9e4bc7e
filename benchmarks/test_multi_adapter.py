"""The grouped op (many adapters over one base) in ``pytest benchmarks/``: one benchmark per case × provider
of :mod:`multi_adapter` (the fused op from segments and from ids, a loop of the single-adapter op, PEFT's
mixed batch, one adapter, the base GEMM), each checked against float64 before it is timed.

``--benchmark-only``: the CPU set (fp32, M = 2048, 1024², 8 and 4 adapters) or, on CUDA, the GPU set; the
harness's per-call times become pytest-benchmark's rounds (:func:`test_lora_linear.record_times`). At the
end of this module the ratios of the medians (``vs_base``, ``vs_peft``, ``vs_loop``, ``vs_single``, same
case, same run) go into each benchmark's ``extra_info`` (so into ``--benchmark-json``) and a table is
printed. ``--benchmark-disable`` (CI): the tiny quick set, each benchmark once, in seconds.

The rows do not join the ``bench_rows`` fixture: its table (``harness.format_text_table``) is of the
single-adapter cases' fields, which these rows do not have.
"""

from __future__ import annotations

import pytest
import torch

import harness
import multi_adapter
from test_lora_linear import record_times

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ROWS: list[dict] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The full set when timed, the quick one under ``--benchmark-disable`` (each case runs once)."""
    if "case" not in metafunc.fixturenames:
        return
    quick = bool(metafunc.config.getoption("benchmark_disable", default=False))
    cases = (multi_adapter.gpu_cases if DEVICE.type == "cuda" else multi_adapter.cpu_cases)(quick)
    metafunc.parametrize("case", cases, ids=[case.label for case in cases])


class _Summary:
    """The table at the end of the session, beside the single-adapter one (conftest.py)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        tr.section("many adapters over one base: medians and ratios from this run")
        tr.write_line(f"device: {harness.device_name(DEVICE)}")
        tr.write_line("versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items()))
        if note := harness.cpu_load_note():
            tr.write_line(f"note: {note}")
        tr.write_line(multi_adapter.table(_ROWS))


@pytest.fixture(scope="module", autouse=True)
def _ratios_and_table(request):
    yield
    if any(row.get("median_ms") for row in _ROWS):
        multi_adapter.add_ratios(_ROWS)  # into the extra_info dicts: pytest-benchmark saves them later
        if not request.config.pluginmanager.has_plugin("multi_adapter_summary"):
            request.config.pluginmanager.register(_Summary(), "multi_adapter_summary")


@pytest.mark.parametrize("provider", multi_adapter.PROVIDERS)
def test_multi_adapter(benchmark, case: multi_adapter.MultiCase, provider: str) -> None:
    row = multi_adapter.measure(provider, case, DEVICE, timed=not benchmark.disabled)
    if "skipped" in row:
        pytest.skip(row["skipped"])
    benchmark.group = f"multi-{case.label}"
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "times_ms"})
    record_times(benchmark, row["times_ms"])
    _ROWS.append(benchmark.extra_info)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
