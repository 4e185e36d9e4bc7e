"""The benchmarks' command lines: ``python benchmarks/report.py`` (where a quick run writes, which providers it
takes) and ``bash benchmarks/gpu_run.sh`` (a GPU visit's plan fits the device time; its modules import one
way)."""

from __future__ import annotations

import ast
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import benchmarks_module

bench = benchmarks_module("report")  # python benchmarks/report.py


def test_bench_quick_writes_outside_the_committed_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(bench, "quick_cases", lambda device: [bench.Case(16, 32, 24, 4, 0.0, "fp32", "fwd")])
    assert bench.main(["--quick", "--modes", "fwd", "--providers", "torch", "--device", "cpu"]) == 0
    assert not (tmp_path / "benchmarks").exists()
    out = capsys.readouterr().out
    written = re.search(r"wrote (\S+results\.json)", out)
    assert written, out
    path = written.group(1)
    assert path.startswith(str(tmp_path / "tmp")), path
    assert (tmp_path / "tmp").joinpath(path[len(str(tmp_path / "tmp")) + 1 :]).exists()


def test_bench_rejects_unknown_providers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # were the name accepted, a run would write here, not into the repo
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--providers", "torch,tritn", "--device", "cpu"])
    assert exc.value.code == 2
    assert "tritn" in capsys.readouterr().err


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_visit_plan_fits_the_device_time():
    """``gpu_run.sh --plan``: each call's estimates within its budget, and machine start + both budgets + a
    spare minute within the 900 s of device time; the call's limits are what its phases run under."""
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_run.sh"), "--plan"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    totals = re.findall(r"^call (\d) \(budget (\d+) s\)$", result.stdout, re.M)
    assert [call for call, _ in totals] == ["1", "2"], result.stdout
    estimates = [int(n) for n in re.findall(r"^  total +(\d+) ", result.stdout, re.M)]
    assert all(est <= int(budget) for est, (_, budget) in zip(estimates, totals, strict=True)), result.stdout
    used = re.search(r"= (\d+) s <= 900 s: fits$", result.stdout, re.M)
    assert used and int(used.group(1)) <= 900, result.stdout
    assert result.stdout.rstrip().endswith("the plan fits")


def test_gpu_run_refuses_a_phase_of_no_call():
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_run.sh"), "--call", "2", "--only", "table"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "table is no phase of call 2" in result.stderr


def _sibling_imports(file: Path, names: set[str]) -> set[str]:
    """The modules of ``benchmarks/`` that ``file`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found & names - {file.stem}


def test_benchmarks_import_one_way():
    """No import circle in ``benchmarks/`` (an import inside a function counts): the driver's phases import
    the shared helpers (harness, gpu_rows), never the command line that calls them nor each other back."""
    files = {f.stem: f for f in BENCHMARKS.glob("*.py")}
    graph = {name: _sibling_imports(file, set(files)) for name, file in files.items()}
    assert graph["gpu_run"] >= {"gpu_checks", "gpu_tables", "tile_sweep", "tma_sweep", "gpu_summary"}
    assert graph["harness"] == set() and graph["gpu_rows"] == {"harness"}, graph
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", f"import circle: {' -> '.join((*path, other))}"
            if other not in state:
                visit(other, (*path, other))
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, (name,))
