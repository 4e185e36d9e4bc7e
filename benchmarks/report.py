"""The benchmark report: time the fused LoRA linear against its baselines and write a report.

    python benchmarks/report.py [--quick] [--out DIR] [--device cuda|cpu] [--modes ...] [--providers ...]

Writes ``results.json``, ``results.md``, ``speedup.png`` and ``log.txt`` into ``--out`` (default
``benchmarks/results/<device>/``, the committed results; with ``--quick`` a folder under the system's
temporary directory, so a smoke run replaces nothing). Cases, providers and the measurement itself come
from ``harness.py``, shared with ``pytest benchmarks/`` and ``gpu_run.py``. Needs the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

import lora_kernels
from lora_kernels.dispatch import BACKENDS as BACKEND_NAMES

from harness import (
    BASELINES,
    MERGED_OURS,
    MODES,
    PEFT_DORA,
    PEFT_QLORA,
    QLORA_TRITON,
    Case,
    add_ratios,
    cpu_load_note,
    default_cases,
    device_name,
    device_slug,
    format_markdown,
    format_text_table,
    measure,
    path_providers,
    peft_import_error,
    providers,
    quick_cases,
    skip_reason,
    versions,
)

__all__ = ["Case", "default_out", "main", "plot_speedup", "quick_cases"]


def plot_speedup(rows: Sequence[dict], path: Path, title: str) -> None:
    """Speed-up over PEFT and overhead over ``base`` against tokens M, one row of panels per mode.

    Each line is the geometric mean over the cases at that M (shapes, ranks, dropout, dtypes); the band
    spans their minimum and maximum.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.4 * len(modes)), squeeze=False)
    for row_axes, mode in zip(axes, modes, strict=True):
        mode_rows = [r for r in rows if r["mode"] == mode and r.get("median_ms")]

        def line_name(r: dict) -> str:  # DoRA rows get lines of their own
            return (
                "peft" if r["provider"] == PEFT_DORA else r["provider"] + (" (DoRA)" if r.get("dora") else "")
            )

        names = list(dict.fromkeys(line_name(r) for r in mode_rows))
        for ax, metric, ylabel, skip in (
            (row_axes[0], "speedup_over_peft", "speed-up over PEFT (×)", "peft"),
            (row_axes[1], "ratio_to_base", "time / base time (×)", "base"),
        ):
            for name in names:
                if name == skip:
                    continue
                by_m: dict[int, list[float]] = {}
                for r in mode_rows:
                    if line_name(r) == name and r.get(metric):
                        by_m.setdefault(r["M"], []).append(r[metric])
                if not by_m:
                    continue
                ms = sorted(by_m)
                geo = [math.exp(statistics.fmean(math.log(v) for v in by_m[m])) for m in ms]
                (line,) = ax.plot(ms, geo, marker="o", label=name)
                lo, hi = [min(by_m[m]) for m in ms], [max(by_m[m]) for m in ms]
                ax.fill_between(ms, lo, hi, color=line.get_color(), alpha=0.12)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("tokens M")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nline: geometric mean over cases at each M; band: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def _tee(path: Path) -> Iterator[Callable[[str], None]]:
    """``print`` that also appends to ``path`` (the raw log kept next to the results)."""
    with path.open("w") as log:

        def emit(text: str) -> None:
            print(text)
            log.write(text + "\n")
            log.flush()

        yield emit


def default_out(device: torch.device, quick: bool = False) -> Path:
    """Where a run writes without ``--out``: ``benchmarks/results/<device>/`` (the committed results, next to
    this file), or for ``--quick`` ``<tmp>/lora_kernels-bench-quick/<device>/``, so that a smoke run
    replaces nothing."""
    if quick:
        return Path(tempfile.gettempdir()) / "lora_kernels-bench-quick" / device_slug(device)
    return Path(__file__).resolve().parent / "results" / device_slug(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/report.py",
        description="Benchmark the fused LoRA linear against F.linear, PEFT and the unfused composite on "
        "the device here; write results.json, results.md, speedup.png and log.txt.",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny set of cases (seconds on a CPU)")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default benchmarks/results/<device>/; with --quick a folder under the system's "
        "temporary directory, so that a quick run never replaces the committed results)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument("--providers", help="comma-separated subset of providers (default: all available)")
    args = parser.parse_args(argv)
    lora_kernels.quant4bit.quiet_bitsandbytes_cpu_notice()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    wanted = None
    if args.providers:
        wanted = {p.strip() for p in args.providers.split(",") if p.strip()}
        known = {
            *BASELINES,
            PEFT_DORA,
            PEFT_QLORA,
            *QLORA_TRITON,
            MERGED_OURS,
            "auto",
            *BACKEND_NAMES,
            *path_providers(BACKEND_NAMES, None),
        }
        if unknown := sorted(wanted - known):
            parser.error(
                f"unknown provider(s) {', '.join(map(repr, unknown))}; choose from {', '.join(sorted(known))}"
            )
        here = {p for mode in modes for p in providers(mode, device)}
        if not wanted & here:
            parser.error(
                f"--providers {args.providers}: none of them runs on {device.type} for modes "
                f"{','.join(modes)} (here: {', '.join(sorted(here))})"
            )
    out = args.out or default_out(device, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    if args.out is None and args.quick:
        print(f"quick run: writing to {out} (choose with --out)")

    cases = [c for c in (quick_cases(device) if args.quick else default_cases(device)) if c.mode in modes]
    notes = []
    if peft_import_error():
        notes.append(f"peft provider skipped: {peft_import_error()}")
    if load_note := cpu_load_note():
        notes.append(load_note)
    if device.type != "cuda":
        notes.append(
            "CPU run: ours is the torch backend only (`auto` is the torch backend here; Triton on the CPU "
            "is the interpreter, not a speed measurement); peak memory is CUDA-only."
        )
    jobs = []
    for case in cases:
        for order, provider in enumerate(providers(case.mode, device, case.dora, case.quant)):
            if skip_reason(case, provider):
                continue
            if wanted is None or provider in wanted or provider in ("base", "peft", PEFT_DORA, PEFT_QLORA):
                jobs.append((case, provider, order))

    env = {"device": device_name(device), "device_slug": device_slug(device), "versions": versions()}
    env["notes"] = notes
    from tqdm import tqdm

    rows = []
    with _tee(out / "log.txt") as emit:
        emit(f"python benchmarks/report.py {' '.join(argv if argv is not None else sys.argv[1:])}")
        emit(f"device: {env['device']}")
        emit("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
        for note in notes:
            emit(f"note: {note}")
        emit(f"{len(cases)} cases, {len(jobs)} measurements")
        started = time.perf_counter()
        for case, provider, order in tqdm(jobs, desc="bench", unit="run", file=sys.stderr):
            row = measure(provider, case, device, quick=args.quick)
            row.update(device=env["device"], order=order, versions=env["versions"])
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_ratios(rows)
        if (load_note := cpu_load_note()) and load_note not in notes:
            notes.append(f"at the end, {load_note}")
            emit(f"note: at the end, {load_note}")
        emit(format_text_table(rows))
        emit(f"total {time.perf_counter() - started:.1f} s")

    (out / "results.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    (out / "results.md").write_text(format_markdown(rows, env))
    plot_speedup(rows, out / "speedup.png", f"{env['device']} — lora_kernels {lora_kernels.__version__}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'speedup.png'}, {out / 'log.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
