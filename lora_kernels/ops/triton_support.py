"""The host side that every Triton file of :mod:`lora_kernels.ops` launches through.

Read top to bottom: the interpreter lock and the host arithmetic of grids and tiles; what the tile configs
share (:func:`_smaller_configs`, the fallbacks when a preferred config does not fit, and :class:`_Configs`);
the direct launch of compiled kernels and :func:`_launch`, the one launcher of every kernel; the per-shape
launch plans (:func:`_plan`); the fp32 input precision and the dropout arguments of a launch. Each kernel's
preferred config stands beside the kernel (:mod:`.triton_lora`, :mod:`.triton_reduce`, :mod:`.triton_dora`,
:mod:`.triton_tma`, :mod:`.triton_nf4`); the ``@triton.jit`` helpers they share are :mod:`.triton_tiles`.

Every launcher calls ``triton_support._launch``, looked up on this module at each call, so that a test or a
tool that replaces it here sees every launch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch
from triton.runtime.errors import OutOfResources

from ..dispatch import interpreting
from ..dropout import dropout_threshold, seed_tensor
from . import _NO_GUARD
from .triton_interpreter import fix_interpreter

# Triton's interpreter patches triton.language globally while it runs a kernel, so two threads interpreting at
# once break each other; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch_guard() -> contextlib.AbstractContextManager:
    if interpreting():
        fix_interpreter()
        return _INTERPRETER_LOCK
    return _NO_GUARD


def _cdiv(a: int, b: int) -> int:
    # Plain Python: triton.cdiv / triton.next_power_of_2 are constexpr functions, ~1 µs a host call.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, _next_power_of_2(n)))


def _block_r(r: int) -> int:
    return max(16, _next_power_of_2(r))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------------
# Tile configs: chosen by a function of the shape beside each kernel (no runtime autotuning), one config
# under the interpreter, where the cost grows with programs × loop trips and big blocks are cheapest. What
# the config functions share: the fallbacks when a preferred config does not fit.
# --------------------------------------------------------------------------------------------------


def _smaller_configs(cfg: dict, shrinkable: tuple[str, ...]) -> list[dict]:
    """``cfg`` then ever smaller variants: fewer pipeline stages first, then halved tiles (down to 16).

    Large ranks (the epilogue holds r-wide tiles) and fp32 can exceed a GPU's shared memory with the
    preferred config, e.g. the 99 KiB of sm_86/sm_89; :func:`_launch` walks this list until one fits.
    """
    configs = [cfg]
    while True:
        last = dict(configs[-1])
        if last.get("num_stages", 1) > 2:
            last["num_stages"] -= 1
        else:
            name = max((k for k in shrinkable if last[k] > 16), key=lambda k: last[k], default=None)
            if name is None:
                return configs
            last[name] //= 2
        configs.append(last)


class _Configs(list):
    """A :func:`_smaller_configs` list that carries its preferred config as a hashable key, made once."""

    __slots__ = ("key",)

    def __init__(self, configs: list[dict]):
        super().__init__(configs)
        self.key = tuple(sorted(configs[0].items()))


# The first config that fitted, per kernel and compile-time signature, so the search runs once. Empty unless
# a preferred config did not fit (large ranks or fp32 on a GPU with little shared memory): only then does a
# launch build its key.
_FITTING_CONFIG: dict[tuple, int] = {}


def _fitting_key(kernel, configs: list[dict], args: tuple, constexprs: dict) -> tuple:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    preferred = configs.key if isinstance(configs, _Configs) else tuple(sorted(configs[0].items()))
    return (getattr(kernel, "__name__", None) or repr(kernel), tensors[0].device, *constexprs.items(),
            *(t.dtype for t in tensors), preferred)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Direct launch (issue 19): the first launch of a kernel with a given specialization goes through
# ``kernel[grid]`` (JITFunction.run: binding, specialization of every argument, knobs, cache lookup, global
# checks, launch metadata); it returns the compiled kernel, and later launches with that specialization
# call its launcher directly. The key holds everything Triton specializes on, at least as finely
# (tests/test_triton_launch.py checks it against Triton's own binder on 3.6 and 3.8). Under the interpreter,
# with launch hooks, pre-run hooks, a changed global, another backend than CUDA or anything the key does not
# model, launches take ``kernel[grid]``. ``LORA_KERNELS_DIRECT_LAUNCH=0`` turns it off (read when a key is
# first seen); so does any error of a first direct launch (with one warning).
# --------------------------------------------------------------------------------------------------

_DIRECT_LAUNCH_ENV = "LORA_KERNELS_DIRECT_LAUNCH"
_MISSING = object()
# Constexpr and option values whose str() (Triton's cache key) is fixed by their type and equality; floats
# are not (0.0 == -0.0), nor are other objects: a key with one never launches directly.
_PLAIN_TYPES = frozenset((int, bool, str, type(None)))


class _DirectState:
    """Module state: ``off`` (the direct path disabled for good), the driver's device and stream queries and
    Triton's knobs, looked up at the first compiled launch (never at import)."""

    off = False
    ready = False
    get_device = get_stream = runtime = compilation = hook_chain = None


def _init_direct() -> bool:
    """Look up what direct launches need; ``False`` (and off for good) where this Triton lacks any of it."""
    try:
        from triton import knobs
        from triton.runtime import driver

        active, runtime = driver.active, knobs.runtime
        get_device, get_stream = active.get_current_device, active.get_current_stream
        if not hasattr(runtime, "launch_enter_hook") or not hasattr(runtime, "launch_exit_hook"):
            raise AttributeError("launch hooks")
    except Exception:  # an older or other Triton: keep kernel[grid]
        _DirectState.off = True
        return False
    _DirectState.get_device, _DirectState.get_stream = get_device, get_stream
    _DirectState.runtime, _DirectState.compilation = runtime, knobs.compilation
    _DirectState.hook_chain = getattr(knobs, "HookChain", None)
    _DirectState.ready = True
    return True


def _arg_key(a) -> object:
    """What Triton's specialization reads of a positional argument (native_specialize_impl, 3.6 and 3.8): an
    int's ``== 1``, ``% 16 == 0`` and whether it fits int32 / int64 (2, True or False inside int32, a pair
    outside: never equal to one another); a tensor's dtype and whether its address is a multiple of 16; a
    float, bool or None's type. Raises TypeError for anything else."""
    cls = a.__class__
    if cls is int:
        if -0x80000000 <= a <= 0x7FFFFFFF:
            return 2 if a == 1 else not a & 15
        return (not a & 15, -(1 << 63) <= a < (1 << 63))
    if cls is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    if cls is float or cls is bool or a is None:
        return cls
    raise TypeError(f"no direct-launch key for a {cls.__name__}")


def _direct_key(kernel, device, args: tuple, constexprs: dict, cfg: dict) -> tuple:
    """The direct-launch key: the kernel, the device, the options JITFunction.run adds (debug, instrumentation
    mode), each positional argument's :func:`_arg_key`, and the constexprs and config values with their types
    (True == 1 == 1.0 as keys, not in Triton's). Raises TypeError where it cannot be formed."""
    return (
        id(kernel), device, getattr(kernel, "debug", None), _DirectState.runtime.debug,
        getattr(_DirectState.compilation, "instrumentation_mode", None), tuple(map(_arg_key, args)),
        tuple(constexprs.items()), tuple(map(type, constexprs.values())),
        tuple(cfg.items()), tuple(map(type, cfg.values())),
    )  # fmt: skip


class _Direct:
    """A compiled kernel launched directly: its launcher, function handle and packed metadata; ``tail``, the
    arguments JITFunction.run passes after the positional ones (constexprs and defaults, in the signature's
    order, from Triton's own binder); ``globals``, the global values it was compiled with; ``tried``, whether a
    direct launch already succeeded."""

    __slots__ = ("compiled", "function", "globals", "kernel", "packed", "run", "tail", "tried")

    def __init__(self, kernel, compiled, tail: tuple, pinned: tuple):
        self.kernel, self.compiled, self.tail, self.globals = kernel, compiled, tail, pinned
        self.tried = False
        self.run, self.function, self.packed = compiled.run, compiled.function, compiled.packed_metadata


# Per direct-launch key: a :class:`_Direct`, or None where that key always takes kernel[grid]. Bounded like
# the plans (cleared when full; a cleared key takes kernel[grid] once more).
_DIRECT: dict[tuple, _Direct | None] = {}
_MAX_DIRECT = 4096


def _make_direct(kernel, device, compiled, args: tuple, constexprs: dict, cfg: dict) -> _Direct | None:
    """The :class:`_Direct` for what ``kernel[grid](*args, **constexprs, **cfg)`` just compiled and launched
    (``compiled``, its return value), or None where a direct launch could differ from it in any way."""
    if os.environ.get(_DIRECT_LAUNCH_ENV, "1") == "0":
        _DirectState.off = True
        return None
    run, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
    packed = getattr(compiled, "packed_metadata", None)
    if run is None or function is None or packed is None:  # not a loaded CompiledKernel
        return None
    if any(type(v) not in _PLAIN_TYPES for v in (*constexprs.values(), *cfg.values())):
        return None
    params, caches = getattr(kernel, "params", None), getattr(kernel, "device_caches", None)
    if params is None or caches is None or device not in caches or len(args) > len(params):
        return None
    if not isinstance(getattr(kernel, "pre_run_hooks", None), list):
        return None
    if any(p.is_constexpr for p in params[: len(args)]):  # Triton keys those on their value, the key does not
        return None
    _, _, target, _, binder = caches[device]
    if getattr(target, "backend", None) != "cuda":  # other backends' specialization is not modelled
        return None
    bound = tuple(binder(*args, **constexprs, **cfg)[0].values())  # what run passes to the launcher
    if len(bound) < len(args) or any(b is not a for a, b in zip(args, bound[: len(args)], strict=True)):
        return None
    pinned = []
    for (name, _), (value, namespace) in getattr(kernel, "used_global_vals", {}).items():
        current = namespace.get(name, _MISSING)
        if current is _MISSING or current != value:  # run raises here: let it, on the slow path
            return None
        pinned.append((namespace, name, current))
    return _Direct(kernel, compiled, bound[len(args) :], tuple(pinned))


def _quiet(kernel, entry: _Direct) -> bool:
    """Whether JITFunction.run would launch ``entry`` as a direct launch does: no launch hook (an empty
    HookChain calls nothing), no pipeline-inspection or pre-run hook, the kernel's globals unchanged."""
    runtime, chain = _DirectState.runtime, _DirectState.hook_chain
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not (enter is None or (type(enter) is chain and not enter.calls)):
        return False
    if not (leave is None or (type(leave) is chain and not leave.calls)):
        return False
    if getattr(runtime, "add_stages_inspection_hook", None) is not None or kernel.pre_run_hooks:
        return False
    return all(namespace.get(name, _MISSING) is value for namespace, name, value in entry.globals)


def _disable_direct(err: Exception) -> None:
    _DirectState.off = True
    warnings.warn(
        f"lora_kernels: a direct launch of a compiled Triton kernel failed ({type(err).__name__}: {err}); "
        f"launching through kernel[grid] from now on (set {_DIRECT_LAUNCH_ENV}=0 to skip the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )


def _call_direct(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict) -> None:
    """:func:`_call_kernel` outside the interpreter: directly where :data:`_DIRECT` holds the key's compiled
    kernel, else through ``kernel[grid]`` (remembering its compiled kernel the first time a key is seen)."""
    if not _DirectState.ready and not _init_direct():
        kernel[grid](*args, **constexprs, **cfg)
        return
    device = _DirectState.get_device()  # per launch, as JITFunction.run does (and the stream below)
    try:
        key = _direct_key(kernel, device, args, constexprs, cfg)
        entry = _DIRECT.get(key, _MISSING)
    except TypeError:  # an argument the key does not model, or an unhashable value
        kernel[grid](*args, **constexprs, **cfg)
        return
    if entry is _MISSING:
        compiled = kernel[grid](*args, **constexprs, **cfg)  # raises OutOfResources before any entry exists
        if len(_DIRECT) >= _MAX_DIRECT:
            _DIRECT.clear()
        try:
            _DIRECT[key] = _make_direct(kernel, device, compiled, args, constexprs, cfg)
        except Exception:  # a Triton whose internals differ from 3.6 / 3.8's: this key keeps kernel[grid]
            _DIRECT[key] = None
        return
    if entry is None or type(grid) is not tuple or not _quiet(kernel, entry):
        kernel[grid](*args, **constexprs, **cfg)
        return
    n = len(grid)
    try:  # the launcher's arguments as JITFunction.run passes them, hooks and launch metadata None
        entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _DirectState.get_stream(device),
                  entry.function, entry.packed, None, None, None, *args, *entry.tail)  # fmt: skip
    except Exception as err:
        if entry.tried:  # it worked before: an error of this launch, as kernel[grid] would raise it
            raise
        # (a failed launch raises before the kernel runs; our kernels only store, so a retry is safe)
        _disable_direct(err)
        kernel[grid](*args, **constexprs, **cfg)
        return
    entry.tried = True


def _call_kernel(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict) -> None:
    """The one place where a launch reaches Triton (``tools/host_overhead.py`` stubs it out): through
    ``kernel[grid]``, or directly through the compiled kernel once a key has one (:func:`_call_direct`)."""
    if _DirectState.off or interpreting():
        kernel[grid](*args, **constexprs, **cfg)
    else:
        _call_direct(kernel, grid, args, constexprs, cfg)


def _launch(kernel, grid_of, configs: list[dict], args: tuple, constexprs: dict) -> dict:
    """Launch ``kernel`` with the first of ``configs`` that fits the GPU's resources; returns that config."""
    key = _fitting_key(kernel, configs, args, constexprs) if _FITTING_CONFIG else None
    start = _FITTING_CONFIG.get(key, 0) if key is not None else 0
    for index in range(start, len(configs)):
        cfg = configs[index]
        try:
            _call_kernel(kernel, grid_of(cfg), args, constexprs, cfg)
        except OutOfResources:  # raised when the kernel is loaded, before anything runs
            continue
        if index != start:
            _FITTING_CONFIG[key or _fitting_key(kernel, configs, args, constexprs)] = index
        return cfg
    name = getattr(kernel, "__name__", None) or repr(kernel)
    raise RuntimeError(f"no tile config of {name} fits this GPU's shared memory / registers: {configs}")


# Launch plans (config lists, grids, row splits) per shape, so a repeated shape costs a dict lookup. The key
# holds the config functions themselves, so replacing one (benchmarks and tests monkeypatch them) makes new
# plans; they must be pure functions of their arguments. Bounded (many distinct M with dynamic shapes): when
# full it starts over, which is atomic, so threads need no lock (at worst two build the same plan).
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


def _plan(key: tuple, make) -> tuple:
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


# The C getter behind ``torch.backends.cuda.matmul.fp32_precision`` and ``torch.backends.fp32_precision``
# (torch >= 2.9): 0.1 µs a read where the attributes cost 0.8 µs (the Triton backend asks once per launch of
# an fp32 kernel). tests/test_host_path.py checks it answers as the attributes do.
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def _tf32_allowed() -> bool:
    """Whether torch's matmuls may use TF32 for float32, read as torch itself resolves it.

    torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; "none" inherits the global
    ``torch.backends.fp32_precision``, whose "none" means IEEE). Reading the legacy ``allow_tf32`` there
    raises once the new API has been used, so it is only the fallback for older torch.
    """
    if _fp32_precision is not None:
        precision = _fp32_precision("cuda", "matmul")
        return (_fp32_precision("generic", "all") if precision == "none" else precision) == "tf32"
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch itself would (:func:`_tf32_allowed`); fp16/bf16 ignore it."""
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _dropout_args(
    dropout_p: float, seed: torch.Tensor | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, int, float]:
    """``(seed_ptr, threshold, 1 / (1 - p))``: the int64 seed tensor on ``dummy``'s device (an int seed is
    made one); without dropout the pointer is ``dummy``, never read."""
    seed_ptr = dummy if dropout_p == 0.0 else seed_tensor(seed, dummy.device)
    return seed_ptr, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
