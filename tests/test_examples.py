"""The two seed examples reproduce the user's original demos on FusedLoRALinear (loss trajectories equal)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import HAS_TRITON

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_lora_layer(backend, capsys):
    original, fused = _load("seed_lora_layer").main(backend=backend)
    assert len(original) == len(fused) == 10 and fused[-1] < fused[0]
    out = capsys.readouterr().out
    assert f"backend: {backend}" in out and "loss trajectories agree" in out


def test_seed_lora_linear_regression(capsys):
    original, fused = _load("seed_lora_linear_regression").main(backend="torch")
    assert len(original) == len(fused) == 200 and fused[-1] < fused[0]
    assert "loss trajectories agree" in capsys.readouterr().out
