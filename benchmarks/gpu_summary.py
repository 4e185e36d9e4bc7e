"""The summary of one call of a GPU visit, and the routing table its timing table implies.

    python benchmarks/gpu_run.py summary --work DIR --out OUT --call N
    python benchmarks/gpu_run.py tuning --from RESULTS_JSON --out FILE [--stand-in provider=path,...]

``summary`` reads the rows every phase left in ``DIR`` (:mod:`gpu_rows`), the phases' statuses
(``DIR/phases.tsv``) and the tests' junit XML in ``OUT``, and writes ``OUT/SUMMARY-callN.md`` and
``OUT/results-callN.json`` (the table rows in the fields of ``python benchmarks/report.py``'s results, so
one report tool reads both, then every other phase's rows), ``DIR/results.md`` (the timing table, packed
with the raw logs) and, where the call measured the timing table, ``OUT/tuning-<device>.json``: the
routing table, under the name :mod:`lora_kernels.ops.routing` looks up for this device (to commit as
``lora_kernels/tuning/<device>.json``), with ``auto`` against the fastest provider of every case.
"""

from __future__ import annotations

import collections
import json
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from lora_kernels import use_backend
from lora_kernels.dispatch import select_backend
from lora_kernels.ops import routing

import harness
from gpu_rows import DEVICE, DRY, error_text, machine, read

#: The test phases: name, title; their junit XML is ``OUT/junit-<name>-callN.xml``, their log
#: ``DIR/<name>.log``.
TEST_PHASES = (
    ("tests-gpu", "Tests marked cuda"),
    ("tests", "The other tests where the GPU changes the result (not marked cuda)"),
    ("cuda-ext", "Tests of the cuda backend (tests/test_cuda_ext.py, extension built there)"),
)
#: The phases whose rows hold measurements; an ``error`` in one of them makes a dry run fail.
ROW_PHASES = ("table", "qlora", "multi", "overhead", "sweep", "tma", "sanitize", "e2e")


def suffix(call: int | None) -> str:
    """What every file of a call's results ends in before its extension: ``-call1``, ``-call2``."""
    return f"-call{call}" if call else ""


def tuning_file_name(device: str) -> str:
    """``tuning-`` and the name of the file in which :mod:`lora_kernels.ops.routing` looks up the table of
    the device called ``device`` (``torch.cuda.get_device_name()``): ``NVIDIA H100 80GB HBM3`` gives
    ``tuning-nvidia_h100_80gb_hbm3.json``, to commit as ``lora_kernels/tuning/nvidia_h100_80gb_hbm3.json``."""
    return f"tuning-{routing.device_slug(device)}.json"


def _md_table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


_OUTCOME = re.compile(r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
_TEST_ID = re.compile(r"(tests/\S+::\S+)")
_COLLECTED = re.compile(r"\d+(?:/\d+)? tests? collected[^=]*")


def _log_lines(log: Path, title: str) -> list[str]:
    """Outcomes read from a ``pytest -v`` log, for a run cut off before it wrote its junit XML."""
    if not log.exists():
        return [f"## {title}", "", "did not run", ""]
    outcomes: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        test, outcome = _TEST_ID.search(line), _OUTCOME.search(line)
        if test and outcome:
            outcomes[test.group(1)] = outcome.group(1)
    counts = collections.Counter(outcomes.values())
    lines = [f"## {title}", "", f"no junit XML: the run was cut off; from its log, {len(outcomes)} tests reported: "
             + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())), ""]  # fmt: skip
    lines += [
        f"- {outcome.lower()}: `{test}`"
        for test, outcome in outcomes.items()
        if outcome in ("FAILED", "ERROR")
    ]
    crashed = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if "node down" in ln]
    lines += [f"- worker crash: {ln}" for ln in crashed]
    return [*lines, ""]


def _junit_lines(path: Path, title: str, log: Path) -> list[str]:
    if not path.exists():
        return _log_lines(log, title)
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    collected = (
        _COLLECTED.findall(log.read_text(errors="replace")) if counts["tests"] == 0 and log.exists() else []
    )
    if collected:  # a dry run's --collect-only
        return [f"## {title}", "", f"collected only: {collected[-1].strip()} (`{log.name}`)", ""]
    lines = [f"## {title}", "", f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped (`{path.name}`)", ""]  # fmt: skip
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            lines.append(f"- {bad.tag}: `{case.get('classname')}::{case.get('name')}` {message}")
    return [*lines, ""]


def _machine() -> dict:
    """:func:`gpu_rows.machine`, or what went wrong: a summary is always written."""
    try:
        return machine()
    except Exception as err:
        return {"device": f"unknown ({error_text(err)})", "versions": harness.versions()}


def _phases(work: Path) -> list[dict]:
    """``phases.tsv`` (name, status, seconds, limit, estimate: one line a phase, as ``gpu_run.sh`` writes it)."""
    path = work / "phases.tsv"
    fields = ("phase", "status", "seconds", "limit_s", "estimate_s")
    lines = path.read_text().splitlines() if path.exists() else []
    return [dict(zip(fields, line.split("\t"), strict=False)) for line in lines if line.strip()]


def phase_summary(work: Path, out: Path, call: int | None = None) -> int:
    """Write this call's SUMMARY and results (see the module's docstring); returns how many rows hold an
    error."""
    sfx = suffix(call)
    env = (read(work / "env.jsonl") or [_machine()])[-1]  # call 2 has no env phase
    versions = env.get("versions") or {}
    lines = [f"# GPU run{f', call {call} of 2' if call else ''}", ""]
    if DRY:
        lines += ["**Dry run** (CPU, interpreter, tiny shapes): checks the script, measures nothing.", ""]
    lines += [f"Device: {env.get('device')}; SMs {env.get('sms')}, L2 {env.get('l2_MiB')} MiB, memory "
              f"{env.get('memory_GiB')} GiB; backends {env.get('backends')}",
              "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]  # fmt: skip
    phases = _phases(work)
    if phases:
        columns = ["phase", "status", "seconds", "limit_s", "estimate_s"]
        lines += ["## Phases", "", *_md_table(phases, columns), ""]
    for name, title in TEST_PHASES:
        if any(p["phase"] == name for p in phases) or (work / f"{name}.log").exists():
            lines += _junit_lines(out / f"junit-{name}{sfx}.xml", title, work / f"{name}.log")

    rows = read(work / "table.jsonl")
    harness.add_ratios(rows)
    if rows:
        device = env.get("routing_device") or routing.device_name(DEVICE)
        lines += routing_lines(rows, out, device)
    environment = {key: env.get(key) for key in ("device", "routing_device", "sms", "l2_MiB", "memory_GiB",
                                                 "capability", "backends")}  # fmt: skip
    environment.update(versions=versions, notes=[])
    if DRY:
        environment["notes"].append(
            "dry run: CPU, Triton interpreter, tiny shapes; the times measure nothing"
        )
    results = {"call": call, "environment": environment, "phases": phases, "results": rows}
    results["rows"] = {name: read(work / f"{name}.jsonl") for name in ROW_PHASES if name != "table"}
    (out / f"results{sfx}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if rows:
        table_md = harness.format_markdown(rows, environment)
        (work / "results.md").write_text(table_md)
        lines += ["## Timing table", "", *table_md.splitlines()[6:]]
        errors = [r for r in rows if r.get("error")]
        lines += [f"- {r['provider']} {r['mode']} {r['shape']} M={r['M']}: {r['error']}" for r in errors]
        lines.append("")
    for name, title, columns in (
        ("overhead", "Host time per eager fwd+bwd call (tiny problem)", ["provider", "host_us_per_call", "error"]),
        ("sweep", "Tile-config sweep", ["kernel", "shape", "config", "ran_config", "median_ms", "baseline_ms",
                                        "ratio_to_baseline", "max_rel_error", "error"]),
        ("tma", "Decision sweep: GEMM paths, forward and dX (benchmarks/tma_sweep.py)",
         ["case", "candidate", "ms", "max_rel_error", "skipped", "error"]),
        ("sanitize", "compute-sanitizer workload", ["backend", "dtype", "dropout", "lead", "dora", "ok", "error"]),
        ("qlora", "QLoRA (NF4 base; issue 23)", ["mode", "shape", "M", "dropout", "provider", "median_ms",
                                                 "saved_bytes", "peak_bytes", "max_rel_error", "skipped", "error"]),
        ("multi", "Many adapters over one base (issue 33)", ["label", "provider", "median_ms", "vs_peft", "vs_loop",
                                                             "vs_single", "max_rel_error", "skipped", "error"]),
        ("e2e", "End-to-end training step (Llama-style, 2 layers)", ["variant", "dora", "dropout", "hidden", "tokens",
                                                                  "fused_layers", "first_loss", "step_ms",
                                                                  "peak_above_model_MiB", "error"]),
    ):  # fmt: skip
        phase_rows = read(work / f"{name}.jsonl")
        if phase_rows:
            lines += [f"## {title}", "", *_md_table(phase_rows, columns), ""]
    sanitizer_log = work / "sanitize.log"
    if sanitizer_log.exists():
        verdicts = [
            ln for ln in sanitizer_log.read_text().splitlines() if "ERROR SUMMARY" in ln or "skipped" in ln
        ]
        lines += [
            "compute-sanitizer: " + ("; ".join(verdicts[-3:]) or "no verdict line (see sanitize.log)"),
            "",
        ]
    (out / f"SUMMARY{sfx}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return sum(1 for name in ROW_PHASES for r in read(work / f"{name}.jsonl") if r.get("error"))


# ----------------------------------------------------------------------------------------------- routing


def routing_table(
    rows: list[dict],
    device: str,
    stand_ins: dict[str, str] | None = None,
    *,
    device_type: str = "cuda",
    **notes,
) -> dict:
    """The routing table of ``device`` (``lora_kernels/tuning/<device>.json``, read by
    :mod:`lora_kernels.ops.routing`) from timing rows: for each LoRA case (DoRA is not routed), the median
    ms of every path, from the providers ``backend:path`` of the backend ``auto`` selects for the case's
    dtype and rank on a ``device_type`` device. Rows with an error, a failed check included, are left out:
    the fastest *correct* path wins. ``stand_ins`` instead maps provider names to the path whose time they
    stand in for (a run that measured backends, not paths); ``notes`` are written into the file as they
    are."""
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("dora") or row.get("mode") not in ("fwd", "fwd_bwd") or row.get("error"):
            continue
        if not isinstance(row.get("median_ms"), int | float):
            continue
        dtype = harness._DTYPES_BY_NAME[row["dtype"]]
        if stand_ins is not None:
            path = stand_ins.get(row["provider"])
        else:
            backend, _, path = row["provider"].partition(":")
            with use_backend("auto"):
                wanted = select_backend(torch.device(device_type), dtype, row["r"])
            path = path if backend == wanted else ""
        if not path:
            continue
        key = routing.case_key(
            row["mode"], row["dtype"], row.get("adapter_dtype") or row["dtype"], row["dropout"] > 0,
            row["M"], row["out_features"], row["in_features"], row["r"],
        )  # fmt: skip
        cases.setdefault(key, {})[path] = round(float(row["median_ms"]), 4)
    return {"format": routing.TABLE_FORMAT, "device": device, **notes, "cases": dict(sorted(cases.items()))}


def write_routing_table(table: dict, file: Path) -> str:
    """Write ``table`` to ``file`` and read it back through the routing's own loader; a line that says
    what it holds (or why the loader refused it)."""
    file.write_text(json.dumps(table, indent=1) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = routing._load_table.__wrapped__(str(file), table["device"])
    if caught or loaded is None:
        return f"{file.name}: refused by the loader: {[str(w.message) for w in caught]}"
    winners = collections.Counter(min(times, key=times.__getitem__) for times in loaded.cases.values())
    return f"{file.name}: {len(loaded.cases)} cases, winners {dict(winners)}"


def routing_lines(rows: list[dict], out: Path, device: str) -> list[str]:
    """The summary's routing section: the table this run measured (``out/tuning-<device>.json``, to commit
    as ``lora_kernels/tuning/<device>.json``) and, per case, ``auto`` against the fastest provider.
    ``device`` is the name routing knows the device by (:func:`lora_kernels.ops.routing.device_name`)."""
    table = routing_table(
        rows, device, device_type=DEVICE.type,
        written_by="benchmarks/gpu_run.sh (the table phase's backend:path providers)",
        versions=next((r.get("versions") for r in rows if r.get("versions")), None),
    )  # fmt: skip
    if DRY:
        table["note"] = "dry run: CPU, Triton interpreter, tiny shapes; the times measure nothing"
    lines = ["## Routing", "", write_routing_table(table, out / tuning_file_name(device)), ""]
    by_case, labels = collections.defaultdict(dict), {}
    for row in rows:
        if (
            isinstance(row.get("median_ms"), int | float)
            and not row.get("error")
            and row["provider"] != "base"
        ):
            by_case[harness.case_key(row)][row["provider"]] = row["median_ms"]
            labels[harness.case_key(row)] = (
                f"{row['mode']}{'+dora' if row.get('dora') else ''} {row['dtype']}"
                f"{'/' + row['adapter_dtype'] if row.get('adapter_dtype') not in (None, row['dtype']) else ''}"
                f" {row['shape']} M={row['M']} r={row['r']} p={row['dropout']:g}"
            )
    lines += ["| case | auto ms | fastest provider | its ms | auto / fastest |", "|---|---|---|---|---|"]
    for key, times in by_case.items():  # the fastest of every provider but F.linear, PEFT included
        if "auto" in times:
            best = min(times, key=times.__getitem__)
            cells = [labels[key], f"{times['auto']:.3f}", best, f"{times[best]:.3f}",
                     f"{times['auto'] / times[best]:.3f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def tuning_from_results(results: Path, out: Path, stand_ins: str | None, note: str | None) -> int:
    """``tuning``: a routing table from a committed ``results.json`` (see :func:`routing_table`)."""
    data = json.loads(results.read_text())
    mapping = dict(item.split("=", 1) for item in stand_ins.split(",")) if stand_ins else None
    device = data["environment"].get("routing_device") or data["environment"]["device"]
    notes = {"written_by": f"python benchmarks/gpu_run.py tuning --from {results}"
                           + (f" --stand-in {stand_ins}" if stand_ins else "")}  # fmt: skip
    if note:
        notes["note"] = note
    notes["versions"] = data["environment"].get("versions")
    print(write_routing_table(routing_table(data["results"], device, mapping, **notes), out))
    return 0
