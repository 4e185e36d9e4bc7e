"""pytest-benchmark set-up for ``benchmarks/``: device, defaults, and ratios computed at session end.

Each benchmark stores its row (device, versions, case, provider, memory) in ``benchmark.extra_info`` and
registers it here. Before pytest-benchmark writes its JSON, :func:`harness.add_ratios` adds
``ratio_to_base``, ``ratio_to_peft`` and ``speedup_over_peft`` (from medians of the same run) to every
row, so they land in ``--benchmark-json`` / ``--benchmark-autosave`` output; the terminal summary prints
them as one table. The Triton interpreter is never enabled here: it is no speed measurement.
"""

from __future__ import annotations

import pytest
import torch

import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ROWS: list[dict] = []


def pytest_configure(config: pytest.Config) -> None:
    """Compact pytest-benchmark tables (median first) unless the command line chose columns."""
    args = " ".join(config.invocation_params.args)
    if "--benchmark-columns" not in args and hasattr(config.option, "benchmark_columns"):
        config.option.benchmark_columns = ["median", "iqr", "min", "max", "rounds"]


@pytest.fixture
def bench_rows() -> list[dict]:
    """The session's rows; a benchmark appends its ``extra_info`` dict after it has been timed."""
    return _ROWS


def _finalise_rows() -> None:
    harness.add_ratios(_ROWS)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    _finalise_rows()  # before pytest-benchmark saves its JSON (its own wrapper runs inside this one)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    _finalise_rows()
    for entry in output_json.get("benchmarks", []):
        info = entry.get("extra_info", {})
        for row in _ROWS:
            if row.get("name") == entry.get("name"):
                info.update({k: row[k] for k in ("ratio_to_base", "ratio_to_peft", "speedup_over_peft")})


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("LoRA linear: medians and ratios from this run")
    tr.write_line(f"device: {harness.device_name(DEVICE)}")
    tr.write_line("versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items()))
    if note := harness.cpu_load_note():
        tr.write_line(f"note: {note}")
    if all(row.get("median_ms") is None for row in _ROWS):
        tr.write_line("timing disabled (--benchmark-disable): each benchmark ran once, no ratios")
    tr.write_line(
        "ratio_to_base / ratio_to_peft = median time / median time of base / peft on the same case "
        "(below 1 is faster); saved_MiB: new memory kept for backward; peak_MiB: CUDA only"
    )
    tr.write_line(harness.format_text_table(_ROWS))
