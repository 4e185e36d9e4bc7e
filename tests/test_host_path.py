"""The lean host path (issue 19, item 3).

The per-signature call plan of ``lora_linear`` (validation and backend choice once per signature): a cached
signature must raise exactly what the uncached check raises, never let a bad input through because a
similar one passed before, stay bounded, give the same bits as an uncached call, and stay out of
``torch.compile``'s graph (no guard, no break). The Triton backward's casts folded into its kernels: the
same bits as the sums and casts done after the kernels.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_problem

from lora_kernels import functional, lora_linear, use_backend
from lora_kernels.ops.routing import use_path

TRITON_ONLY = pytest.mark.parametrize("backend", ["triton"], indirect=True)


@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch):
    monkeypatch.setattr(functional, "_CALL_PLANS", {})


def _args(p):
    return [p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling]


def _uncached_error(args, dropout_p=0.0):
    with pytest.raises((TypeError, ValueError)) as info:
        functional.check_inputs(*args, dropout_p)
    return type(info.value), str(info.value)


# Each bad input keeps the shapes (and strides) of a good call made first, so only what differs is checked.
_SAME_SHAPE_BAD = [
    ("other dtype of x", 0, lambda t: t.detach().half().requires_grad_()),
    ("other dtype of lora_B", 4, lambda t: t.detach().double().requires_grad_()),
    ("other device of weight", 1, lambda t: torch.empty_like(t, device="meta")),
    ("transposed x of the same shape", 0, lambda t: torch.randn(6, 4).t().to(torch.int32)),
    ("a list for x", 0, lambda t: t.tolist()),
]


@pytest.mark.parametrize("what, position, make_bad", _SAME_SHAPE_BAD, ids=[c[0] for c in _SAME_SHAPE_BAD])
def test_a_cached_signature_never_lets_a_bad_input_through(what, position, make_bad):
    args = _args(make_problem((4,), 6, 5, 3))
    lora_linear(*args)  # a good call of these shapes, now cached
    lora_linear(*args)
    assert len(functional._CALL_PLANS) == 1
    args[position] = make_bad(args[position])
    error, message = _uncached_error(args)
    for _ in range(2):  # a bad signature is never stored: the same error every time
        with pytest.raises(error) as info:
            lora_linear(*args)
        assert str(info.value) == message
    assert len(functional._CALL_PLANS) == 1


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf")])
def test_the_scaling_is_checked_on_every_call(scaling):
    args = _args(make_problem((4,), 6, 5, 3))
    lora_linear(*args)
    args[5] = scaling
    with pytest.raises(ValueError, match="scaling must be a finite") as info:
        lora_linear(*args)
    assert str(info.value) == _uncached_error(args)[1]


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_a_bad_dropout_p_after_a_good_one(p):
    args = _args(make_problem((4,), 6, 5, 3))
    lora_linear(*args, dropout_p=0.1, training=True)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(*args, dropout_p=p, training=True)


@pytest.mark.parametrize("scalar", [True, "2.0", torch.tensor(2.0)])
def test_scalars_of_other_types_are_checked_uncached(scalar):
    args = _args(make_problem((4,), 6, 5, 3))
    lora_linear(*args)
    args[5] = scalar
    error, message = _uncached_error(args)
    with pytest.raises(error) as info:
        lora_linear(*args)
    assert str(info.value) == message


def test_validation_runs_once_per_signature(monkeypatch):
    calls = []
    check = functional.check_inputs
    monkeypatch.setattr(functional, "check_inputs", lambda *a: calls.append(1) or check(*a))
    p = make_problem((4,), 6, 5, 3)
    for _ in range(3):
        lora_linear(*_args(p))
    assert len(calls) == 1
    x_t = torch.randn(6, 4).t().requires_grad_()  # same shape, other strides: a new signature
    lora_linear(x_t, *_args(p)[1:])
    lora_linear(p.x.detach(), *_args(p)[1:])  # other requires_grad
    lora_linear(*_args(p), dropout_p=0.2, training=True)  # dropout on
    lora_linear(*_args(p), dropout_p=0.2, training=False)
    assert len(calls) == 5
    with use_backend("torch"):  # another backend asked for
        lora_linear(*_args(p))
    assert len(calls) == 6


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(functional, "_MAX_CALL_PLANS", 4)
    p = make_problem((4,), 6, 5, 3)
    for rows in range(1, 12):
        lora_linear(torch.randn(rows, 6), *_args(p)[1:])
        assert len(functional._CALL_PLANS) <= 4


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_results_are_identical_with_and_without_the_cache(backend, dropout_p):
    p = make_problem((2, 3), 12, 10, 4, device=backend.device)

    def run():
        with use_backend(backend.name):
            y = lora_linear(*_args(p), dropout_p=dropout_p, training=True, dropout_seed=7)
        return (y, *torch.autograd.grad(y.square().sum(), [p.x, p.lora_A, p.lora_B]))

    functional._CALL_PLANS.clear()
    uncached = run()  # the first call of a signature: validated and planned
    for _ in range(2):
        cached = run()
        for a, b in zip(cached, uncached, strict=True):
            assert torch.equal(a, b)


def _paths_run(monkeypatch) -> list[tuple[str, str]]:
    """The (backend, path) of each forward and backward that runs from now on."""
    from lora_kernels import ops

    runs = []
    real = ops.path_functions
    monkeypatch.setattr(
        ops, "path_functions", lambda backend, path: runs.append((backend, path)) or real(backend, path)
    )
    return runs


def test_settings_changed_after_a_cached_call_take_effect(monkeypatch):
    """The plan caches the backend and the path per signature; changing what chooses them (use_path,
    LORA_KERNELS_PATH, use_backend, LORA_KERNELS_BACKEND) between calls of one signature changes them."""
    monkeypatch.delenv("LORA_KERNELS_PATH", raising=False)
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    runs = _paths_run(monkeypatch)
    p = make_problem((4,), 6, 5, 3)  # CPU, fp32: auto takes triton (the interpreter) and its split path
    lora_linear(*_args(p))
    assert runs[-1] == ("triton", "split")
    with use_path("fused"):
        lora_linear(*_args(p))
    assert runs[-1] == ("triton", "fused")
    monkeypatch.setenv("LORA_KERNELS_PATH", "fused")
    lora_linear(*_args(p))
    assert runs[-1] == ("triton", "fused")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")  # which offers the split path only
    with pytest.raises(RuntimeError, match="path 'fused' was requested"):
        lora_linear(*_args(p))
    monkeypatch.delenv("LORA_KERNELS_PATH")
    lora_linear(*_args(p))
    assert runs[-1] == ("torch", "split")
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    lora_linear(*_args(p))
    assert runs[-1] == ("triton", "split")


@pytest.mark.parametrize("fast", [True, False])
def test_environ_reader_follows_os_environ(monkeypatch, fast):
    """dispatch.environ_reader (for cache keys) sees every change made through os.environ, with the dict
    behind os.environ or, where that is not there, os.environ.get."""
    from lora_kernels import dispatch

    monkeypatch.setattr(dispatch, "_FAST_ENVIRON", fast)
    monkeypatch.delenv("LORA_KERNELS_TEST_A", raising=False)
    monkeypatch.setenv("LORA_KERNELS_TEST_B", "x")
    read = dispatch.environ_reader("LORA_KERNELS_TEST_A", "LORA_KERNELS_TEST_B")
    first = read()
    assert first[0] is None and first[1] is not None
    monkeypatch.setenv("LORA_KERNELS_TEST_A", "1")
    second = read()
    assert second[0] is not None and second != first
    monkeypatch.setenv("LORA_KERNELS_TEST_A", "2")
    assert read() != second
    monkeypatch.delenv("LORA_KERNELS_TEST_A")
    monkeypatch.delenv("LORA_KERNELS_TEST_B")
    assert read() == (None, None)


def test_interpreting_follows_triton_interpret(monkeypatch):
    from lora_kernels.dispatch import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_a_seed_drawn_by_the_backend_is_the_seed_the_caller_would_draw(backend, dropout_p):
    """Without a dropout_seed, the torch backend on the CPU draws the seed with the mask in one op
    (lora_dropout_keep), the other backends take the caller's draw (draw_seed): either way the draw of
    draw_seed from the same generator state, so the output and gradients equal a call given that seed."""
    from lora_kernels.dropout import draw_seed

    p = make_problem((2, 3), 12, 10, 4, device=backend.device)

    def run(**seed):
        with use_backend(backend.name):
            y = lora_linear(*_args(p), dropout_p=dropout_p, training=True, **seed)
        return (y, *torch.autograd.grad(y.square().sum(), [p.x, p.lora_A, p.lora_B]))

    torch.manual_seed(11)
    drawn = run()
    torch.manual_seed(11)
    seed = draw_seed(p.x.device)
    given = run(dropout_seed=seed)
    for a, b in zip(drawn, given, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(12)
    assert not torch.equal(run()[0], drawn[0])  # another generator state, another mask


def test_a_requested_backend_that_cannot_run_still_raises_each_time():
    args = _args(make_problem((4,), 6, 5, 3))
    for _ in range(2):
        with use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
            lora_linear(*args)


def test_meta_tensors_still_take_the_composite_with_a_forced_backend():
    p = make_problem((4,), 6, 5, 3, device="meta")
    with use_backend("cuda"):  # no backend runs on meta: the composite gives the shape, as before
        assert lora_linear(*_args(p)).shape == (4, 5)


def test_torch_compile_does_not_use_the_cache():
    p = make_problem((4,), 6, 5, 3)
    fn = torch.compile(lambda *a: lora_linear(*a), fullgraph=True, backend="aot_eager")
    y = fn(*_args(p))  # fullgraph: a graph break here would raise
    assert functional._CALL_PLANS == {}  # traced: checked while tracing, no plan stored or read
    torch.testing.assert_close(y, lora_linear(*_args(p)))


@TRITON_ONLY
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float16, torch.float16)])  # fmt: skip
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_casts_folded_into_the_kernels_give_the_same_bits(monkeypatch, backend, splits, dtype, adapter_dtype,
                                                          dropout_p):  # fmt: skip
    """dA, dB and db straight from the row-reduction kernel in their dtypes (one row split) or cast once
    after the sum of the splits: bitwise what fp32 results cast afterwards give."""
    from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce, triton_support

    config = triton_reduce._reduce_config  # 16-row blocks: 70 rows can be split in 3 (128-row blocks cannot)
    monkeypatch.setattr(triton_reduce, "_reduce_config", lambda *a: dict(config(*a), BLOCK_M=16))
    monkeypatch.setattr(triton_reduce, "_row_splits", lambda M, num_blocks, block_m, device: splits)
    monkeypatch.setattr(triton_support, "_PLANS", {})
    M, K, N, r = 70, 40, 36, 5
    dev = backend.device
    x, w = torch.randn(M, K, device=dev, dtype=dtype), torch.randn(N, K, device=dev, dtype=dtype) / 8
    A = (torch.randn(r, K, device=dev) / 4).to(adapter_dtype)
    B = (torch.randn(N, r, device=dev) / 4).to(adapter_dtype)
    grad_y = torch.randn(M, N, device=dev, dtype=dtype)
    params = LoRAParams(2.0, dropout_p, 123)
    _, t = triton_lora.lora_forward(x, w, None, A, B, params)
    _, grad_A, grad_B, grad_bias = triton_lora.lora_backward(grad_y, x, w, A, B, t, params, (True,) * 5)
    # the same kernels with fp32 outputs, cast here (the code before the fold)
    grad_t, grad_B32, colsum, _ = triton_reduce._grad_y_pass(grad_y, B, t, 2.0, True, True)
    grad_A32 = triton_reduce._reduce_rows(x, grad_t, dropout_p, 123, with_colsum=False)[0]
    assert grad_A.dtype == adapter_dtype and grad_B.dtype == adapter_dtype and grad_bias.dtype == dtype
    assert torch.equal(grad_A, grad_A32.t().to(adapter_dtype))
    assert torch.equal(grad_B, grad_B32.to(adapter_dtype))
    assert torch.equal(grad_bias, colsum.to(dtype))
    if splits == 1:
        assert grad_A.is_contiguous()  # stored as (r, K) by the kernel
    reduce_plans = [plan for key, plan in triton_support._PLANS.items() if key[0] == "reduce"]
    assert reduce_plans and all(plan[2] == splits for plan in reduce_plans)  # the rows were split as asked


def _module_and_input():
    from lora_kernels import FusedLoRALinear

    torch.manual_seed(0)
    layer = FusedLoRALinear(6, 5, r=3, lora_alpha=6)
    torch.nn.init.normal_(layer.lora_B)
    return layer, torch.randn(4, 6)


def _by_hand(layer, x, lora_A=None, lora_B=None):
    lora_A = layer.lora_A if lora_A is None else lora_A
    lora_B = layer.lora_B if lora_B is None else lora_B
    return lora_linear(x, layer.weight, layer.bias, lora_A, lora_B, layer.scaling)


def test_module_reads_what_functional_call_swaps_in():
    layer, x = _module_and_input()
    other_B = torch.randn_like(layer.lora_B)
    y = torch.func.functional_call(layer, {"lora_B": other_B}, (x,))
    torch.testing.assert_close(y, _by_hand(layer, x, lora_B=other_B), rtol=0, atol=0)


def test_module_reads_parametrized_adapters():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, a):
            return 2 * a

    layer, x = _module_and_input()
    plain_A = layer.lora_A.detach().clone()
    parametrize.register_parametrization(layer, "lora_A", Double())
    torch.testing.assert_close(layer(x), _by_hand(layer, x, lora_A=2 * plain_A), rtol=0, atol=0)


def test_module_reads_hook_based_weight_norm():
    import warnings

    layer, x = _module_and_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in use
        torch.nn.utils.weight_norm(layer, name="lora_B", dim=0)
    y = layer(x)  # its pre-hook sets lora_B as a plain attribute; _parameters has lora_B_g / lora_B_v
    assert "lora_B" not in layer._parameters
    torch.testing.assert_close(y, _by_hand(layer, x, lora_B=layer.lora_B), rtol=0, atol=0)


def test_the_tf32_query_answers_as_torch_backends_does():
    """triton_support._tf32_allowed reads the C getter behind torch.backends' fp32_precision attributes: the
    same answer as the attributes for every setting of the matmul and the global precision."""
    from lora_kernels.ops import triton_support

    matmul, backends = torch.backends.cuda.matmul, torch.backends
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: no fp32_precision API")
    saved = matmul.fp32_precision, backends.fp32_precision
    try:
        for global_precision in ("none", "ieee", "tf32"):
            for matmul_precision in ("none", "ieee", "tf32"):
                backends.fp32_precision = global_precision
                matmul.fp32_precision = matmul_precision
                resolved = matmul.fp32_precision
                expected = (backends.fp32_precision if resolved == "none" else resolved) == "tf32"
                assert triton_support._tf32_allowed() is expected, (global_precision, matmul_precision)
                assert triton_support._input_precision(torch.float32) == ("tf32" if expected else "ieee")
    finally:
        backends.fp32_precision, matmul.fp32_precision = saved[1], saved[0]
