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
