"""Direct launch of cached compiled kernels (issue 19, item 3; ``triton_support._call_kernel``).

On the CPU the compiled path cannot run, so these tests put fake kernels in the place of the JITFunctions:
each carries a binder that Triton itself builds from the real kernel's signature (the function
JITFunction.run calls to bind and specialize the arguments), and compiles a fake kernel per Triton cache key
``(str(specialization), str(options))``, as run does. So the tests check against Triton's own rules, in the
version installed: a direct launch must use the compiled kernel Triton would have used for those arguments,
with exactly the arguments run passes to its launcher. The last test compares the real direct path with
``kernel[grid]`` bit for bit on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
from helpers import make_problem

pytest.importorskip("triton")
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction, create_function_from_signature

from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce, triton_support

try:
    from triton.backends.nvidia.compiler import CUDABackend as _BACKEND
except ImportError:  # pragma: no cover
    from triton.backends.compiler import BaseBackend as _BACKEND

_STREAM = 7
_NEEDS = (True, False, True, True, True)  # dX, -, db, dA, dB


def _detached(p) -> tuple:
    return (*(t.detach() if t is not None else None for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B)),
            p.scaling)  # fmt: skip


def _jit(kernel) -> JITFunction:
    """The JITFunction behind ``kernel`` (under the interpreter, ``triton.jit`` gives an InterpretedFunction)."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)


class FakeCompiled:
    """A loaded CompiledKernel: records each launch with the Triton key it was compiled for."""

    def __init__(self, owner, key):
        self.owner, self.key = owner, key
        self.function, self.packed_metadata = object(), (4, 1, 0)
        self.fail = False

    def run(self, *launch):
        if self.fail:
            raise RuntimeError("launcher refused")
        self.owner.direct.append((self, launch))


class FakeKernel:
    """What JITFunction.run reads of a kernel, with its launch done by a fake: the binder is Triton's."""

    def __init__(self, kernel):
        jit = _jit(kernel)
        self.__name__ = jit.__name__
        self.params, self.arg_names, self.debug = jit.params, jit.arg_names, jit.debug
        self.pre_run_hooks, self.used_global_vals = [], {}
        self.binder = create_function_from_signature(jit.signature, jit.params, _BACKEND)
        self.device_caches = {0: ({}, {}, GPUTarget("cuda", 90, 32), _BACKEND, self.binder)}
        self.compiled: dict[tuple, FakeCompiled] = {}
        self.slow: list[tuple] = []  # (Triton key, bound arguments) per kernel[grid] launch
        self.direct: list[tuple] = []  # (compiled kernel, launcher arguments) per direct launch
        self.too_big = None  # a BLOCK_M whose kernel[grid] raises OutOfResources

    def triton_key(self, args, kwargs):
        """JITFunction.run's cache key (compute_cache_key), as strings so that True and 1 differ."""
        kwargs = dict(kwargs, debug=self.debug or knobs.runtime.debug)
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, spec, options = self.binder(*args, **kwargs)
        return (str(spec), str(options)), bound

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key, bound = self.triton_key(args, kwargs)
            if kwargs.get("BLOCK_M") == self.too_big:
                raise OutOfResources(1 << 20, 1 << 16, "shared memory")
            self.slow.append((key, tuple(bound.values())))
            return self.compiled.setdefault(key, FakeCompiled(self, key))

        return launch


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU: no interpreter, device 0, stream ``_STREAM``, a fresh direct-launch cache."""
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)
    monkeypatch.setattr(triton_support, "_DIRECT", {})
    monkeypatch.delenv(triton_support._DIRECT_LAUNCH_ENV, raising=False)
    state = triton_support._DirectState
    for name, value in dict(off=False, ready=True, get_device=lambda: 0, get_stream=lambda device: _STREAM,
                            runtime=knobs.runtime, compilation=knobs.compilation,
                            hook_chain=getattr(knobs, "HookChain", None)).items():  # fmt: skip
        monkeypatch.setattr(state, name, value)


def _reduce_args(a, M=64, P=48, R=16, scale=1.0, threshold=123) -> tuple:
    """Positional arguments of ``_lora_reduce_rows_kernel`` (pointers, sizes, strides, scalars)."""
    c = torch.zeros(64, R, dtype=a.dtype)  # (M only as an argument: any value, nothing runs)
    out = torch.zeros(P, R)
    return (a, c, out, out, a, out, c, out, M, P, R, M, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
            0, 0, 0, 0, R, 1, scale, out, threshold, 0)  # fmt: skip


_CONSTEXPRS = dict(
    HAS_DROPOUT=False, HAS_COLSUM=True, HAS_PRODSUM=False, PROJECT=False, INPUT_PRECISION="ieee"
)
_CFG = dict(BLOCK_M=64, BLOCK_P=64, BLOCK_R=16, num_warps=4, num_stages=3)


def _variants() -> list[tuple]:
    """Launches that differ in one thing Triton specializes on (or does not, where noted)."""
    storage = torch.zeros(64 * 48 + 8, dtype=torch.float16)
    aligned = storage[: 64 * 48].view(64, 48)
    misaligned = storage[1 : 64 * 48 + 1].view(64, 48)  # 2 bytes off: not a multiple of 16
    off8 = storage[4 : 64 * 48 + 4].view(64, 48)  # 8 bytes off: not a multiple of 16 either
    shifted = storage[8 : 64 * 48 + 8].view(64, 48)  # 16 bytes off: aligned, another address
    base = (_reduce_args(aligned), _CONSTEXPRS, _CFG)
    out = [base, *((_reduce_args(view), _CONSTEXPRS, _CFG) for view in (misaligned, off8, shifted))]
    out.append((_reduce_args(aligned.float()), _CONSTEXPRS, _CFG))
    out.append((_reduce_args(aligned.to(torch.bfloat16)), _CONSTEXPRS, _CFG))
    for M in (1, 16, 17, 32, 2**31 - 16, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**63, 2**64 - 16):
        out.append((_reduce_args(aligned, M=M), _CONSTEXPRS, _CFG))
    for threshold in (1, 16, 17, 2**31):  # dropout_threshold: do_not_specialize (i32 / i64 only)
        out.append((_reduce_args(aligned, threshold=threshold), _CONSTEXPRS, _CFG))
    out.append((_reduce_args(aligned, scale=2.0), _CONSTEXPRS, _CFG))  # floats: not specialized
    for name, value in [("HAS_DROPOUT", True), ("HAS_COLSUM", 1), ("HAS_COLSUM", False),
                        ("INPUT_PRECISION", "tf32"), ("PROJECT", 0)]:  # fmt: skip
        out.append((base[0], dict(_CONSTEXPRS, **{name: value}), _CFG))
    for name, value in [("BLOCK_M", 32), ("BLOCK_R", 32), ("num_warps", 8), ("num_stages", 2)]:
        out.append((base[0], _CONSTEXPRS, dict(_CFG, **{name: value})))
    return out


def _expected_launch(fake, grid, args, constexprs, cfg) -> tuple:
    """The launcher call JITFunction.run makes for these arguments (hooks and metadata None)."""
    _, bound = fake.triton_key(args, {**constexprs, **cfg})
    fn = fake.compiled[fake.triton_key(args, {**constexprs, **cfg})[0]]
    return (*grid, _STREAM, fn.function, fn.packed_metadata, None, None, None, *bound.values())


def test_arg_key_at_least_as_fine_as_triton():
    """Equal keys of two arguments imply equal specializations by Triton (native_specialize_impl)."""
    from triton._C.libtriton import native_specialize_impl

    t = torch.zeros(64, dtype=torch.float16)
    values = [t, t[1:], t[4:], t[8:], t.float(), t.to(torch.bfloat16), t.int(), 0, 1, -1, 2, 15, 16, 17, -16, 48,
              2**31 - 16, 2**31 - 1, 2**31, 2**32, -(2**31), -(2**31) - 1, -(2**31) - 16, 2**62, 2**63 - 16,
              2**63, 2**64 - 16, 2**64 - 1, 0.0, 1.0, -0.0, 2.5, True, False, None]  # fmt: skip
    for a, b in itertools.combinations(values, 2):
        if triton_support._arg_key(a) != triton_support._arg_key(b):
            continue
        for flags in itertools.product((False, True), repeat=3):  # is_const, specialize, align
            spec_a = native_specialize_impl(_BACKEND, a, *flags)
            spec_b = native_specialize_impl(_BACKEND, b, *flags)
            assert str(spec_a) == str(spec_b), (a, b, flags)


def test_key_separates_what_triton_specializes_on(compiled_mode):
    """Every launch, in any order, uses the compiled kernel of its own Triton key; launches that Triton
    keys differently never share a direct-launch key, and repeats go direct."""
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    variants = _variants()
    for order in (variants, variants[::-1], variants):
        for args, constexprs, cfg in order:
            direct_before = len(fake.direct)
            triton_support._call_kernel(fake, (3, 2), args, constexprs, cfg)
            key, _ = fake.triton_key(args, {**constexprs, **cfg})
            if len(fake.direct) > direct_before:
                compiled, launch = fake.direct[-1]
                assert compiled.key == key
                assert launch == _expected_launch(fake, (3, 2, 1), args, constexprs, cfg)
            else:
                assert fake.slow[-1][0] == key
    ours = {triton_support._direct_key(fake, 0, *v) for v in variants}
    theirs = {fake.triton_key(v[0], {**v[1], **v[2]})[0] for v in variants}
    assert len(fake.slow) == len(ours)  # each key's first launch only; the repeats all went direct
    assert len(fake.direct) == 3 * len(variants) - len(ours)
    assert len(fake.compiled) == len(theirs) >= 18  # (M = 16 / 32 and the like share Triton's)
    keys = {}
    for args, constexprs, cfg in variants:  # a direct-launch key never covers two of Triton's
        mine = triton_support._direct_key(fake, 0, args, constexprs, cfg)
        assert keys.setdefault(mine, fake.triton_key(args, {**constexprs, **cfg})[0]) == keys[mine]


def test_direct_arguments_are_runs(compiled_mode):
    """The direct launch passes what run passes: grid padded to 3-D, the stream, function, packed metadata,
    then every argument in the signature's order, constexprs included."""
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    args = _reduce_args(torch.zeros(64, 48))
    triton_support._call_kernel(fake, (5,), args, _CONSTEXPRS, _CFG)
    triton_support._call_kernel(fake, (5,), args, _CONSTEXPRS, _CFG)
    (compiled, launch), = fake.direct  # fmt: skip
    assert launch[:9] == (5, 1, 1, _STREAM, compiled.function, compiled.packed_metadata, None, None, None)
    assert launch[9:] == fake.slow[0][1]
    assert all(x is y for x, y in zip(launch[9 : 9 + len(args)], args, strict=True))
    assert launch[9 + len(args) :] == (False, True, False, False, "ieee", 64, 64, 16)


def test_real_launchers_go_direct(compiled_mode, monkeypatch):
    """The forward and backward launchers, kernels faked: a repeated call launches each kernel directly,
    with run's arguments and the compiled kernel of its own Triton key."""
    fakes = {}
    for module, name in ((triton_lora, "_lora_linear_kernel"), (triton_reduce, "_lora_project_kernel"),
                         (triton_reduce, "_lora_reduce_rows_kernel")):  # fmt: skip
        fakes[name] = FakeKernel(getattr(module, name))
        monkeypatch.setattr(module, name, fakes[name])
    x, weight, bias, lora_A, lora_B, scaling = _detached(make_problem((33,), 40, 24, 4))
    params = LoRAParams(scaling, 0.1, 5)

    def step():
        y, t = triton_lora.lora_forward(x, weight, bias, lora_A, lora_B, params)
        triton_lora.lora_backward(torch.ones_like(y), x, weight, lora_A, lora_B, t, params, _NEEDS)

    step()
    slow = {name: len(f.slow) for name, f in fakes.items()}
    assert all(slow.values()) and not any(f.direct for f in fakes.values())
    step()
    for name, fake in fakes.items():
        assert len(fake.slow) == slow[name] and len(fake.direct) == slow[name], name
        for compiled, launch in fake.direct:
            assert compiled.key in fake.compiled
            assert launch[3:9] == (_STREAM, compiled.function, compiled.packed_metadata, None, None, None)


def test_failed_direct_launch_falls_back_for_good(compiled_mode):
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    args = _reduce_args(torch.zeros(64, 48))
    triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    next(iter(fake.compiled.values())).fail = True
    with pytest.warns(RuntimeWarning, match="direct launch"):
        triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    assert len(fake.slow) == 2 and not fake.direct and triton_support._DirectState.off
    next(iter(fake.compiled.values())).fail = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    assert len(fake.slow) == 3 and not fake.direct


def test_error_after_a_working_direct_launch_propagates(compiled_mode):
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    args = _reduce_args(torch.zeros(64, 48))
    for _ in range(2):
        triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    next(iter(fake.compiled.values())).fail = True
    with pytest.raises(RuntimeError, match="launcher refused"):
        triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    assert not triton_support._DirectState.off


def test_out_of_resources_still_walks_the_configs(compiled_mode, monkeypatch):
    monkeypatch.setattr(triton_support, "_FITTING_CONFIG", {})
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    fake.too_big = 64
    args = _reduce_args(torch.zeros(64, 48))
    configs = triton_support._Configs(triton_support._smaller_configs(dict(_CFG, num_stages=2), ("BLOCK_M",)))
    for _ in range(3):
        cfg = triton_support._launch(fake, lambda cfg: (2,), configs, args, _CONSTEXPRS)
        assert cfg["BLOCK_M"] == 32
    assert len(fake.slow) == 1 and len(fake.direct) == 2


@pytest.mark.parametrize("what", ["enter_hook", "exit_hook", "pre_run_hook", "global", "callable_grid"])
def test_hooks_and_changed_globals_take_kernel_grid(compiled_mode, monkeypatch, what):
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    namespace = {"G": 1}
    fake.used_global_vals = {("G", id(namespace)): (1, namespace)}
    args = _reduce_args(torch.zeros(64, 48))
    grid = (2,)
    triton_support._call_kernel(fake, grid, args, _CONSTEXPRS, _CFG)
    hook = lambda *a, **k: None
    if what == "enter_hook":
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    elif what == "exit_hook":
        monkeypatch.setattr(knobs.runtime.launch_exit_hook, "calls", [hook])
    elif what == "pre_run_hook":
        fake.pre_run_hooks.append(hook)
    elif what == "global":
        namespace["G"] = 2
    else:
        grid = lambda meta: (2,)
    triton_support._call_kernel(fake, grid, args, _CONSTEXPRS, _CFG)
    assert len(fake.slow) == 2 and not fake.direct


def test_opt_out_env(compiled_mode, monkeypatch):
    monkeypatch.setenv(triton_support._DIRECT_LAUNCH_ENV, "0")
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    args = _reduce_args(torch.zeros(64, 48))
    for _ in range(3):
        triton_support._call_kernel(fake, (2,), args, _CONSTEXPRS, _CFG)
    assert len(fake.slow) == 3 and not fake.direct and triton_support._DirectState.off


def test_unmodelled_arguments_take_kernel_grid(compiled_mode):
    """Anything the key does not model (a float constexpr, an object argument, another backend)."""
    fake = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    args = _reduce_args(torch.zeros(64, 48))
    odd = [(args, dict(_CONSTEXPRS, INPUT_PRECISION=0.5), _CFG), ((*args[:-1], object()), _CONSTEXPRS, _CFG)]
    for call in odd * 2:
        with contextlib.suppress(TypeError):  # the binder refuses the object argument, as run would
            triton_support._call_kernel(fake, (2,), *call)
    assert not fake.direct
    amd = FakeKernel(triton_reduce._lora_reduce_rows_kernel)
    amd.device_caches = {0: ({}, {}, GPUTarget("hip", "gfx942", 64), _BACKEND, amd.binder)}
    for _ in range(2):
        triton_support._call_kernel(amd, (2,), args, _CONSTEXPRS, _CFG)
    assert len(amd.slow) == 2 and not amd.direct


def test_interpreter_never_takes_the_direct_path(monkeypatch):
    """Under TRITON_INTERPRET=1 every launch is kernel[grid]; no key is made and the driver is never read."""
    if not triton_support.interpreting():
        pytest.skip("runs under the interpreter")
    monkeypatch.setattr(triton_support, "_DIRECT", {})
    x, weight, bias, lora_A, lora_B, scaling = _detached(make_problem((9,), 20, 12, 4))
    for _ in range(2):
        triton_lora.lora_forward(x, weight, bias, lora_A, lora_B, LoRAParams(scaling))
    assert triton_support._DIRECT == {} and not triton_support._DirectState.ready


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 16, 33, 700])  # 700: the row reduction splits its rows (finalize kernel)
def test_direct_launch_matches_kernel_grid_bitwise(monkeypatch, dtype, M):
    """On a GPU: forward and backward through direct launches give the bits of kernel[grid] launches, with
    16-byte-aligned inputs and with views 2-4 bytes off, the aligned ones launched first (a key that mixed
    them up would run the aligned build on misaligned pointers)."""
    torch.manual_seed(0)
    x, weight, bias, lora_A, lora_B, scaling = _detached(make_problem((M,), 72, 40, 8, dtype, device="cuda"))
    grad_y = torch.randn(M, 40, device="cuda", dtype=dtype)

    def view(t, offset):
        flat = torch.empty(t.numel() + offset, device=t.device, dtype=t.dtype)
        return flat[offset:].view(t.shape).copy_(t)

    inputs = {off: [view(t, off) for t in (x, weight, lora_A, lora_B, grad_y)] for off in (0, 1)}

    def step(params, off):
        x, weight, lora_A, lora_B, grad_y = inputs[off]
        y, t = triton_lora.lora_forward(x, weight, bias, lora_A, lora_B, params)
        return (y, t, *triton_lora.lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, _NEEDS))

    for dropout_p in (0.0, 0.25):
        params = LoRAParams(scaling, dropout_p, 1234)
        monkeypatch.setattr(triton_support._DirectState, "off", True)
        slow = {off: step(params, off) for off in (0, 1)}
        monkeypatch.setattr(triton_support._DirectState, "off", False)
        monkeypatch.setattr(triton_support, "_DIRECT", {})
        for off in (0, 1):
            step(params, off)  # each key's first launch: kernel[grid], its compiled kernel remembered
            direct = step(params, off)
            assert any(e is not None and e.tried for e in triton_support._DIRECT.values()), "no direct launch"
            for a, b in zip(slow[off], direct, strict=True):
                assert (a is None and b is None) or torch.equal(a, b), (dropout_p, off)
        assert not triton_support._DirectState.off
