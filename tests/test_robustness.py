"""Bad input fails early and clearly; edge cases just work; numerics follow the reference exactly.

Validation names the bad argument (shapes, dtypes, devices, ``scaling``, ``dropout_p``, ``dropout_seed``);
the edge cases work as on nn.Linear (frozen inputs, accumulated gradients, in-place ops on the output, the
meta device); numerics: NaN and inf propagate as in the reference (an inf in ``x`` stays inf, LoRA and DoRA),
fp16 overflows as nn.Linear does, and a large ``scaling`` in float16 stays finite where PEFT's result does.
Then the module's copies and dtypes, and concurrency.
"""

import copy
import io
import pickle
import threading

import numpy as np
import pytest
import torch
from helpers import assert_close, make_problem, reference_outputs, requires_cuda, run_op
from torch import nn

import lora_kernels
from lora_kernels import (
    FusedLoRALinear,
    dora_linear,
    dropout_mask,
    lora_linear,
    lora_linear_reference,
    use_backend,
)
from lora_kernels.reference import dora_linear_reference


def _args(problem):
    return [problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling]


# ---------------------------------------------------------------- validation, before any kernel launch


@pytest.mark.parametrize(
    "position, bad, error, message",
    [
        (0, torch.randn(4, 7), ValueError, r"last dim of x \(shape \(4, 7\).*in_features=6"),
        (0, torch.randint(0, 3, (4, 6)), TypeError, r"x \(shape \(4, 6\), torch.int64.*floating-point"),
        (1, torch.randn(5, 6, 1), ValueError, r"weight .* must be 2-D"),
        (2, torch.randn(4), ValueError, r"bias \(shape \(4,\).*out_features=5"),
        (3, torch.randn(3, 7), ValueError, r"lora_A \(shape \(3, 7\).*in_features=6"),
        (3, torch.randn(0, 6), ValueError, r"rank r must be >= 1"),
        (4, torch.randn(5, 4), ValueError, r"lora_B \(shape \(5, 4\).*r=3"),
        (4, torch.randn(5, 3, dtype=torch.float64), TypeError, r"lora_A .* and lora_B .* share one dtype"),
        (1, torch.randn(5, 6, dtype=torch.float16), TypeError, r"share one dtype, as nn.Linear requires"),
        (1, torch.randn(5, 6, device="meta"), ValueError, r"weight .*meta.* is not on the device of x"),
        (5, float("nan"), ValueError, r"scaling must be a finite"),
        (5, float("inf"), ValueError, r"scaling must be a finite"),
        (0, [[1.0] * 6], TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(position, bad, error, message):
    args = _args(make_problem((4,), 6, 5, 3, bias=True))
    args[position] = bad
    with pytest.raises(error, match=message):
        lora_linear(*args)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_probability_outside_range(p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(*_args(make_problem((4,), 6, 5, 3)), dropout_p=p, training=True)


def test_fp64_runs_on_the_torch_path_and_matches():
    problem = make_problem((5,), 6, 4, 2, torch.float64)
    y = lora_linear(*_args(problem))
    expected = lora_linear_reference(*_args(problem))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "seed, error",
    [(2**63, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)],
)
def test_bad_dropout_seed_is_named(backend, seed, error):
    p = make_problem((4,), 6, 5, 3, device=backend.device)
    with use_backend(backend.name), pytest.raises(error, match="dropout_seed"):
        lora_linear(*_args(p), 0.1, True, dropout_seed=seed)


def test_good_dropout_seeds_are_taken(backend):
    p = make_problem((4,), 6, 5, 3, device=backend.device)
    with use_backend(backend.name):
        ys = [lora_linear(*_args(p), 0.5, True, dropout_seed=s) for s in (5, np.int64(5), 2**63 - 1)]
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize(
    "name, value",
    [("scaling", "2"), ("scaling", True), ("scaling", torch.tensor(2.0)), ("dropout_p", "0.1")],
)
def test_scaling_and_dropout_p_must_be_numbers(backend, name, value):
    p = make_problem((4,), 6, 5, 3, device=backend.device)
    kwargs = {"scaling": p.scaling, "dropout_p": 0.1, name: value}
    with use_backend(backend.name), pytest.raises(TypeError, match=name):
        lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, training=True, **kwargs)


def test_numeric_scalings_are_taken(backend):
    p = make_problem((4,), 6, 5, 3, device=backend.device)
    with use_backend(backend.name):
        ys = [lora_linear(*_args(p)[:5], s) for s in (2, 2.0, np.float32(2.0), np.float64(2.0))]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0])


# ------------------------------------------------------------------------------- edge cases that work


# Tests taking the ``backend`` fixture (conftest.py) run on every backend, with tensors on its device.


def test_x_without_grad_and_frozen_adapters(backend):
    problem = make_problem((7,), 9, 5, 2, device=backend.device)
    problem.x.requires_grad_(False)
    problem.lora_A.requires_grad_(False)
    with use_backend(backend.name):
        _, grads = run_op(problem, torch.ones(7, 5, device=backend.device))
    assert set(grads) == {"bias", "lora_B"}
    problem.lora_B.requires_grad_(False)
    problem.bias.requires_grad_(False)
    with use_backend(backend.name):
        y = lora_linear(*_args(problem))
    assert not y.requires_grad


def test_gradients_accumulate_into_existing_grad(backend):
    problem = make_problem((6,), 8, 5, 2, device=backend.device)
    with use_backend(backend.name):
        lora_linear(*_args(problem)).sum().backward()
        first = problem.lora_A.grad.clone()
        lora_linear(*_args(problem)).sum().backward()
    torch.testing.assert_close(problem.lora_A.grad, 2 * first)


def test_double_backward_is_a_clear_error():
    problem = make_problem((3,), 4, 5, 2)
    y = lora_linear(*_args(problem))
    (grad_x,) = torch.autograd.grad(y.sum(), problem.x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_deterministic_for_a_fixed_seed(backend):
    problem = make_problem((33,), 20, 18, 4, device=backend.device)
    grad_y = torch.randn(33, 18, device=backend.device)

    def once():
        torch.manual_seed(5)
        with use_backend(backend.name):
            return run_op(problem, grad_y, dropout_p=0.3, training=True)

    (y1, g1), (y2, g2) = once(), once()
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("lead", [(2, 7), (9,), ()], ids=["3d", "2d", "1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_output_takes_in_place_ops_and_keeps_gradients(backend, lead, dtype):
    """``y += 1; y *= 3`` on the output, as on nn.Linear's (PEFT's AdaLoRA does ``result += ...``)."""
    problem = make_problem(lead, 24, 20, 4, dtype, device=backend.device, weight_requires_grad=True)
    grad_y = torch.randn(*lead, 20, device=backend.device).to(dtype)
    with use_backend(backend.name):
        y = lora_linear(*_args(problem))
    y.add_(1.0)
    y.mul_(3.0)
    assert y._base is None and not y._is_view()  # no copy either: a new tensor in the (..., N) shape
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    grads = dict(zip(names, torch.autograd.grad(y, problem.leaves(), grad_y), strict=True))
    y_ref, grads_ref = reference_outputs(problem, 3 * grad_y)
    assert_close(y.detach(), (y_ref + 1) * 3, dtype, "y")
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, f"d{name}", 2.0)


def test_meta_inputs_give_meta_outputs(backend):
    """Shapes only, as nn.Linear on the meta device, whatever backend was asked for; backward too."""
    p = make_problem((3, 5), 16, 12, 4, device="meta", weight_requires_grad=True)
    with use_backend(backend.name):
        y = lora_linear(*_args(p), 0.1, True)
        assert y.device.type == "meta" and y.shape == (3, 5, 12) and y.dtype == torch.float32
        grads = torch.autograd.grad(y.sum(), p.leaves())
    for g, leaf in zip(grads, p.leaves(), strict=True):
        assert g.device.type == "meta" and g.shape == leaf.shape
    half = make_problem((7,), 16, 12, 4, torch.float16, device="meta")
    with use_backend(backend.name):
        assert lora_linear(*_args(half)).shape == (7, 12)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_more_than_2_to_31_elements_cuda(backend):
    """int64 offsets: x and y over 2**31 elements must not wrap (needs ~10 GB of GPU memory)."""
    M, K, N, r = 2**31 // 256 + 1, 256, 256, 8
    x = torch.randn(M, K, device=backend.device, dtype=torch.bfloat16)
    weight = torch.randn(N, K, device=backend.device, dtype=torch.bfloat16) / 16
    lora_A = torch.randn(r, K, device=backend.device, dtype=torch.bfloat16) / 16
    lora_B = torch.randn(N, r, device=backend.device, dtype=torch.bfloat16) / 4
    with use_backend(backend.name):
        y = lora_linear(x, weight, None, lora_A, lora_B, 2.0)
    tail = slice(M - 64, M)
    expected = lora_linear_reference(x[tail], weight, None, lora_A, lora_B, 2.0, upcast=True)
    torch.testing.assert_close(y[tail].double(), expected, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("where", ["x", "weight", "lora_A", "lora_B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_reference(backend, where, value):
    problem = make_problem((6,), 8, 5, 2, bias=False, device=backend.device)
    tensor = getattr(problem, where).detach().clone()
    tensor.view(-1)[3] = value
    setattr(problem, where, tensor)
    with use_backend(backend.name):
        y = lora_linear(*_args(problem), dropout_p=0.5, training=True, dropout_seed=1)
    mask = lora_kernels.dropout_mask(1, problem.x.shape, 0.5, device=backend.device)
    expected = lora_linear_reference(*_args(problem), dropout_mask=mask)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    assert torch.isnan(y).any() or torch.isinf(y).any()


def _assert_same_with_infinities(actual: torch.Tensor, expected: torch.Tensor, dtype, name: str) -> None:
    """The non-finite entries equal (inf with its sign, NaN where the reference has NaN), the rest close."""
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite entries differ"
    torch.testing.assert_close(actual[~finite], expected[~finite], equal_nan=True, msg=f"{name}: non-finite")
    if finite.any():
        assert_close(actual[finite], expected[finite], dtype, name, 4.0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("r", [4, 8, 20])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["inf", "-inf"])
def test_inf_in_x_stays_inf(backend, use_dora, r, sign):
    """All weights and dY >= 0, so every result is a finite number or an inf of one sign, never NaN."""
    device = backend.device
    M, K, N, s = 5, 24, 10, 0.5
    x = torch.rand(M, K, device=device)
    x[2, 7] = sign * float("inf")
    weight, bias = torch.rand(N, K, device=device), torch.rand(N, device=device)
    lora_A = torch.rand(r, K, device=device, requires_grad=True)
    lora_B = torch.rand(N, r, device=device, requires_grad=True)
    magnitude = (torch.rand(N, device=device) + 4.0).requires_grad_()
    x.requires_grad_()
    leaves = [x, lora_A, lora_B] + ([magnitude] if use_dora else [])
    grad_y = torch.rand(M, N, device=device)
    with use_backend(backend.name):
        if use_dora:
            y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, s)
        else:
            y = lora_linear(x, weight, bias, lora_A, lora_B, s)
        grads = torch.autograd.grad(y, leaves, grad_y)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    w64, b64 = weight.double(), bias.double()
    if use_dora:
        y_ref = dora_linear_reference(leaves64[0], w64, b64, *leaves64[1:3], leaves64[3], s)
    else:
        y_ref = lora_linear_reference(leaves64[0], w64, b64, *leaves64[1:3], s)
    grads_ref = torch.autograd.grad(y_ref, leaves64, grad_y.double())
    assert torch.isinf(y[2]).all() and not torch.isnan(y).any()
    _assert_same_with_infinities(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(["x", "A", "B", "m"], grads, grads_ref, strict=False):
        _assert_same_with_infinities(g, g_ref, torch.float32, f"d{name}")


def test_fp16_overflow_like_nn_linear(backend):
    half = dict(dtype=torch.float16, device=backend.device)
    x = torch.full((4, 64), 300.0, **half)
    weight = torch.full((3, 64), 300.0, **half)
    lora_A, lora_B = torch.zeros(2, 64, **half), torch.zeros(3, 2, **half)
    with use_backend(backend.name):
        y = lora_linear(x, weight, None, lora_A, lora_B, 1.0)
    assert torch.equal(y, nn.functional.linear(x, weight))
    assert torch.isinf(y).all()


@pytest.mark.parametrize("magnitude", [1e-6, 1e6])
def test_large_and_small_magnitudes_keep_relative_error(backend, magnitude):
    problem = make_problem((40,), 64, 48, 8, device=backend.device)
    problem.x = (problem.x.detach() * magnitude).requires_grad_()
    with use_backend(backend.name):
        y = lora_linear(*_args(problem))
    expected = lora_linear_reference(*_args(problem), upcast=True)
    plain = lora_linear_reference(*_args(problem))  # plain PyTorch in the same dtype
    ours = ((y.double() - expected).abs().max() / expected.abs().max()).item()
    torch_error = ((plain.double() - expected).abs().max() / expected.abs().max()).item()
    assert ours <= 4 * torch_error + 1e-7


def _large_scaling_problem(device, adapter_dtype):
    """fp16, s = 1e4, |x·Aᵀ| up to ~30 (s·x·Aᵀ ~ 3e5 overflows fp16), B small: PEFT's result is ~±500."""
    torch.manual_seed(0)
    p = make_problem((4, 8), 64, 48, 4, torch.float16, adapter_dtype, device=device, scaling=1e4)
    with torch.no_grad():
        p.lora_A.copy_(torch.randn(4, 64, dtype=torch.float64) * 0.8)
        p.lora_B.copy_(torch.randn(48, 4, dtype=torch.float64) * 2e-3)
    return p


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=["fp16-adapters", "fp32"])
def test_large_scaling_in_fp16_stays_finite_where_peft_does(backend, adapter_dtype):
    p = _large_scaling_problem(backend.device, adapter_dtype)
    x, w, b = p.x.detach(), p.weight.detach(), p.bias.detach()
    A, B = p.lora_A.detach().half(), p.lora_B.detach().half()
    t_scaled = (x.float() @ A.float().t()) * p.scaling
    assert t_scaled.abs().max() > torch.finfo(torch.float16).max  # s·x·Aᵀ does not fit fp16
    peft = torch.nn.functional.linear(x, w, b) + (x @ A.t()) @ B.t() * p.scaling  # all in fp16
    assert torch.isfinite(peft).all()

    grad_y = torch.randn(4, 8, 48, device=backend.device).half()
    with use_backend(backend.name):
        for p_drop in (0.0, 0.2):
            training = p_drop > 0
            y, grads = run_op(p, grad_y, dropout_p=p_drop, training=training, dropout_seed=3)
            assert torch.isfinite(y).all(), f"dropout_p={p_drop}: y overflowed"
            mask = dropout_mask(3, x.shape, p_drop, device=x.device) if training else None
            y_ref, grads_ref = reference_outputs(p, grad_y, mask)
            assert_close(y, y_ref, torch.float16, f"y (dropout_p={p_drop})", 2.0)
            if adapter_dtype == torch.float32:  # fp16 adapters: dB itself is beyond fp16, as in PEFT
                for name, g in grads.items():
                    assert torch.isfinite(g).all(), name
                    assert_close(g, grads_ref[name], torch.float16, f"d{name}", 4.0)


def test_large_scaling_in_fp16_extension_ops_on_cpu():
    """The extension backend's own ops (their CPU implementation; the CUDA one shares its forward GEMMs)."""
    from lora_kernels.ops import LoRAParams, cuda_lora

    if not cuda_lora.has_extension():
        pytest.skip("the lora_kernels._C extension is not built")
    p = _large_scaling_problem("cpu", torch.float32)
    x, w, b, A, B = (t.detach() for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B))
    x2d = x.reshape(-1, 64)
    params = LoRAParams(p.scaling)
    y, t = cuda_lora.lora_forward(x2d, w, b, A, B, params)
    grad_y = torch.randn_like(y)
    grads = cuda_lora.lora_backward(grad_y, x2d, w, A, B, t, params, (True, False, True, True, True))
    problem_2d = make_problem((32,), 64, 48, 4, torch.float16, torch.float32, scaling=p.scaling)
    for name, value in zip(("x", "weight", "bias", "lora_A", "lora_B"), (x2d, w, b, A, B), strict=True):
        setattr(problem_2d, name, value.clone().requires_grad_())
    y_ref, grads_ref = reference_outputs(problem_2d, grad_y)
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, torch.float16, "y", 2.0)
    for name, g in zip(("x", "lora_A", "lora_B"), grads[:3], strict=True):  # dW, db: lora_kernels.ops
        assert_close(g, grads_ref[name], torch.float16, f"d{name}", 4.0)


# ------------------------------------------------------------------------------------ module robustness


def _model():
    return nn.Sequential(FusedLoRALinear(12, 10, r=3, init_lora_weights=False), nn.ReLU(), nn.Linear(10, 2))


def test_deepcopy_and_pickle_keep_outputs():
    model = _model()
    x = torch.randn(5, 12)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x))
        assert clone[0].lora_A.data_ptr() != model[0].lora_A.data_ptr()


def test_torch_save_load_whole_model():
    model = _model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 12)
    torch.testing.assert_close(loaded(x), model(x))
    assert isinstance(loaded[0], FusedLoRALinear)


def test_to_dtype():
    layer = FusedLoRALinear(12, 10, r=3, init_lora_weights=False)
    half = copy.deepcopy(layer).to(torch.float16)
    assert half.weight.dtype == half.lora_A.dtype == torch.float16
    x = torch.randn(4, 12)
    torch.testing.assert_close(half(x.half()).float(), layer(x), atol=5e-3, rtol=5e-3)
    assert not half.weight.requires_grad and half.lora_A.requires_grad


@requires_cuda
@pytest.mark.cuda
def test_to_device_cuda():
    layer = FusedLoRALinear(12, 10, r=3, init_lora_weights=False)
    x = torch.randn(4, 12)
    gpu = copy.deepcopy(layer).to("cuda")
    torch.testing.assert_close(gpu(x.cuda()).cpu(), layer(x), atol=1e-4, rtol=1e-4)


def test_merge_unmerge_within_rounding_in_half_precision():
    layer = FusedLoRALinear(64, 48, r=8, init_lora_weights=False, dtype=torch.float16)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    delta = layer.delta_weight().abs().max().item()
    eps = torch.finfo(torch.float16).eps
    bound = 2 * eps * (delta + original.abs().max().item())
    assert (layer.weight.float() - original.float()).abs().max().item() <= bound


# ------------------------------------------------------------------------------------------ concurrency


def test_two_threads_at_once(backend):
    problems = [make_problem((17,), 20, 14, 3, device=backend.device) for _ in range(2)]
    expected = [lora_linear_reference(*_args(p), upcast=True) for p in problems]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            with use_backend(backend.name):
                for _ in range(5):
                    results[i] = lora_linear(*_args(problems[i])).detach()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for result, reference in zip(results, expected, strict=True):
        torch.testing.assert_close(result.double(), reference, atol=1e-5, rtol=1e-5)


def test_two_processes_start_together(tmp_path):
    """Two processes importing the package and JIT-compiling the same Triton kernel into one fresh cache
    at the same moment both succeed (Triton's file cache is the build step shared between processes; the
    C++/CUDA extension is built ahead of time by pip, so importing it involves no build)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys; sys.path.insert(0, 'tools'); import compile_kernels as c, lora_kernels, torch\n"
        "from lora_kernels.ops import LoRAParams, cuda_lora\n"
        "c.compile_kernel('_lora_linear_kernel', 'bf16', True, {'FUSE_PROJECT': False}, 90)\n"
        "if cuda_lora.has_extension():\n"
        "    x, w, a, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)\n"
        "    y, _ = cuda_lora.lora_forward(x, w, None, a, b, LoRAParams(2.0))\n"
        "    assert torch.allclose(y, x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and out.strip().endswith("ok"), out
