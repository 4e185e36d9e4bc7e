"""What must hold on a real GPU: strided bias, the device guard, torch's TF32 setting, no recompiles per seed,
cached launch plans and backend choices.

Most checks run here too (the Triton kernels through the interpreter); those that need one or two GPUs are
marked ``cuda`` and skip without them.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from helpers import HAS_TRITON, make_problem, requires_cuda

import lora_kernels
from lora_kernels import dispatch, dropout_mask, use_backend
from lora_kernels.ops import LoRAParams, cuda_lora, device_guard

#: Triton kernels run here: on a GPU, or on the CPU through the interpreter (conftest sets it where no GPU is).
TRITON_RUNS = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
requires_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="triton is not installed, or no GPU nor interpreter"
)
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")

#: Seeds whose low word is below and at/above 2**31 (the high word of a seed < 2**63 is always < 2**31).
SEEDS = (0, 1, 77, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**40 + 2**31 + 3, 2**62 + 2**32 - 2, 2**63 - 1)


# --------------------------------------------------------------------------------------------------
# 1. Strided bias (every backend through the kernels: test_lora_linear.py::test_strided_bias)
# --------------------------------------------------------------------------------------------------


def _bias_view(kind: str, n: int) -> torch.Tensor:
    if kind == "every_other":
        return torch.randn(2 * n)[::2]  # stride 2
    if kind == "column":
        return torch.randn(n, 3)[:, 1]  # stride 3
    return torch.randn(()).expand(n)  # stride 0


@pytest.mark.skipif(not cuda_lora.has_extension(), reason="the lora_kernels._C extension is not built")
@pytest.mark.parametrize("kind", ["every_other", "column", "expanded_scalar"])
def test_strided_bias_extension_ops(kind):
    """The extension's ops (their CPU implementation here; CUDA shares at::addmm for the bias) take any stride."""
    n = 40
    problem = make_problem((7,), 24, n, 4, bias=False)
    bias = _bias_view(kind, n)
    x, weight, lora_A, lora_B = (
        t.detach() for t in (problem.x, problem.weight, problem.lora_A, problem.lora_B)
    )
    y, _ = cuda_lora.lora_forward(x, weight, bias, lora_A, lora_B, LoRAParams(2.0))
    expected = lora_kernels.lora_linear_reference(x, weight, bias.contiguous(), lora_A, lora_B, 2.0)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# 2. Device guard
# --------------------------------------------------------------------------------------------------


def test_device_guard_is_a_no_op_off_cuda_and_on_the_current_device(monkeypatch):
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(device_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    guard = device_guard(torch.device("cuda", 1))  # built, not entered: needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@requires_triton
def test_triton_backend_runs_under_the_device_guard(monkeypatch, device):
    from lora_kernels.ops import triton_lora

    seen = []

    def recording_guard(dev):
        seen.append(dev)
        return contextlib.nullcontext()

    monkeypatch.setattr(triton_lora, "device_guard", recording_guard)
    problem = make_problem((5,), 16, 12, 4, device=device)
    with use_backend("triton"):
        y = lora_kernels.lora_linear(
            problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling
        )
    y.sum().backward()
    assert seen == [problem.x.device, problem.x.device]  # forward, backward


@requires_cuda
@requires_two_gpus
@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_kernels_run_on_the_tensors_device_not_the_current_one(backend_name):
    if backend_name not in lora_kernels.available_backends("cuda:1"):
        pytest.skip(f"backend {backend_name} is not available")
    torch.cuda.set_device(0)
    problem = make_problem((33,), 64, 48, 8, device="cuda:1")
    args = (problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling)
    with use_backend(backend_name):
        y = lora_kernels.lora_linear(*args, dropout_p=0.2, training=True, dropout_seed=2**31 + 9)
        grads = torch.autograd.grad(
            y, [problem.x, problem.lora_A, problem.lora_B, problem.bias], torch.ones_like(y)
        )
    with use_backend("torch"):
        y_ref = lora_kernels.lora_linear(*args, dropout_p=0.2, training=True, dropout_seed=2**31 + 9)
        grads_ref = torch.autograd.grad(
            y_ref, [problem.x, problem.lora_A, problem.lora_B, problem.bias], torch.ones_like(y_ref)
        )
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert y.device == torch.device("cuda", 1)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)  # TF32 tolerance
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------
# 3. TF32 from torch's current float32-precision API
# --------------------------------------------------------------------------------------------------

_HAS_FP32_PRECISION = hasattr(torch.backends, "fp32_precision")


@pytest.fixture
def restore_fp32_precision():
    matmul = torch.backends.cuda.matmul
    if _HAS_FP32_PRECISION:
        old = (matmul.fp32_precision, torch.backends.fp32_precision)
        yield
        matmul.fp32_precision, torch.backends.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old = matmul.allow_tf32
        yield
        matmul.allow_tf32 = old


@requires_triton
@pytest.mark.skipif(not _HAS_FP32_PRECISION, reason="torch < 2.9 has no fp32_precision API")
def test_input_precision_follows_fp32_precision_without_warnings(restore_fp32_precision, device):
    from lora_kernels.ops.triton_support import _input_precision

    matmul = torch.backends.cuda.matmul
    problem = make_problem((4,), 16, 8, 4, device=device)
    args = (problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matmul.fp32_precision = "ieee"
        assert _input_precision(torch.float32) == "ieee"
        with use_backend("triton"):
            lora_kernels.lora_linear(*args).sum().backward()
        matmul.fp32_precision = "tf32"
        assert _input_precision(torch.float32) == "tf32"
        with use_backend("triton"):
            lora_kernels.lora_linear(*args).sum().backward()
        assert _input_precision(torch.bfloat16) == "tf32"  # (ignored for half-precision inputs)
        # "none" inherits the global setting
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert _input_precision(torch.float32) == "tf32"
        torch.backends.fp32_precision = "ieee"
        assert _input_precision(torch.float32) == "ieee"


@requires_triton
def test_input_precision_falls_back_to_allow_tf32_on_old_torch(monkeypatch):
    from types import SimpleNamespace

    from lora_kernels.ops import triton_support
    from lora_kernels.ops.triton_support import _input_precision

    monkeypatch.setattr(triton_support, "_fp32_precision", None)  # old torch: no C getter either
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=True))  # no fp32_precision
    assert _input_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=False))
    assert _input_precision(torch.float32) == "ieee"


# --------------------------------------------------------------------------------------------------
# 4. One kernel signature for every seed (no recompiles mid-run)
# --------------------------------------------------------------------------------------------------


def _record_launches(monkeypatch) -> list[tuple]:
    from lora_kernels.ops import triton_support

    launches = []
    launch = triton_support._launch

    def recording(kernel, grid_of, configs, args, constexprs):
        cfg = launch(kernel, grid_of, configs, args, constexprs)
        launches.append((kernel, args, {**constexprs, **cfg}))
        return cfg

    monkeypatch.setattr(triton_support, "_launch", recording)
    return launches


def _specialization(kernel, args: tuple, kwargs: dict) -> tuple:
    """The specialisation Triton's JIT would key its compile cache on for this call (types + attributes)."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper: rebuild the JIT function
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    binder = create_function_from_signature(
        kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    call_kwargs = {k: v for k, v in kwargs.items() if k not in options}
    _, specialization, _ = binder(*args, **call_kwargs)
    return tuple(specialization), tuple(sorted(options.items()))


def _run_with_dropout(seed: int, device: str) -> None:
    problem = make_problem((20,), 24, 16, 4, device=device)
    with use_backend("triton"):
        y = lora_kernels.lora_linear(
            problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling,
            dropout_p=0.25, training=True, dropout_seed=seed,
        )  # fmt: skip
    y.sum().backward()


@requires_triton
def test_every_seed_gives_one_kernel_signature(monkeypatch, device):
    """The seed reaches Triton as a pointer to its int64 tensor whatever its value (nothing to specialise on),
    so no seed adds a compiled variant."""
    launches = _record_launches(monkeypatch)
    for seed in SEEDS:
        _run_with_dropout(seed, device)
    signatures: dict[str, set] = {}
    for kernel, args, kwargs in launches:
        names = kernel.arg_names if hasattr(kernel, "arg_names") else kernel.fn.__code__.co_varnames
        values = dict(zip(names, args, strict=False))
        assert -(2**31) <= values["dropout_threshold"] < 2**31, (kernel, values["dropout_threshold"])
        seed_arg = values["seed_ptr"]
        assert isinstance(seed_arg, torch.Tensor), (kernel, seed_arg)
        try:
            signature = _specialization(kernel, args, kwargs)
        except (ImportError, AttributeError, TypeError) as err:  # a triton whose internals moved
            pytest.skip(f"cannot rebuild Triton's specialisation here: {err!r}")
        signatures.setdefault(getattr(kernel, "__name__", repr(kernel)), set()).add(signature)
    assert len(launches) == 5 * len(SEEDS)
    assert {name: len(s) for name, s in signatures.items()} == {
        "_lora_linear_kernel": 2,  # forward (bias, no dropout) and dX (dropout epilogue)
        "_lora_project_kernel": 1,  # t (dropout)
        "_lora_reduce_rows_kernel": 2,  # dA (dropout) and s·dY·B + dB + dbias (one pass over dY, none)
    }


@requires_triton
@pytest.mark.parametrize("seed", [2**31, 2**32 - 1, 2**40 + 2**31 + 3, 2**63 - 1])
def test_kernel_mask_is_exact_for_seed_words_over_2_to_31(seed, device):
    """The int32 seed words are reinterpreted as uint32 in the kernel: same Philox bits as dropout_mask."""
    from lora_kernels.ops import triton_reduce

    M, K, p = 37, 16, 0.4
    x = torch.ones(M, K, device=device)
    with use_backend("triton"):
        t = triton_reduce._project(x, torch.eye(K, device=device), 1.0, p, seed)
    torch.testing.assert_close(t, dropout_mask(seed, (M, K), p, device=device), rtol=0, atol=1e-6)


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # triton >= 3.2: {device: (kernel_cache, ...)}
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in kernel.cache.values())  # older triton: {device: {key: kernel}}


@requires_cuda
@requires_triton
@pytest.mark.cuda
def test_no_recompiles_across_seeds_on_the_gpu():
    from lora_kernels.ops import triton_lora, triton_reduce

    kernels = [
        triton_lora._lora_linear_kernel,
        triton_reduce._lora_project_kernel,
        triton_reduce._lora_reduce_rows_kernel,
    ]
    _run_with_dropout(SEEDS[0], "cuda")  # compiles what this shape needs
    torch.cuda.synchronize()
    before = [_compiled_variants(k) for k in kernels]
    for seed in SEEDS[1:]:
        _run_with_dropout(seed, "cuda")
    torch.cuda.synchronize()
    assert [_compiled_variants(k) for k in kernels] == before


# --------------------------------------------------------------------------------------------------
# 5. Host overhead: cached launch plans and backend choices
# --------------------------------------------------------------------------------------------------


@requires_triton
def test_launch_plans_are_cached_per_shape(monkeypatch, device):
    from lora_kernels.ops import triton_lora, triton_reduce, triton_support

    calls = []
    smaller = triton_support._smaller_configs
    for module in (triton_lora, triton_reduce):  # the plans of the GEMM and of the skinny kernels
        monkeypatch.setattr(
            module, "_smaller_configs", lambda cfg, names: calls.append(1) or smaller(cfg, names)
        )
    monkeypatch.setattr(triton_support, "_PLANS", {})
    problem = make_problem((9,), 20, 12, 4, device=device)

    def step():
        with use_backend("triton"):
            y = lora_kernels.lora_linear(
                problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling
            )
        y.sum().backward()

    step()
    first = len(calls)
    assert first > 0
    step()
    assert len(calls) == first  # the second call of the same shape builds no config lists


@requires_triton
def test_a_replaced_config_function_is_used(monkeypatch, device):
    """The plan cache keys on the config functions, so a benchmark's monkeypatched one takes effect."""
    from lora_kernels.ops import triton_lora

    launches = _record_launches(monkeypatch)
    problem = make_problem((9,), 20, 40, 4, device=device)
    args = (problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling)
    with use_backend("triton"):
        lora_kernels.lora_linear(*args)
        preferred = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
        monkeypatch.setattr(triton_lora, "_linear_config", lambda M, N, K, element_size: dict(preferred))
        lora_kernels.lora_linear(*args)
    linear = [kwargs for kernel, _, kwargs in launches if kernel.__name__ == "_lora_linear_kernel"]
    assert linear[0]["BLOCK_N"] != 16 and linear[1]["BLOCK_N"] == 16


def test_host_helpers_match_triton():
    triton = pytest.importorskip("triton")
    from lora_kernels.ops.triton_support import _cdiv, _next_power_of_2

    for n in range(1, 300):  # (callers pass n >= 1)
        assert _next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 64):
            assert _cdiv(n, d) == triton.cdiv(n, d)


def test_backend_choice_is_cached_but_follows_requests(monkeypatch):
    calls = []
    reason = dispatch._unavailable_reason
    monkeypatch.setattr(dispatch, "_unavailable_reason", lambda *a: calls.append(a) or reason(*a))
    monkeypatch.setattr(dispatch, "_SELECTED", {})
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    auto = dispatch.select_backend(cpu, torch.float32, 8)
    n = len(calls)
    assert n > 0
    assert dispatch.select_backend(cpu, torch.float32, 8) == auto
    assert dispatch.select_backend(cpu, torch.float32, 16) == auto  # same answer for every rank <= 256
    assert len(calls) == n
    # run-time changes are honoured
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select_backend(cpu, torch.float32, 8) == "torch"
    with use_backend("auto"):
        assert dispatch.select_backend(cpu, torch.float32, 8) == auto
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("auto"):
        assert dispatch.select_backend(cpu, torch.float32, 8) == "torch"
    assert dispatch.select_backend(cpu, torch.float64, 8) == "torch"
    assert dispatch.select_backend(cpu, torch.float32, 300) == "torch"
    # errors are not cached: each request re-raises with its own message
    with use_backend("cuda"):
        for rank in (300, 301):
            with pytest.raises(RuntimeError, match=f"not {rank}"):
                dispatch.select_backend(cpu, torch.float32, rank)
