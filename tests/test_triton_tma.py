"""The TMA persistent kernels (lora_kernels/ops/triton_tma.py) against the float64 reference.

On the CPU they run through Triton's interpreter (the ``interpreted`` tests), where it has tensor descriptors
(triton 3.6 and 3.8; 3.6's runs the persistent loop with lora_kernels/ops/triton_interpreter.py's fix);
with 3 programs for up to 6 tiles, so each program walks several tiles of the grouped order. On an sm_90+
GPU, ``test_on_hopper_bf16`` runs the compiled kernels; tools/compile_kernels.py checks that they compile
(registers, spills, shared memory, warp specialization) without one, and the GPU run's sweep times them.
"""

import pytest
import torch
from helpers import HAS_TRITON, assert_close

from lora_kernels.dropout import dropout_mask
from lora_kernels.ops import LoRAParams
from lora_kernels.reference import lora_linear_reference

if HAS_TRITON:
    from lora_kernels.ops import triton_lora, triton_support, triton_tma

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interpreted = pytest.mark.skipif(
    not HAS_TRITON or not triton_tma.tma_available("cpu"),
    reason="needs the interpreter (TRITON_INTERPRET=1) of a triton with tensor descriptors",
)
on_hopper = pytest.mark.skipif(
    not HAS_TRITON or not torch.cuda.is_available() or not triton_tma.tma_available("cuda"),
    reason="needs a GPU of compute capability >= 9.0",
)

VARIANTS = list(triton_tma.VARIANTS) if HAS_TRITON else []


class Launches(list):
    """Kernel names launched, with each launch's constexprs in ``.constexprs``."""

    def __init__(self):
        super().__init__()
        self.constexprs = []


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels launched inside the test."""
    names = Launches()
    launch = triton_support._launch

    def spy(kernel, grid_of, configs, args, constexprs):
        names.append(kernel.__name__)
        names.constexprs.append(constexprs)
        return launch(kernel, grid_of, configs, args, constexprs)

    monkeypatch.setattr(triton_support, "_launch", spy)
    return names


def problem(M, K, N, r, dtype, adapter_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dt)

    adapter_dtype = adapter_dtype or dtype
    return (rand(M, K), rand(N, K, std=K**-0.5), rand(N), rand(r, K, dt=adapter_dtype, std=K**-0.5),
            rand(N, r, dt=adapter_dtype, std=0.5))  # fmt: skip


def grad_x_reference(grad_y, weight, lora_A, lora_B, scaling, mask):
    """``dY·W + mask ⊙ (s·dY·B)·A`` in float64 (autograd through the reference would give the same)."""
    g, w, a, b = (v.double() for v in (grad_y, weight, lora_A, lora_B))
    lora = (scaling * g @ b) @ a
    return g @ w + (lora if mask is None else lora * mask.double())


@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(37, 40, 48, 8), (5, 64, 104, 16)])  # (M, K, N, r): odd M, partial tiles
def test_forward_and_grad_x(variant, dtype, dropout_p, shape, launched):
    M, K, N, r = shape
    x, w, b, A, B = problem(M, K, N, r, dtype)
    params = LoRAParams(1.7, dropout_p, 4242)
    mask = dropout_mask(params.seed, x.shape, dropout_p) if dropout_p else None
    y, t = triton_tma.lora_forward_tma(x, w, b, A, B, params, variant=variant)
    assert y.dtype == dtype and t.dtype == torch.float32 and t.shape == (M, r)
    assert_close(y, lora_linear_reference(x, w, b, A, B, params.scaling, mask, upcast=True), dtype, "y")
    x_lora = x.double() if mask is None else x.double() * mask.double()
    assert_close(t, x_lora @ A.double().t(), dtype, "t")

    grad_y = problem(M, N, 1, 1, dtype, seed=1)[0]
    grad_x, grad_t = triton_tma.lora_grad_x_tma(grad_y, w, A, B, params, variant=variant)
    assert grad_x.dtype == dtype
    assert_close(grad_x, grad_x_reference(grad_y, w, A, B, params.scaling, mask), dtype, "grad_x", slack=2.0)
    assert_close(grad_t, params.scaling * grad_y.double() @ B.double(), dtype, "grad_t")
    assert launched.count("_lora_linear_tma_kernel") == 2 and "_lora_linear_kernel" not in launched
    # the warp-specialized build (fp16/bf16) reads every operand through (device-side) descriptors; dX takes
    # the dropout mask there only from triton 3.8 on (below, its plain build runs; the forward's GEMM never
    # applies the mask: dropout is in t)
    tma = [c for c in launched.constexprs if "DEVICE_DESC" in c]
    ws = variant.startswith("tma_ws") and dtype != torch.float32
    assert [c["DEVICE_DESC"] for c in tma] == [ws, ws and (not dropout_p or triton_tma._WS_TAKES_MASK)]
    fused = variant.endswith("t_fused")
    assert [c["FUSE_PROJECT"] for c in tma] == [fused and not dropout_p, fused]


@interpreted
@pytest.mark.parametrize("variant", ["tma", "tma_ws_t_fused"])
def test_fp32_adapters_on_a_half_base_and_strided_operands(variant, launched):
    """fp32 adapters on fp16 x/W (the epilogue in TF32, as triton_lora's), a large scaling that would
    overflow ``s·t`` in fp16, x a column slice of a wider tensor, a bias broadcast from a scalar (stride 0),
    a 3-D output shape."""
    M, K, N, r = 24, 48, 32, 4
    x, w, _, A, B = problem(M, K, N, r, torch.float16, adapter_dtype=torch.float32)
    wide = torch.zeros(M, K + 16, dtype=torch.float16)
    wide[:, 8 : 8 + K] = x
    x_view = wide[:, 8 : 8 + K]  # row stride (K + 16)·2 bytes: still 16-byte aligned, base at +16 bytes
    bias = torch.tensor(0.5, dtype=torch.float16).expand(N)
    params = LoRAParams(4096.0, 0.0, 0)
    y, _ = triton_tma.lora_forward_tma(
        x_view, w, bias, A, B, params, out_shape=(2, M // 2, N), variant=variant
    )
    expected = lora_linear_reference(x, w, bias, A, B, params.scaling, upcast=True).reshape(2, M // 2, N)
    assert y.shape == (2, M // 2, N) and torch.isfinite(y).all()
    assert_close(y, expected, torch.float16, "y")
    expected_launches = ["_lora_project_kernel"] * (not variant.endswith("fused")) + [
        "_lora_linear_tma_kernel"
    ]
    assert launched == expected_launches
    assert not launched.constexprs[-1]["DEVICE_DESC"]  # the stride-0 bias: not for TMA, host descriptors


@interpreted
@pytest.mark.parametrize("num_sms", [1, 2, 64])
def test_persistent_loop_visits_every_tile_once(num_sms):
    """One program for all tiles, two, and more programs than tiles give the same output."""
    x, w, b, A, B = problem(70, 32, 96, 8, torch.float32)
    params = LoRAParams(0.5, 0.1, 7)
    y, _ = triton_tma.lora_forward_tma(x, w, b, A, B, params, variant="tma", num_sms=num_sms)
    mask = dropout_mask(params.seed, x.shape, 0.1)
    assert_close(y, lora_linear_reference(x, w, b, A, B, 0.5, mask, upcast=True), torch.float32, "y")


@interpreted
def test_given_grad_t_is_used_and_returned():
    _, w, _, A, B = problem(16, 32, 48, 8, torch.float32)
    grad_y = problem(16, 48, 1, 1, torch.float32, seed=3)[0]
    params = LoRAParams(2.0, 0.0, 0)
    grad_t = torch.zeros(16, 8)  # a zero LoRA gradient: dX is the base term alone
    grad_x, returned = triton_tma.lora_grad_x_tma(
        grad_y, w, A, B, params, grad_t=grad_t, variant="tma_t_fused"
    )
    assert returned is grad_t
    assert_close(grad_x, grad_y.double() @ w.double(), torch.float32, "grad_x")


@interpreted
@pytest.mark.parametrize("case", ["K unaligned", "N unaligned", "x column-major", "B rows unaligned"])
def test_operands_tma_cannot_read_fall_back(case, launched):
    """Rows that are not 16-byte aligned (or an x that is not row-major) run triton_lora's kernel, right."""
    M, K, N, r = 20, 32, 48, 8
    if case == "K unaligned":
        K = 41
    if case == "N unaligned":
        N = 45
    dtype = torch.float16 if case == "B rows unaligned" else torch.float32
    x, w, b, A, B = problem(M, K, N, 4 if case == "B rows unaligned" else r, dtype)
    if case == "x column-major":
        x = x.t().contiguous().t()
    params = LoRAParams(1.5, 0.2, 11)
    mask = dropout_mask(params.seed, x.shape, 0.2)
    grad_y = problem(M, N, 1, 1, dtype, seed=5)[0]
    grad_x, _ = triton_tma.lora_grad_x_tma(grad_y, w, A, B, params, variant="tma_t_fused")
    assert_close(grad_x, grad_x_reference(grad_y, w, A, B, 1.5, mask), dtype, "grad_x", slack=2.0)
    if case == "B rows unaligned":  # B (N, 4) fp16: 8-byte rows; the unfused TMA variant still runs
        assert launched[-1] == "_lora_linear_tma_kernel"
        return
    if case != "x column-major":  # (dY is row-major: its dX ran on TMA)
        assert "_lora_linear_tma_kernel" not in launched
    launched.clear()
    y, _ = triton_tma.lora_forward_tma(x, w, b, A, B, params, variant="tma")
    assert_close(y, lora_linear_reference(x, w, b, A, B, 1.5, mask, upcast=True), dtype, "y")
    assert "_lora_linear_tma_kernel" not in launched and "_lora_linear_kernel" in launched


@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
def test_path_functions_match_the_fused_path(variant):
    """Each variant's ``(forward, backward)`` pair (a routing entry) gives triton_lora's results, every
    gradient, with dropout."""
    x, w, b, A, B = problem(21, 32, 48, 8, torch.float32)
    params = LoRAParams(1.3, 0.2, 99)
    grad_y = problem(21, 48, 1, 1, torch.float32, seed=2)[0]
    forward, backward = triton_tma.PATH_FUNCTIONS[variant]
    assert getattr(triton_tma, f"backward_{variant}") is backward
    y, t = forward(x, w, b, A, B, params)
    y0, t0 = triton_lora.lora_forward(x, w, b, A, B, params)
    assert_close(y, y0.double(), torch.float32, "y")
    grads = backward(grad_y, x, w, A, B, t, params, (True, False, True, True, True))
    expected = triton_lora.lora_backward(grad_y, x, w, A, B, t0, params, (True, False, True, True, True))
    for name, got, want in zip(("grad_x", "grad_A", "grad_B", "grad_bias"), grads, expected, strict=True):
        assert_close(got, want.double(), torch.float32, name, slack=2.0)


def test_availability_and_variant_names():
    assert not triton_tma.tma_available("meta")
    assert set(triton_tma.VARIANTS) == {"tma", "tma_t_fused", "tma_ws", "tma_ws_t_fused"}
    x, w, b, A, B = problem(4, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="unknown TMA variant"):
        triton_tma.lora_forward_tma(x, w, b, A, B, LoRAParams(1.0), variant="tma_wss")


@pytest.mark.cuda
@on_hopper
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_on_hopper_bf16(variant, dropout_p, launched):
    """The compiled kernels on the GPU (the GPU run's tests phase): bf16, several waves of persistent tiles,
    the forward and dX of each variant against float64, and the TMA kernel is what ran."""
    x, w, b, A, B = (v.cuda() for v in problem(1000, 512, 768, 16, torch.bfloat16))
    params = LoRAParams(2.0, dropout_p, 31)
    mask = dropout_mask(params.seed, x.shape, dropout_p, device="cuda") if dropout_p else None
    y, _ = triton_tma.lora_forward_tma(x, w, b, A, B, params, variant=variant)
    assert_close(y, lora_linear_reference(x, w, b, A, B, 2.0, mask, upcast=True), torch.bfloat16, "y")
    grad_y = problem(1000, 768, 1, 1, torch.bfloat16, seed=1)[0].cuda()
    grad_x, _ = triton_tma.lora_grad_x_tma(grad_y, w, A, B, params, variant=variant)
    expected = grad_x_reference(grad_y, w, A, B, 2.0, mask)
    assert_close(grad_x, expected, torch.bfloat16, "grad_x", slack=2.0)
    assert launched.count("_lora_linear_tma_kernel") == 2
