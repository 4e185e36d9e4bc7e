"""One finalize step for the row-split sums (issue 19, item 3; ``triton_reduce._sum_parts``).

When the row reduction splits its rows (M above a few hundred on a GPU) or the projection spans several
column blocks, its partial sums are summed and cast by one launch of ``_sum_parts_kernel`` for all of a
call's results, not a ``torch.sum`` and a cast per result. Under the interpreter the rows are never split on
their own, so the fixture forces three splits and 16-row / 16-column blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HAS_TRITON, make_problem
from torch.utils._python_dispatch import TorchDispatchMode

from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce, triton_support
from lora_kernels.reference import lora_linear_reference
from lora_kernels.testing import assert_close


@pytest.fixture
def split_rows(monkeypatch):
    config = triton_reduce._reduce_config

    def small_blocks(rows, cols, r, project=False):
        return dict(config(rows, cols, r, project), BLOCK_M=16, BLOCK_P=16)

    monkeypatch.setattr(triton_reduce, "_reduce_config", small_blocks)
    monkeypatch.setattr(triton_reduce, "_row_splits", lambda M, num_blocks, block_m, device: 3)


@pytest.fixture
def launches(monkeypatch):
    names = []
    launch = triton_support._launch

    def counting(kernel, *args):
        names.append(getattr(kernel, "__name__", repr(kernel)))
        return launch(kernel, *args)

    monkeypatch.setattr(triton_support, "_launch", counting)
    return names


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transposed, out_dtype", [(False, torch.float32), (True, torch.float16),
                                                   (False, torch.float16), (True, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("extras", [False, True])  # with z (DoRA's Σ a ⊙ z) and the projection
def test_reduce_rows_split_matches_float64(split_rows, launches, device, transposed, out_dtype, extras):
    M, P, R = 70, 40, 5  # 3 splits of 32 rows (the last short), 3 column blocks of 16
    a = torch.randn(P, M, device=device).t()  # a non-contiguous (M, P) view
    c = torch.randn(M, R, device=device)
    z = torch.randn(M, P, device=device) if extras else None
    b = torch.randn(P, R, device=device) if extras else None
    got = triton_reduce._reduce_rows(a, c, 0.0, None, True, 2.0, z, b, out_dtype=out_dtype, transposed=transposed,
                              colsum_dtype=out_dtype)  # fmt: skip
    assert launches == ["_lora_reduce_rows_kernel", "_sum_parts_kernel"]
    a64, c64 = a.double(), c.double()
    expected = 2.0 * a64.t() @ c64
    assert got[0].is_contiguous() and got[0].dtype == out_dtype and got[1].dtype == out_dtype
    assert_close(got[0], expected.t() if transposed else expected, out_dtype, "out")
    assert_close(got[1], a64.sum(0), out_dtype, "colsum")
    if extras:
        assert_close(got[2], (a64 * z.double()).sum(0), torch.float32, "prodsum")
        assert_close(got[3], 2.0 * a64 @ b.double(), torch.float32, "projected")
    else:
        assert got[2] is None and got[3] is None


def test_one_part_is_a_view_and_no_part_gives_zeros(device):
    one = torch.randn(1, 6, 5, device=device)
    assert triton_reduce._sum_parts((one, torch.float32))[0].data_ptr() == one.data_ptr()
    zero, none = triton_reduce._sum_parts(
        (torch.empty(0, 6, 5, device=device), torch.float16), (None, torch.float32)
    )
    assert none is None and zero.dtype == torch.float16 and torch.equal(zero, torch.zeros_like(zero))


def test_cast_in_the_finalize_store_is_torchs_cast(device):
    """The cast in the finalize kernel's store gives the bits of torch's cast of its fp32 sum."""
    parts = torch.randn(3, 37, 5, device=device) * 100
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])  # (interpreter)
    as32, *cast = triton_reduce._sum_parts(*((parts, dtype) for dtype in dtypes))
    torch.testing.assert_close(as32, parts.sum(0))
    for got, dtype in zip(cast, dtypes[1:], strict=True):
        assert torch.equal(got, as32.to(dtype)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [3, 20])  # one pass over dY (r <= 16) or two
def test_backward_with_split_rows_matches_float64(split_rows, launches, device, dtype, r):
    p = make_problem((70,), 40, 36, r, dtype, device=device)
    params = LoRAParams(p.scaling)
    x, w, A, B = (t.detach() for t in (p.x, p.weight, p.lora_A, p.lora_B))
    grad_y = torch.randn(70, 36, device=device, dtype=dtype)
    _, t = triton_lora.lora_forward(x, w, p.bias.detach(), A, B, params)
    launches.clear()
    with _AtenOps() as seen:
        grads = triton_lora.lora_backward(grad_y, x, w, A, B, t, params, (True,) * 5)
    # one finalize per reduction: the dY pass (dB, db[, s·dY·B]) and dA; no torch sum or cast after them
    assert launches.count("_sum_parts_kernel") == 2
    assert not {"sum", "_to_copy"} & set(seen.ops), seen.ops
    leaves = [t.detach().double().requires_grad_() for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B)]
    expected = lora_linear_reference(*leaves[:3], *leaves[3:], p.scaling)
    expected.backward(grad_y.double())
    names = ("dX", "dA", "dB", "db")
    for got, leaf, name in zip(grads, (leaves[0], leaves[3], leaves[4], leaves[2]), names, strict=True):
        assert got.dtype == dtype, name
        assert_close(got, leaf.grad, dtype, name, slack=4.0)


_COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
import compile_kernels
pointers = {f"src{i}": "fp32" for i in range(4)} | {f"dst{i}": "in" for i in range(4)}
compile_kernels.KERNELS["_sum_parts_kernel"] = (pointers, set(), {"BLOCK": 1024}, {"num_warps": 4}, ({},))
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        compile_kernels.compile_kernel("_sum_parts_kernel", dtype, False, {}, arch)
        print("ok", arch, dtype)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_finalize_kernel_compiles_for_sm80_and_sm90():
    """The finalize kernel lowers to cubin for each result dtype (tools/compile_kernels.py's way)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tools = Path(__file__).resolve().parents[1] / "tools"
    result = subprocess.run([sys.executable, "-c", _COMPILE, str(tools)], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 6
