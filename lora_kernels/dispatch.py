"""The one place that decides which backend runs the fused LoRA linear.

Order for ``auto``: ``triton`` (CUDA tensors, or any tensor but bf16 under ``TRITON_INTERPRET=1``), then ``cuda``
(the compiled extension, CUDA tensors), then ``torch`` (the composite path, runs everywhere). A backend
asked for by name — through :func:`use_backend` or ``LORA_KERNELS_BACKEND`` — that cannot run on the
input is a clear error; ``auto`` falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

BACKENDS = ("triton", "cuda", "torch")
#: Input dtypes the fused kernels take; others (float64) run on the torch composite under ``auto``.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The largest LoRA rank the fused kernels take; larger ranks run on the torch composite under ``auto``.
MAX_KERNEL_RANK = 256
ENV_VAR = "LORA_KERNELS_BACKEND"

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("lora_kernels_backend", default=None)


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend module once; returns ``(module, "")`` or ``(None, why it is missing)``."""
    try:
        module = importlib.import_module(f"lora_kernels.ops.{name}_lora")
    except ImportError as err:  # triton not installed, or an import-time failure inside it
        return None, f"importing it failed ({err})"
    if name == "cuda" and not module.is_available():
        return None, module.missing_reason()
    return module, ""


# ``os.environ.get`` costs about 0.9 µs (it encodes the name and goes through a Mapping method); the
# per-call cache keys read several variables on every call, so they look the names up, encoded once, in the
# dict behind ``os.environ`` (CPython's ``os._Environ._data``, which every read and write of ``os.environ``
# goes through), about 0.1 µs each. Where that dict is not there, ``os.environ.get``.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODE_KEY = getattr(os.environ, "encodekey", None)
_ENCODE_VALUE = getattr(os.environ, "encodevalue", None)
_FAST_ENVIRON = isinstance(_ENVIRON_DATA, dict) and callable(_ENCODE_KEY) and callable(_ENCODE_VALUE)


def environ_reader(*names: str) -> Callable[[], tuple]:
    """A function that returns the values of the environment variables ``names`` as a tuple, ``None`` for an
    unset one, cheaply enough for a cache key read on every call. The values are raw (``bytes`` on POSIX):
    compare them with each other, or decode them with ``os.environ.get`` where they are used."""
    if _FAST_ENVIRON:
        keys, get = tuple(_ENCODE_KEY(name) for name in names), _ENVIRON_DATA.get
        return lambda: tuple(map(get, keys))
    return lambda: tuple(map(os.environ.get, names))


_interpret_value = environ_reader("TRITON_INTERPRET")
_INTERPRET_ON = (_ENCODE_VALUE("1") if _FAST_ENVIRON else "1",)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _interpret_value() == _INTERPRET_ON


def _unavailable_reason(
    name: str, device: torch.device, dtype: torch.dtype | None = None, rank: int | None = None
) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (for ``dtype`` inputs, LoRA ``rank``), or ``None``."""
    if name == "torch":
        return None
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"its kernels support {', '.join(str(d) for d in KERNEL_DTYPES)}, not {dtype}"
    if rank is not None and rank > MAX_KERNEL_RANK:
        return f"its kernels take LoRA ranks up to {MAX_KERNEL_RANK}, not {rank}"
    if name == "triton" and dtype == torch.bfloat16 and interpreting():
        return (
            "Triton's CPU interpreter (TRITON_INTERPRET=1) gets bf16 tl.dot wrong (numpy has no bfloat16: "
            "relative errors of 1e10 with triton 3.8); bf16 runs on the Triton kernels on a GPU without "
            "TRITON_INTERPRET"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "triton" and device.type != "cuda" and not interpreting():
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU interpreter)"
    if name == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "the Triton kernels target compute capability 8.0 and newer (Ampere, Ada, Hopper)"
    if name == "cuda" and device.type != "cuda":
        return "the CUDA extension needs CUDA tensors"
    _, why = _load(name)
    return why or None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None]


_backend_env = environ_reader(ENV_VAR, "TRITON_INTERPRET")


def backend_settings() -> tuple:
    """What besides the inputs decides the backend (:func:`use_backend`, ``LORA_KERNELS_BACKEND``,
    ``TRITON_INTERPRET``), as a value for cache keys: two lookups, no parsing."""
    return _requested.get(), _backend_env()


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend` first, then ``LORA_KERNELS_BACKEND``, else ``auto``."""
    name = _requested.get()
    if name is None:
        name = _parse_env(os.environ.get(ENV_VAR))
    return name


@functools.lru_cache(maxsize=16)
def _parse_env(value: str | None) -> str:
    """``LORA_KERNELS_BACKEND``'s value as a backend name (cached per value; a bad one is an error each time)."""
    name = (value or "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return name


class Override(contextlib.AbstractContextManager):
    """A context manager that sets a context variable to a name inside (see :func:`override`). A class
    rather than ``@contextmanager``: entering and leaving cost about 1 µs instead of several, for code that
    sets a backend around every call. Reusable and reentrant within a thread (each ``with`` keeps its own
    token); threads should each make their own."""

    __slots__ = ("_name", "_tokens", "_var")

    def __init__(
        self, var: contextvars.ContextVar[str | None], name: str, choices: Sequence[str], what: str
    ) -> None:  # fmt: skip
        name = name.strip().lower()
        if name != "auto" and name not in choices:
            raise ValueError(f"unknown {what} {name!r}; choose one of auto, {', '.join(choices)}")
        self._var, self._name, self._tokens = var, name, []

    def __enter__(self) -> None:
        self._tokens.append(self._var.set(self._name))

    def __exit__(self, *exc_info) -> None:
        self._var.reset(self._tokens.pop())


def override(
    var: contextvars.ContextVar[str | None], name: str, choices: Sequence[str], what: str
) -> Override:
    """Set ``var`` to ``name`` (``auto`` or one of ``choices``; case and surrounding spaces ignored) inside,
    the one mechanism behind :func:`use_backend`, ``use_path`` and ``use_qlora_path``; another name is a
    ``ValueError`` that says which ``what`` exist."""
    return Override(var, name, choices, what)


def use_backend(name: str) -> contextlib.AbstractContextManager:
    """Run the fused LoRA linear on backend ``name`` (``auto``, ``triton``, ``cuda`` or ``torch``) inside."""
    return override(_requested, name, BACKENDS, "backend")


# select_backend's answers (only successful ones: errors are re-derived so that their message is exact), keyed by
# everything they depend on that can change while a program runs: the backend asked for (use_backend or the env
# var, read on every call), TRITON_INTERPRET, the device, the dtype and whether the rank is over the limit.
# Whether CUDA is available, a device's compute capability and which backends import do not change.
_SELECTED: dict[tuple, str] = {}


def select_backend(device: torch.device, dtype: torch.dtype | None = None, rank: int | None = None) -> str:
    """Name of the backend that will run for inputs of ``dtype`` on ``device`` with LoRA rank ``rank``."""
    name = requested_backend()
    key = (name, device, dtype, rank is not None and rank > MAX_KERNEL_RANK, interpreting())
    selected = _SELECTED.get(key)
    if selected is not None:
        return selected
    if name == "auto":
        selected = next(n for n in BACKENDS if _unavailable_reason(n, device, dtype, rank) is None)
    else:
        why = _unavailable_reason(name, device, dtype, rank)
        if why is not None:
            raise RuntimeError(
                f"lora_kernels backend {name!r} was requested but cannot run {dtype} inputs on {device}: {why}"
            )
        selected = name
    # "cuda" with no index means the current device, which can change: such a device is not cached.
    if not (device.type == "cuda" and device.index is None) and len(_SELECTED) < 1024:
        _SELECTED[key] = selected
    return selected


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (see :mod:`lora_kernels.ops`)."""
    module, why = _load(name)
    if module is None:
        raise RuntimeError(f"lora_kernels backend {name!r} is not available: {why}")
    return module
