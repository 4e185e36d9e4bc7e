"""Which path of a backend runs a fused LoRA linear call: the registry of paths, the per-device tables and
the choice, cached per call signature.

A *path* is one way a backend computes the op (:mod:`lora_kernels.dispatch` still chooses the backend):

``fused``  the Triton GEMM with the LoRA term in its epilogue (:func:`~lora_kernels.ops.triton_lora.lora_forward`).
``tma``, ``tma_ws``  the Triton persistent TMA GEMMs of :mod:`~lora_kernels.ops.triton_tma` (Hopper only).
``split``  the LoRA term ``bias + s·t·Bᵀ`` written into ``y``'s storage, then the base GEMM accumulated into it
           by cuBLAS (``addmm_`` with beta = 1); ``dX`` the same way. The plain composite's base GEMMs and
           no M×N temporary beyond the output: predicted never slower than the composite. The torch and
           cuda backends offer only this path; the Triton backend computes its skinny products with its
           own kernels.

Adding a path is one :class:`Path` line in :data:`PATHS`. ``auto`` takes, for each call signature, the path
that the device's table (``lora_kernels/tuning/<device>.json``, written by ``benchmarks/gpu_run.sh`` from its
own timings) measured fastest, among the paths the backend offers that can run here; a device without a
table, or a case the table lacks, takes :data:`DEFAULT_PATH`. ``LORA_KERNELS_PATH`` or :func:`use_path`
force a path (benchmarks); a forced path the backend does not offer is a clear error. A table that cannot
be read or validated (any error: it does not parse, is nested too deeply, holds a time no float can hold, is
of another format or of another device) is no table, with one warning, never an error; so is a
``LORA_KERNELS_TUNING`` that names a file that does not exist.

The table (format :data:`TABLE_FORMAT`)::

    {"format": "lora_kernels.tuning/1", "device": "NVIDIA H200",
     "cases": {"fwd_bwd|bf16|bf16|p0|M8192|N4096|K4096|r16": {"fused": 1.09, "split": 0.93}, ...}}

a case key (:func:`case_key`: mode, dtype, adapter dtype, dropout on or off and the power-of-two buckets of
M, N, K and r) to ``{path: median ms}``; candidates that are not a path of the backend are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FilePath

import torch

from ..dispatch import backend_settings, environ_reader, override

ENV_VAR = "LORA_KERNELS_PATH"
#: A table file to use instead of the package's (``benchmarks/gpu_run.py`` checks the table it wrote).
TABLE_ENV_VAR = "LORA_KERNELS_TUNING"
TABLE_FORMAT = "lora_kernels.tuning/1"
TABLE_DIR = FilePath(__file__).resolve().parent.parent / "tuning"
#: The path taken where no measurement decides (see :func:`default_path`).
DEFAULT_PATH = "split"


def _always(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class Path:
    """One path: ``backend``'s ``module`` (in :mod:`lora_kernels.ops`) provides ``forward`` and ``backward``
    with the signatures of the backend interface (:mod:`lora_kernels.ops`); ``available(device)`` says
    whether it can run on ``device`` (where the backend itself can), e.g. only on Hopper: a function, or the
    name of one in ``module``, so that this registry names a backend's check without importing the backend
    (which imports :mod:`lora_kernels.ops`, which imports this)."""

    name: str
    backend: str
    module: str
    forward: str = "lora_forward"
    backward: str = "lora_backward"
    available: Callable[[torch.device], bool] | str = _always


#: Every path of every backend; the first of a backend is what it runs when nothing else decides and
#: :data:`DEFAULT_PATH` is not among its paths. ``tma`` and ``tma_ws`` (warp-specialized) are issue 21's
#: persistent TMA kernels on a Hopper-class GPU (``triton_tma.tma_gpu_available``; not offered under the
#: interpreter, where ``tests/test_triton_tma.py`` checks them directly); their ``t_fused`` variants are
#: timed by ``benchmarks/tma_sweep.py`` only.
PATHS: tuple[Path, ...] = (
    Path("split", "triton", "triton_lora", "split_forward", "split_backward"),
    Path("fused", "triton", "triton_lora"),
    Path("tma", "triton", "triton_tma", "forward_tma", "backward_tma", "tma_gpu_available"),
    Path("tma_ws", "triton", "triton_tma", "forward_tma_ws", "backward_tma_ws", "tma_gpu_available"),
    Path("split", "cuda", "cuda_lora"),
    Path("split", "torch", "torch_lora"),
)


@functools.cache
def _functions(path: Path) -> tuple[Callable, Callable, Callable] | str:
    """``(forward, backward, available)`` of ``path``, or why its module does not import."""
    try:
        module = importlib.import_module(f"lora_kernels.ops.{path.module}")
        available = path.available
        if isinstance(available, str):
            available = getattr(module, available)
        return getattr(module, path.forward), getattr(module, path.backward), available
    except (ImportError, AttributeError) as err:
        return f"{path.module} does not provide it ({err})"


def _find(backend: str, name: str) -> Path | None:
    return next((p for p in PATHS if p.backend == backend and p.name == name), None)


def _why_not(path: Path, device: torch.device) -> str | None:
    found = _functions(path)
    if isinstance(found, str):
        return found
    return None if found[2](device) else f"its available() check is false on {device}"


def offered_paths(backend: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the paths ``backend`` offers that can run on ``device`` (all of its paths when None)."""
    paths = [p for p in PATHS if p.backend == backend]
    if device is not None:
        device = torch.device(device)
        paths = [p for p in paths if _why_not(p, device) is None]
    return [p.name for p in paths]


@functools.cache
def path_functions(backend: str, name: str) -> tuple[Callable, Callable]:
    """``(forward, backward)`` of ``backend``'s path ``name``."""
    path = _find(backend, name)
    found = _functions(path) if path is not None else f"backend {backend!r} has no path {name!r}"
    if isinstance(found, str):
        raise RuntimeError(f"lora_kernels path {name!r} of backend {backend!r} is not available: {found}")
    return found[:2]


# --------------------------------------------------------------------------------------------------------
# The override
# --------------------------------------------------------------------------------------------------------

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("lora_kernels_path", default=None)


def _all_names() -> list[str]:
    return sorted({p.name for p in PATHS})


def _check_name(name: str, source: str) -> str:
    name = (name or "auto").strip().lower() or "auto"
    if name != "auto" and name not in _all_names():
        raise ValueError(f"{source}{name!r} is not a path; choose one of auto, {', '.join(_all_names())}")
    return name


def requested_path() -> tuple[str, str]:
    """``(path asked for, where from)``: :func:`use_path` first, then ``LORA_KERNELS_PATH``, else ``auto``."""
    name = _requested.get()
    if name is not None:
        return name, f"use_path({name!r})"
    value = os.environ.get(ENV_VAR)
    name = _parse_env(value)
    return name, f"{ENV_VAR}={value}" if name != "auto" else "auto"


@functools.lru_cache(maxsize=16)
def _parse_env(value: str | None) -> str:
    return _check_name(value, f"{ENV_VAR}=")


_path_env = environ_reader(ENV_VAR, TABLE_ENV_VAR)


def path_settings() -> tuple:
    """What besides the inputs decides the path (:func:`use_path`, ``LORA_KERNELS_PATH``,
    ``LORA_KERNELS_TUNING``), as a value for cache keys: two lookups, no parsing."""
    return _requested.get(), _path_env()


def settings_key() -> tuple:
    """Everything besides the inputs that decides which backend and path a call runs (the overrides, the
    environment variables, ``TRITON_INTERPRET``), as a value for per-signature caches (below 1 µs)."""
    return backend_settings(), path_settings()


def use_path(name: str) -> contextlib.AbstractContextManager:
    """Run the fused LoRA linear on path ``name`` (``auto``, ``fused``, ``split``, …) of whatever backend is
    selected, inside. For benchmarks and tests: ``auto`` is the measured-fastest path."""
    return override(_requested, name or "auto", _all_names(), "path")


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (0 stays 0): shapes within a factor of two share a table entry."""
    return 1 << (n - 1).bit_length() if n > 1 else max(n, 0)


def case_key(
    mode: str, dtype: str, adapter_dtype: str, dropout: bool, M: int, N: int, K: int, r: int
) -> str:  # fmt: skip
    """The table key of a case: ``mode`` is ``fwd`` (no gradient) or ``fwd_bwd``, dtypes as ``bf16``."""
    return (
        f"{mode}|{dtype}|{adapter_dtype}|p{int(bool(dropout))}"
        f"|M{bucket(M)}|N{bucket(N)}|K{bucket(K)}|r{bucket(r)}"
    )


def device_slug(name: str) -> str:
    """A table's file stem for a device name: ``NVIDIA H200`` -> ``nvidia_h200``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass(frozen=True)
class Table:
    """A loaded table: ``cases`` maps a case key to ``{candidate: ms}``; ``source`` names the file."""

    source: str
    cases: dict[str, dict[str, float]]


def table_file(name: str) -> FilePath:
    """Where the table of the device called ``name`` lives (``LORA_KERNELS_TUNING`` overrides)."""
    override = os.environ.get(TABLE_ENV_VAR)
    return FilePath(override) if override else TABLE_DIR / f"{device_slug(name)}.json"


def _warn(message: str) -> None:
    warnings.warn(f"lora_kernels routing: {message}; using the default path {DEFAULT_PATH!r}", stacklevel=3)


def _time_ms(value) -> float | None:
    """``value`` as a time in ms (a positive finite number), or None: bools, strings, NaN, infinities and ints
    too large for a float are no times."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        ms = float(value)
    except OverflowError:
        return None
    return ms if 0 < ms < math.inf else None


class _BadTable(ValueError):
    """Why a table file cannot be used (the message of its one warning)."""


@functools.lru_cache(maxsize=16)
def _load_table(file: str, name: str, named_by_env: bool = False) -> Table | None:
    """The table in ``file`` for the device called ``name``; None (with one warning) when it cannot be used:
    any failure to read, parse or validate it (a deeply nested or huge JSON, a time too large for a float,
    another format or device) means no table, never an error. A missing file is the usual "no table for
    this device", silent, except when ``LORA_KERNELS_TUNING`` (``named_by_env``) names it: a typo warns."""
    path = FilePath(file)
    if not path.exists():
        if named_by_env:
            _warn(f"{TABLE_ENV_VAR}={file} names a file that does not exist")
        return None
    try:
        return _read_table(path, name)
    except _BadTable as err:
        _warn(str(err))
    except Exception as err:  # OSError, JSON errors, RecursionError, OverflowError, ...
        _warn(f"the table {path} cannot be read ({type(err).__name__}: {str(err)[:200]})")
    return None


def _read_table(path: FilePath, name: str) -> Table:
    """The checked :class:`Table` in ``path``; :class:`_BadTable` (or the parser's error) if it is unusable."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _BadTable(f"the table {path} is not a {TABLE_FORMAT} table (format {found!r})")
    if data.get("device") != name:
        raise _BadTable(f"the table {path} is for device {data.get('device')!r}, not {name!r}")
    raw = data.get("cases")
    if not isinstance(raw, dict):
        raise _BadTable(
            f"the table {path} has no cases: 'cases' is {type(raw).__name__}, not an object of case keys "
            "to {path: ms}"
        )
    cases, bad = {}, 0
    for key, times in raw.items():
        valid = ((c, _time_ms(ms)) for c, ms in (times.items() if isinstance(times, dict) else ()))
        clean = {str(c): ms for c, ms in valid if ms is not None}
        if clean:
            cases[str(key)] = clean
        else:
            bad += 1
    if bad:
        _warn(f"the table {path} has {bad} case(s) without a valid time, skipped")
    return Table(str(path), cases)


def load_table(device: torch.device) -> Table | None:
    """The routing table of ``device`` (None where it has none that can be used); read once per file."""
    name = device_name(device)
    return _load_table(str(table_file(name)), name, bool(os.environ.get(TABLE_ENV_VAR)))


# --------------------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------------------


def default_path(backend: str, device: torch.device) -> str:
    """:data:`DEFAULT_PATH` where ``backend`` offers it here, else its first path that can run."""
    offered = offered_paths(backend, device)
    if not offered:
        raise RuntimeError(f"lora_kernels backend {backend!r} offers no path that can run on {device}")
    return DEFAULT_PATH if DEFAULT_PATH in offered else offered[0]


#: Why :data:`DEFAULT_PATH`: it runs the plain composite's cuBLAS GEMMs with no M×N temporary, so it is
#: predicted never to lose to the composite; on the H200 the composite beat the fused Triton GEMM in every
#: measured case, M = 16 to 8192 (benchmarks/results/h200/). Small M included: the fused GEMM's one launch
#: did not make up for its slower main loop there either (M = 16 forward: 0.119 ms against 0.095).
DEFAULT_REASON = "the default (predicted never to lose to the composite)"


def explain_path(
    backend: str, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: bool,
    M: int, N: int, K: int, r: int, training: bool,
) -> tuple[str, str]:  # fmt: skip
    """``(path, why)`` for a call with these properties on ``backend`` (not cached; see :func:`select_path`)."""
    name, source = requested_path()
    offered = offered_paths(backend, device)
    if name != "auto":
        if name not in offered:
            path = _find(backend, name)
            why = _why_not(path, device) if path is not None else f"it offers {', '.join(offered) or 'none'}"
            raise RuntimeError(
                f"lora_kernels path {name!r} was requested ({source}) but backend {backend!r} cannot run it "
                f"on {device}: {why}"
            )
        return name, f"requested ({source})"
    default = default_path(backend, device)
    if len(offered) == 1:
        return default, f"the only path of the {backend} backend"
    table = load_table(device)
    if table is None:
        return default, f"no routing table for {device_name(device)}: {DEFAULT_REASON}"
    key = case_key(
        "fwd_bwd" if training else "fwd", dtype_name(dtype), dtype_name(adapter_dtype), dropout, M, N, K, r
    )
    times = {c: ms for c, ms in table.cases.get(key, {}).items() if c in offered}
    if not times:
        why = "not in" if key not in table.cases else "no path of this backend in"
        return default, f"{key} {why} {FilePath(table.source).name}: {DEFAULT_REASON}"
    best = min(times, key=times.__getitem__)
    shown = ", ".join(f"{c} {ms:.3f} ms" for c, ms in sorted(times.items(), key=lambda item: item[1]))
    return best, f"{FilePath(table.source).name} {key}: {shown}"


# The answers of select_path per call signature; bounded (dynamic shapes), cleared when full.
_SELECTED: dict[tuple, str] = {}
_MAX_SELECTED = 4096


def select_path(
    backend: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout_p: float,
    training: bool,
) -> str:  # fmt: skip
    """The path ``backend`` runs for an ``(..., K)`` input ``x`` with these operands: one dict lookup per
    call after the first of a signature. ``training``: a backward will follow (the table's ``fwd_bwd``)."""
    key = (
        backend, path_settings(), x.device, x.dtype, lora_A.dtype, dropout_p > 0.0, x.shape,
        weight.shape[0], lora_A.shape[0], training,
    )  # fmt: skip
    name = _SELECTED.get(key)
    if name is None:
        name, _ = explain_path(
            backend, x.device, x.dtype, lora_A.dtype, dropout_p > 0.0, math.prod(x.shape[:-1]),
            weight.shape[0], x.shape[-1], lora_A.shape[0], training,
        )  # fmt: skip
        if not (x.device.type == "cuda" and x.device.index is None):  # the current device can change
            if len(_SELECTED) >= _MAX_SELECTED:
                _SELECTED.clear()
            _SELECTED[key] = name
    return name


def clear_caches() -> None:
    """Forget the tables read and the choices made (tests; a table file rewritten while running)."""
    _SELECTED.clear()
    _load_table.cache_clear()
    _functions.cache_clear()
    path_functions.cache_clear()
    _parse_env.cache_clear()
