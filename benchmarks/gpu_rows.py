"""The rows of a GPU visit, shared by its phases: the device they run on, the dry-run switch, rows written as
they are measured and read back, an error as a row's text.

Every phase of ``benchmarks/gpu_run.sh`` appends its rows to ``WORK/<phase>.jsonl`` with :func:`emit` (one
JSON object a line, printed too), so a phase killed by its timeout keeps what it had; :func:`read` reads
them back, skipping a line that the kill cut off. An error goes into its row (:func:`error_text`) instead
of stopping the phase. Timing is the harness's (:func:`harness.median_ms`); :func:`time_ms` binds it to this
visit's device. :func:`machine` says what the visit runs on (the ``env`` phase records it; a call without
that phase has its summary ask).

``LORA_GPU_RUN_DRY=1`` (``gpu_run.sh --dry``) is the dry-run switch: the phases run on the CPU, tiny shapes,
the Triton kernels through the interpreter, so that the visit's code cannot rot before a GPU is at hand.
Dry numbers measure nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from lora_kernels.dispatch import available_backends
from lora_kernels.ops import routing

import harness

DRY = os.environ.get("LORA_GPU_RUN_DRY") == "1"
DEVICE = torch.device("cpu" if DRY else "cuda")


def emit(path: Path, row: dict) -> None:
    """Append one row to a JSON-lines file and print it: nothing measured is lost if the phase dies."""
    with path.open("a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def read(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist); a line cut off by a kill is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def error_text(err: BaseException) -> str:
    """An exception as a row's ``error``: its type and first line, at most 300 characters."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def sync() -> None:
    """Wait for the device (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` on this visit's device, with the harness's quick budget."""
    return harness.median_ms(lambda: fn(), DEVICE, quick=True)


def machine() -> dict:
    """The device, its properties, the backends here and every version that shapes a number (numpy,
    transformers, peft and bitsandbytes among them). ``routing_device`` is the name under which
    :mod:`lora_kernels.ops.routing` looks up this device's table."""
    info = {
        "versions": harness.versions(),
        "device": harness.device_name(DEVICE),
        "routing_device": routing.device_name(DEVICE),
        "dry": DRY,
    }
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(
            sms=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
    info["backends"] = available_backends(DEVICE)
    return info
