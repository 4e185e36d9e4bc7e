"""The fixes for Triton's CPU interpreter (``lora_kernels/ops/triton_interpreter.py``).

triton < 3.8 turns every loop bound into an int with ``int()`` on a one-element numpy array, which numpy 2.4
refuses (and 1.25 to 2.3 warn about). CI's second leg (triton 3.6.0, numpy >= 2.4) runs these, and every
kernel test, with the fix; on triton 3.8 the fix does nothing and the kernels run as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from lora_kernels.dispatch import interpreting

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lora_kernels.ops.triton_interpreter import TRITON_VERSION, fix_interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="the interpreter's fixes (TRITON_INTERPRET=1)")

NUMPY_VERSION = tuple(int(part) for part in np.__version__.split(".")[:2])

# Two loop forms the kernels use: a count of tiles (tl.cdiv of an argument) and a stride over an argument.
KERNEL_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def column_sums(x_ptr, out_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK)):
        acc += tl.load(x_ptr + k * BLOCK + offs, mask=k * BLOCK + offs < K, other=0.0)
    for start in range(0, K, BLOCK):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < K, other=0.0)
    tl.store(out_ptr + offs, acc)
"""


def _column_sums_kernel(tmp_path):
    (tmp_path / "interp_kernel.py").write_text(KERNEL_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import interp_kernel
    finally:
        sys.path.remove(str(tmp_path))
    return interp_kernel.column_sums


def test_loops_over_kernel_arguments_run_with_the_fix(tmp_path):
    """Both loop forms give the right sums, with warnings as errors (numpy 2.3's DeprecationWarning too)."""
    kernel = _column_sums_kernel(tmp_path)
    fix_interpreter()
    index_before = tl.tensor.__dict__.get("__index__")
    x, out = torch.arange(37, dtype=torch.float32), torch.empty(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel[(1,)](x, out, 37, BLOCK=16)
    padded = torch.cat([x, torch.zeros(48 - 37)]).view(3, 16)
    torch.testing.assert_close(out, 2 * padded.sum(0))
    assert tl.tensor.__dict__.get("__index__") is index_before, "the interpreter's patch outlived the kernel"


@pytest.mark.skipif(
    TRITON_VERSION >= (3, 8) or NUMPY_VERSION < (2, 4),
    reason="the bug needs triton < 3.8 and numpy >= 2.4 (CI's second leg has both)",
)
def test_without_the_fix_the_interpreter_fails(tmp_path):
    """The premise: in a fresh process, without the fix, the same kernel fails on this triton and numpy."""
    (tmp_path / "interp_kernel.py").write_text(KERNEL_SOURCE)
    script = textwrap.dedent(
        """
        import torch, interp_kernel
        x, out = torch.arange(37, dtype=torch.float32), torch.empty(16)
        interp_kernel.column_sums[(1,)](x, out, 37, BLOCK=16)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "only 0-dimensional arrays can be converted" in run.stderr
