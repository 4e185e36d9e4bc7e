"""``python -m lora_kernels demo --quick`` runs end to end (torch backend, a few steps)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_demo_quick(capsys):
    from lora_kernels.__main__ import main

    assert main(["demo", "--quick", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "lora_kernels backend: torch" in out
    assert "time per train step" in out or "peft` is not installed" in out
    assert "all checks passed" in out


def test_demo_without_peft_comparison(capsys):
    from lora_kernels.demo import main

    assert main(["--steps", "3", "--backend", "torch", "--no-peft"]) == 0
    assert "fine-tune the adapters for 3 steps" in capsys.readouterr().out
