"""The C++/CUDA extension ``lora_kernels._C``: every op against float64 math, and the backend end to end.

On CPU this checks the extension's CPU implementation (ATen composite + the C++ Philox), and runs the CUDA
kernels' source under a CPU emulator (``tests/cuda_emulator``); the same op tests on CUDA tensors (marked
``cuda``, skipped without a GPU) check the compiled kernels. The whole module is skipped when the extension
was not built (``LORA_KERNELS_SKIP_EXT=1`` or a failed optional build), unless ``LORA_KERNELS_EXPECT_CUDA=1``:
then a missing extension fails the run (and a CPU-only one fails ``test_cuda_kernels_compiled_in``).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from lora_kernels.dropout import draw_seed, dropout_mask, dropout_mask_torch
from lora_kernels.ops import LoRAParams, cuda_lora
from lora_kernels.reference import lora_linear_reference
from lora_kernels.testing import TOLERANCE

#: CI with a CUDA toolkit sets LORA_KERNELS_EXPECT_CUDA=1: an extension that is missing (a failed build) or
#: built without CUDA is then a failure, never a skip.
EXPECT_CUDA = os.environ.get("LORA_KERNELS_EXPECT_CUDA") == "1"
if EXPECT_CUDA:  # checked before skipping: a failed import is a collection error, so the run fails
    try:
        import lora_kernels._C as _C
    except ImportError as err:
        raise ImportError(
            f"LORA_KERNELS_EXPECT_CUDA=1 but the extension lora_kernels._C does not import ({err}): "
            "its build failed or was skipped; see csrc/README.md"
        ) from err
elif not cuda_lora.has_extension():  # not built, or built for another torch (CI's second version set)
    pytest.skip(cuda_lora.missing_reason(), allow_module_level=True)
else:
    import lora_kernels._C as _C

ops = torch.ops.lora_kernels
OP_NAMES = (
    "lora_project",
    "lora_linear_fwd",
    "lora_grad_t_and_B",
    "lora_grad_A",
    "lora_grad_x",
    "lora_dropout_mask",
)
HAS_CUDA = torch.cuda.is_available()
EMULATOR = Path(__file__).resolve().parent / "cuda_emulator" / "emulate_kernels.cpp"
CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")]
CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=CUDA_MARKS)

#: Relative tolerance of each dtype against float64, scaled by the magnitude of the result.


def _case(device: str, dtype: torch.dtype):
    """A ``(device, dtype, rtol)`` parameter; CUDA cases carry the cuda mark and skip without a GPU."""
    marks = CUDA_MARKS if device == "cuda" else []
    return pytest.param(
        device, dtype, TOLERANCE[dtype], id=f"{device}-{dtype}".replace("torch.", ""), marks=marks
    )


CPU_CASES = [_case("cpu", torch.float32), _case("cpu", torch.float16)]
CUDA_CASES = [_case("cuda", dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)]

#: (M, K, N, r): odd sizes (no tile multiples), r = 1, the largest rank, and rank-tile boundaries.
SHAPES = [
    (37, 70, 45, 5),
    (8, 16, 12, 1),
    (6, 20, 11, 256),
    (19, 33, 17, 16),
    (11, 40, 9, 17),
    (5, 24, 7, 65),
]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """``actual`` against a float64 ``expected``: error bounded by ``rtol`` times the result's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def _inputs(M, K, N, r, dtype, device, adapter_dtype=None, bias=True):
    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, dtype=torch.float64) * std).to(device, dt)

    adapter_dtype = adapter_dtype or dtype
    x = rand(M, K)
    weight = rand(N, K, std=K**-0.5)
    b = rand(N) if bias else None
    lora_A = rand(r, K, std=K**-0.5, dt=adapter_dtype)
    lora_B = rand(N, r, std=r**-0.5, dt=adapter_dtype)
    return x, weight, b, lora_A, lora_B


def _seed(value: int, device="cpu") -> torch.Tensor:
    """A seed as the ops take it: an int64 tensor of one element on the inputs' device."""
    return torch.full((), value, dtype=torch.int64, device=device)


def _mask64(shape, p, seed, device):
    if p == 0.0:
        return torch.ones(shape, dtype=torch.float64, device=device)
    return dropout_mask(seed, shape, p, device=device, dtype=torch.float64)


def _as_compute(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the GEMMs see it: rounded to the compute dtype, then float64."""
    return t.to(dtype).double()


# ---------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------


def _elf_section_names(path: str) -> list[str]:
    """Section names of a 64-bit little-endian ELF file (enough to spot embedded CUDA device code)."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit LE ELF file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    (strtab,) = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    names = []
    for i in range(shnum):
        (name,) = struct.unpack_from("<I", data, shoff + i * shentsize)
        start = strtab + name
        names.append(data[start : data.index(b"\0", start)].decode())
    return names


def test_ops_registered_for_cpu_and_meta():
    assert cuda_lora.has_extension()
    for name in OP_NAMES:
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{name}", key), (name, key)


def test_cuda_kernels_compiled_in():
    """A CUDA build must really carry device code: CUDA kernels for every op and a .nv_fatbin section.

    Set LORA_KERNELS_EXPECT_CUDA=1 (CI with a CUDA toolkit) to fail instead of skipping a CPU-only build.
    """
    if not torch.version.cuda:
        pytest.skip("torch is a CPU-only build: the extension is CPU-only by design")
    if not _C.WITH_CUDA:
        if EXPECT_CUDA:
            pytest.fail("LORA_KERNELS_EXPECT_CUDA=1 but lora_kernels._C was built without CUDA kernels")
        pytest.skip("the extension was built without a CUDA toolkit (CPU-only)")
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{name}", "CUDA"), name
    assert cuda_lora.is_available()
    assert ".nv_fatbin" in _elf_section_names(_C.__file__)


def test_cuda_kernels_emulated_on_cpu(tmp_path):
    """The CUDA kernels themselves, without a GPU: csrc/lora_kernels.cuh compiled as C++ with coroutines
    standing in for CUDA threads, against float64 references (see tests/cuda_emulator/emulate_kernels.cpp)."""
    if not (CSRC / "lora_kernels.cuh").is_file():
        pytest.skip("csrc/ is not part of this checkout")
    cxx = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "emulate_kernels"
    include = Path(torch.__file__).parent / "include"
    flags = ["-std=c++20", "-O1", "-Wno-unknown-pragmas", f"-I{include}", f"-I{CSRC}"]
    built = subprocess.run([cxx, *flags, str(EMULATOR), "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, f"compiling the kernel emulator failed:\n{built.stderr[-4000:]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    assert "cases passed" in ran.stdout


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"lora_project: lora_A.size\(1\) must equal .*shape \[3, 7\]"):
        ops.lora_project(x, torch.randn(3, 7), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lora_project: x must be float16, bfloat16 or float32.*Double"):
        ops.lora_project(x.double(), torch.randn(3, 8), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"rank lora_A.size\(0\) must be in \[1, 256\]"):
        ops.lora_project(x, torch.randn(257, 8), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.lora_project(x, torch.randn(3, 8), 1.0, 1.0, _seed(0))
    with pytest.raises(RuntimeError, match=r"lora_project: dropout_p > 0 needs a seed tensor"):
        ops.lora_project(x, torch.randn(3, 8), 1.0, 0.5, None)
    with pytest.raises(RuntimeError, match=r"lora_project: seed must be an int64 tensor of one element"):
        ops.lora_project(x, torch.randn(3, 8), 1.0, 0.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"lora_project: seed must be in \[0, 2\*\*63\)"):
        ops.lora_project(x, torch.randn(3, 8), 1.0, 0.5, _seed(-1))
    with pytest.raises(RuntimeError, match=r"lora_linear_fwd: t must be float32"):
        ops.lora_linear_fwd(x, torch.randn(5, 8), None, torch.randn(4, 3).half(), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"lora_grad_x: lora_A must have the dtype of grad_y"):
        ops.lora_grad_x(
            x.half(),
            torch.randn(8, 8).half(),
            torch.randn(4, 3).half(),
            torch.randn(3, 8).double(),
            0.0,
            None,
        )


@pytest.mark.parametrize(
    "name,args",
    [
        ("lora_project", lambda x, w, b, A, B, t, g, gt: (x, A, 2.0, 0.25, _seed(7))),
        ("lora_linear_fwd", lambda x, w, b, A, B, t, g, gt: (x, w, b, t, B)),
        ("lora_grad_t_and_B", lambda x, w, b, A, B, t, g, gt: (g, B, t, 2.0)),
        ("lora_grad_A", lambda x, w, b, A, B, t, g, gt: (gt, x, 0.25, _seed(7))),
        ("lora_grad_x", lambda x, w, b, A, B, t, g, gt: (g, w, gt, A, 0.25, _seed(7))),
        ("lora_dropout_mask", lambda x, w, b, A, B, t, g, gt: ((2, 3, 10), 0.25, _seed(7))),
        ("lora_dropout_bits", lambda x, w, b, A, B, t, g, gt: ((2, 3, 10), 0.25, _seed(7))),
        (
            "lora_dropout_apply",
            lambda x, w, b, A, B, t, g, gt: (x, ops.lora_dropout_bits((6, 10), 0.25, _seed(7)), 1.5),
        ),
        ("lora_dropout_keep", lambda x, w, b, A, B, t, g, gt: (x, 0.25, _seed(7))),
    ],
)
def test_opcheck(name, args):
    """Schema, fake (Meta) kernels and dispatch agree with the real CPU kernels."""
    x, w, b, A, B = _inputs(6, 10, 7, 3, torch.float32, "cpu")
    t = torch.randn(6, 3)
    g = torch.randn(6, 7)
    gt = torch.randn(6, 3)
    torch.library.opcheck(getattr(ops, name).default, args(x, w, b, A, B, t, g, gt))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_dropout_mask_op_follows_its_seed_tensor(device):
    """lora_dropout_mask makes the mask on its seed tensor's device (Meta for shapes only), of the requested
    size, and reads the seed's value on that device: a new value in the same tensor gives its mask."""
    seed = _seed(9, device)
    mask = ops.lora_dropout_mask((2, 3, 5), 0.5, seed)
    assert mask.shape == (2, 3, 5) and mask.dtype == torch.float32 and mask.device.type == device
    assert torch.equal(mask.reshape(6, 5).cpu(), ops.lora_dropout_mask([6, 5], 0.5, _seed(9)))
    seed.fill_(10)
    assert torch.equal(
        ops.lora_dropout_mask((2, 3, 5), 0.5, seed).cpu(), dropout_mask_torch(10, (2, 3, 5), 0.5)
    )
    assert ops.lora_dropout_mask((4, 0), 0.5, seed).shape == (4, 0)
    meta = ops.lora_dropout_mask((7, 5), 0.5, seed.to("meta"))
    assert meta.is_meta and meta.shape == (7, 5)
    torch.library.opcheck(ops.lora_dropout_mask.default, ((6, 10), 0.25, seed))
    with pytest.raises(RuntimeError, match="lora_dropout_mask: size needs at least one dimension"):
        ops.lora_dropout_mask((), 0.5, seed)
    with pytest.raises(RuntimeError, match="lora_dropout_mask: size must not be negative"):
        ops.lora_dropout_mask((3, -1), 0.5, seed)


@pytest.mark.parametrize("seed", [5, 2**40 + 2**31 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_mask_bits_and_apply(seed, dtype):
    """lora_dropout_bits packs the mask of dropout.py at one bit per element (byte (row, g), bit j: column
    8g + j), and lora_dropout_apply gives x ⊙ mask from it, for a strided x, NaN kept where dropped."""
    p, shape = 0.3, (7, 3, 21)  # 21 columns: the last byte of a row is partial
    bits = ops.lora_dropout_bits(shape, p, _seed(seed))
    assert bits.shape == (21, 3) and bits.dtype == torch.uint8
    unpacked = (bits.unsqueeze(-1).int() >> torch.arange(8)) & 1
    mask = dropout_mask_torch(seed, (21, 21), p)
    assert torch.equal(unpacked.reshape(21, 24)[:, :21].bool(), mask != 0)
    x = torch.randn(21, 40, dtype=dtype)[:, ::2]  # (21, 20), strided
    x[0, 0] = float("nan")
    bits = ops.lora_dropout_bits((21, 20), p, _seed(seed))
    mask = dropout_mask_torch(seed, (21, 20), p)
    expected = (x.float() * mask).to(dtype)
    torch.testing.assert_close(ops.lora_dropout_apply(x, bits, 1 / (1 - p)), expected, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dropout_keep_is_bits_and_apply_in_one_call(dtype):
    """lora_dropout_keep gives (x ⊙ mask, the bits of lora_dropout_bits, the seed): with a seed, that seed's
    mask; without one, the seed draw_seed would have drawn from the same generator state, for a strided x,
    a partial last byte, NaN kept where dropped, and empty inputs."""
    p = 0.3
    x = torch.randn(9, 42, dtype=dtype)[:, ::2]  # (9, 21), strided
    x[0, 0] = float("nan")
    dropped, bits, seed = ops.lora_dropout_keep(x, p, _seed(11))
    assert seed.item() == 11
    assert torch.equal(bits, ops.lora_dropout_bits((9, 21), p, _seed(11)))
    torch.testing.assert_close(
        dropped, ops.lora_dropout_apply(x, bits, 1 / (1 - p)), equal_nan=True, rtol=0, atol=0
    )
    torch.manual_seed(3)
    dropped, bits, seed = ops.lora_dropout_keep(x, p, None)
    torch.manual_seed(3)
    expected_seed = draw_seed("cpu")
    assert seed.dtype == torch.int64 and seed.dim() == 0 and seed.item() == expected_seed.item()
    expected = (x.float() * dropout_mask_torch(expected_seed, (9, 21), p)).to(dtype)
    torch.testing.assert_close(dropped, expected, equal_nan=True, rtol=0, atol=0)
    empty, empty_bits, _ = ops.lora_dropout_keep(torch.randn(0, 5, dtype=dtype), p, None)
    assert empty.shape == (0, 5) and empty_bits.shape == (0, 1)
    with pytest.raises(RuntimeError, match=r"lora_dropout_keep: dropout_p must be in \(0, 1\)"):
        ops.lora_dropout_keep(x, 0.0, None)


# ---------------------------------------------------------------------------------------------------------
# The dropout mask
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 2.5 / 2**16, 3.5 / 2**16, 0.4 / 2**16, 1 - 0.4 / 2**16])
def test_dropout_mask_bit_exact(device, seed, p):
    """The C++ / device Philox gives exactly lora_kernels.dropout.dropout_mask (incl. round-half-even, and
    p rounding to 0 or to 1 at 2**-16). 301 columns: the last group of 8 of each row is partial."""
    got = ops.lora_dropout_mask((67, 301), p, _seed(seed, device))
    expected = dropout_mask_torch(seed, (67, 301), p, device=device, dtype=torch.float32)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# Each op against float64 math
# ---------------------------------------------------------------------------------------------------------


def _check_ops(M, K, N, r, dtype, rtol, device, p, adapter_dtype=None, x=None, grad_y=None, bias=True):
    """Run the five ops once and compare each with float64 math built from the same rounded inputs."""
    seed, scaling = 1234567, 1.5
    seed_t = _seed(seed, device)
    x_, weight, b, lora_A, lora_B = _inputs(M, K, N, r, dtype, device, adapter_dtype, bias)
    x = x_ if x is None else x
    grad_y = torch.randn(M, N, dtype=torch.float64).to(device, dtype) if grad_y is None else grad_y
    mask = _mask64((M, K), p, seed, device)
    A64, B64 = _as_compute(lora_A, dtype), _as_compute(lora_B, dtype)
    x64, w64, dy64 = x.double(), weight.double(), grad_y.double()

    t = ops.lora_project(x, lora_A, scaling, p, seed_t)
    assert t.dtype == torch.float32 and t.device == x.device
    _assert_close(t, scaling * (x64 * mask) @ A64.t(), rtol, "t")

    y = ops.lora_linear_fwd(x, weight, b, t, lora_B)
    assert y.dtype == dtype
    y64 = x64 @ w64.t() + _as_compute(t, dtype) @ B64.t()
    if b is not None:
        y64 = y64 + b.double()
    _assert_close(y, y64, rtol, "y")

    grad_t, grad_B = ops.lora_grad_t_and_B(grad_y, lora_B, t, scaling)
    assert grad_t.dtype == dtype and grad_B.dtype == torch.float32
    _assert_close(grad_t, scaling * dy64 @ B64, rtol, "grad_t")
    _assert_close(grad_B, dy64.t() @ _as_compute(t, dtype), rtol, "grad_B")

    grad_A = ops.lora_grad_A(grad_t, x, p, seed_t)
    assert grad_A.dtype == torch.float32
    _assert_close(grad_A, grad_t.double().t() @ (x64 * mask), rtol, "grad_A")

    grad_x = ops.lora_grad_x(grad_y, weight, grad_t, lora_A, p, seed_t)
    assert grad_x.dtype == dtype
    _assert_close(grad_x, dy64 @ w64 + mask * (grad_t.double() @ A64), rtol, "grad_x")


@pytest.mark.parametrize("device,dtype,rtol", CPU_CASES)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_ops_cpu(M, K, N, r, device, dtype, rtol, p):
    _check_ops(M, K, N, r, dtype, rtol, device, p)


@pytest.mark.parametrize("device,dtype,rtol", CUDA_CASES)
@pytest.mark.parametrize(
    "M,K,N,r",
    # SHAPES, then shapes large enough for split-K / split-M / row groups and every rank tile
    [*SHAPES, (1000, 1030, 770, 16), (517, 2048, 300, 64), (300, 700, 1100, 256), (1, 4096, 64, 8)],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_ops_cuda(M, K, N, r, device, dtype, rtol, p):
    _check_ops(M, K, N, r, dtype, rtol, device, p)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_ops_fp32_adapters_on_half_base(device):
    """PEFT keeps float32 adapters on a half-precision base: they are cast to the compute dtype."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    _check_ops(37, 70, 45, 5, dtype, 4e-2, device, 0.3, adapter_dtype=torch.float32)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_ops_strided_inputs(device, p):
    """x with non-unit strides (a column slice, a transpose) and grad_y with a zero stride (expanded)."""
    M, K, N = 37, 70, 45
    x_sliced = torch.randn(M, 2 * K, device=device)[:, ::2]
    x_transposed = torch.randn(K, M, device=device).t()
    grad_y = torch.randn(1, N, device=device).expand(M, N)
    for x in (x_sliced, x_transposed):
        _check_ops(M, K, N, 5, torch.float32, 2e-5, device, p, x=x, grad_y=grad_y)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_ops_empty_rows(device):
    """M = 0: empty outputs, zero adapter gradients."""
    _check_ops(0, 16, 12, 4, torch.float32, 2e-5, device, 0.3)
    _check_ops(0, 16, 12, 4, torch.float32, 2e-5, device, 0.0, bias=False)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_ops_without_bias(device):
    _check_ops(37, 70, 45, 5, torch.float32, 2e-5, device, 0.3, bias=False)


# ---------------------------------------------------------------------------------------------------------
# The backend end to end: cuda_lora.lora_forward / lora_backward vs float64 autograd of the reference
# ---------------------------------------------------------------------------------------------------------


def _check_backend(M, K, N, r, dtype, rtol, device, p, bias=True, adapter_dtype=None):
    seed, scaling = 2**40 + 3, 0.75
    params = LoRAParams(scaling, p, seed)
    x, weight, b, lora_A, lora_B = _inputs(M, K, N, r, dtype, device, adapter_dtype, bias)
    grad_y = torch.randn(M, N, dtype=torch.float64).to(device, dtype)

    y, t = cuda_lora.lora_forward(x, weight, b, lora_A, lora_B, params)
    grad_x, grad_A, grad_B, grad_bias = cuda_lora.lora_backward(
        grad_y, x, weight, lora_A, lora_B, t, params, (True, True, bias, True, True)
    )
    assert grad_bias is None  # the backend leaves dW and db to lora_kernels.ops.run_backward

    leaves = [v.double().requires_grad_() for v in (x, lora_A, lora_B)]
    mask = dropout_mask(seed, x.shape, p, device=device, dtype=torch.float64) if p else None
    b64 = b.double() if b is not None else None
    y64 = lora_linear_reference(leaves[0], weight.double(), b64, *leaves[1:], scaling, mask, upcast=True)
    y64.backward(grad_y.double())

    assert y.dtype == dtype and t.dtype == torch.float32
    _assert_close(y, y64.detach(), rtol, "y")
    names = ("grad_x", "grad_A", "grad_B")
    for name, got, leaf, like in zip(
        names, (grad_x, grad_A, grad_B), leaves, (x, lora_A, lora_B), strict=True
    ):
        assert got.dtype == like.dtype, name
        # Adapter gradients pass through one more rounding of the LoRA intermediate: a little looser.
        _assert_close(got, leaf.grad, rtol * (2 if name in ("grad_A", "grad_B") else 1), name)


@pytest.mark.parametrize("device,dtype,rtol", CPU_CASES + CUDA_CASES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("M,K,N,r", [(37, 70, 45, 5), (8, 16, 12, 1), (6, 20, 11, 256), (0, 16, 12, 4)])
def test_backend_forward_backward(M, K, N, r, device, dtype, rtol, p):
    _check_backend(M, K, N, r, dtype, rtol, device, p)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_backend_without_dropout_leaves_the_projections_to_torch(device, monkeypatch):
    """Dropout 0: t = x·Aᵀ, s·dY·B and dB are torch matmuls (cuBLAS on a GPU), not the hand-written ops,
    which only run where they fuse the dropout mask."""
    called = []
    for name in ("lora_project", "lora_grad_t_and_B"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _name=name, _op=op: called.append(_name) or _op(*args))
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    _check_backend(37, 70, 45, 5, dtype, TOLERANCE[dtype], device, 0.0, adapter_dtype=torch.float32)
    assert called == []
    _check_backend(37, 70, 45, 5, dtype, TOLERANCE[dtype], device, 0.2)
    assert called == ["lora_project", "lora_grad_t_and_B"]


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_backend_no_bias_and_fp32_adapters(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    _check_backend(37, 70, 45, 5, dtype, 4e-2, device, 0.2, bias=False, adapter_dtype=torch.float32)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_backend_only_some_grads(device):
    x, weight, b, lora_A, lora_B = _inputs(9, 12, 10, 3, torch.float32, device)
    params = LoRAParams(2.0, 0.1, 5)
    y, t = cuda_lora.lora_forward(x, weight, b, lora_A, lora_B, params)
    grad_y = torch.randn_like(y)
    grad_x, grad_A, grad_B, _ = cuda_lora.lora_backward(
        grad_y, x, weight, lora_A, lora_B, t, params, (False,) * 3 + (True,) * 2
    )
    assert grad_x is None and grad_A is not None and grad_B is not None
    none = cuda_lora.lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, (False,) * 5)
    assert none == (None,) * 4


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("r", [8, 64, 256])
def test_cuda_backward_is_deterministic(r):
    """Split-K / split-M partials are reduced in a fixed order: two runs agree bit for bit."""
    x, weight, b, lora_A, lora_B = _inputs(3000, 1024, 1536, r, torch.bfloat16, "cuda", torch.float32)
    params = LoRAParams(2.0, 0.1, 11)
    y, t = cuda_lora.lora_forward(x, weight, b, lora_A, lora_B, params)
    grad_y = torch.randn_like(y)
    run = lambda: cuda_lora.lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, (True,) * 5)
    first, second = run(), run()
    for a, b_ in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b_)
    assert torch.equal(t, cuda_lora.lora_forward(x, weight, b, lora_A, lora_B, params)[1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu_extension():
    """The device kernels and the CPU implementation agree (same mask, same math up to rounding)."""
    cpu = _inputs(129, 257, 95, 24, torch.float32, "cpu")
    gpu = [v.cuda() for v in cpu]
    y_cpu, t_cpu = cuda_lora.lora_forward(*cpu, LoRAParams(1.25, 0.4, 99))
    y_gpu, t_gpu = cuda_lora.lora_forward(*gpu, LoRAParams(1.25, 0.4, 99))
    torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    assert math.isfinite(y_gpu.abs().sum().item())
