"""``python benchmarks/report.py``, the report's command line: where a quick run writes, which providers
it takes."""

from __future__ import annotations

import re
import tempfile

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
