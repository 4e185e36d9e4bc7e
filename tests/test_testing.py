"""``lora_kernels.testing`` (the one tolerance table and comparison) and ``python -m lora_kernels check``."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.testing import LLAMA_PROJECTIONS, TOLERANCE, assert_close, relative_error, tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_assert_close_accepts_within_and_rejects_beyond_the_tolerance(dtype):
    expected = torch.linspace(-1, 1, 101, dtype=torch.float64)
    tol = TOLERANCE[dtype]
    assert_close(expected + 0.5 * tol, expected, dtype, "within")
    with pytest.raises(AssertionError, match="beyond"):
        assert_close(expected + 3 * tol, expected, dtype, "beyond")
    assert_close(expected + 3 * tol, expected, dtype, "with slack", slack=3.5)
    assert relative_error(expected + 3 * tol, expected) == pytest.approx(3 * tol)


def test_check_command_passes(capsys):
    from lora_kernels.__main__ import main

    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and " ok " in out and "FAIL" not in out


def test_tiny_llama_has_the_projections():
    pytest.importorskip("transformers")
    model = tiny_llama(num_hidden_layers=1)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(LLAMA_PROJECTIONS) <= names
    assert not model.training
