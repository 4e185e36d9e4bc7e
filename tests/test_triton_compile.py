"""The Triton kernels compile for real GPUs (sm_80, sm_90) with the installed triton, without a GPU.

The rest of the suite runs the kernels through the interpreter; this checks that the same source lowers
to PTX and cubin, in a subprocess where ``TRITON_INTERPRET`` is unset.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HAS_TRITON

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "compile_kernels.py"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    # 2 archs × 3 dtypes × (dropout on/off × 10 kernel variants: linear ± fused projection and its four DoRA
    # variants, project ± DoRA's stored x̃, reduce ± DoRA's Σ dY ⊙ z; + DoRA's norm kernel, no dropout; + the
    # reduction's two single-pass variants with s·dY·B, ± Σ dY ⊙ z, no dropout); + for sm_90 the TMA
    # variants: 3 dtypes × (4 variants + the decode-sized config of one) × (forward, dX, dX with dropout)
    assert result.stdout.count("ok ") == 2 * 3 * (2 * 10 + 1 + 2) + 3 * 5 * 3


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_static_cost_tool_reports_every_launch():
    """``tools/kernel_static_cost.py`` (the register/spill figures of benchmarks/NOTES.md) still runs, here on a
    small DoRA problem with dropout: the norm, forward and backward launches, each with its resources."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = SCRIPT.parent / "kernel_static_cost.py"
    args = ["--shape", "64", "64", "64", "8", "--dropout", "0.1", "--dora"]
    result = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if "registers=" in line]
    assert rows[0].startswith("_dora_norm_kernel") and len(rows) >= 6, result.stdout
