"""The two seed examples reproduce the user's original demos on FusedLoRALinear (loss trajectories equal)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_kernels import available_backends

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The examples build CPU tensors: each backend that runs on the CPU here (triton through the interpreter).
BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in available_backends("cpu"), reason=f"backend {name!r} cannot run the CPU examples here"
        ),
    )
    for name in ("triton", "torch")
]


@pytest.mark.parametrize("backend_name", BACKENDS)  # not conftest's backend fixture: CPU tensors only
def test_seed_lora_layer(backend_name, capsys):
    original, fused = _load("seed_lora_layer").main(backend=backend_name)
    assert len(original) == len(fused) == 10 and fused[-1] < fused[0]
    out = capsys.readouterr().out
    assert f"backend: {backend_name}" in out and "loss trajectories agree" in out


def test_seed_lora_linear_regression(capsys):
    original, fused = _load("seed_lora_linear_regression").main(backend="torch")
    assert len(original) == len(fused) == 200 and fused[-1] < fused[0]
    assert "loss trajectories agree" in capsys.readouterr().out


@pytest.mark.parametrize(("mode", "ranks"), [("tp", 2), ("fsdp-tp", 4)])
def test_tensor_parallel_example_runs_under_torchrun(mode, ranks):
    """examples/tensor_parallel.py under ``torchrun`` on CPU ranks (gloo): the losses of one process."""
    import os
    import re
    import subprocess
    import sys

    env = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLES.parent),
        "LORA_KERNELS_BACKEND": "torch",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(EXAMPLES / "tensor_parallel.py"), "--mode", mode, "--check", "--steps", "3"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    difference = re.search(r"largest loss difference (\S+)", done.stdout)
    assert difference is not None, done.stdout
    assert float(difference.group(1)) < 1e-4 and "step 2: loss" in done.stdout
