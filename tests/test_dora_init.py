"""A fresh DoRA layer is exactly its base layer, bit for bit.

At initialisation ``c = m / ‖W + s·B·A‖`` is exactly 1 and the bias is added in ``F.linear``'s order, so a
fresh ``use_dora`` layer (every dtype, with and without bias), a model after ``inject_lora(use_dora=True)``
and a fused PEFT DoRA model give their base's output exactly (the fused PEFT model: PEFT's, exactly).

Apart from ``test_dora.py``, which skips as a whole without PEFT: only the last test here needs it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import skip_unless_dtype_runs
from torch import nn

from lora_kernels import FusedLoRALinear, inject_lora, lora_linear, use_backend, use_path
from lora_kernels.ops import LoRAParams, run_dora_forward


@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_dora_layer_is_exactly_the_base_layer(dtype, adapter_dtype, bias):
    """The torch path (CPU, and the CUDA extension's DoRA): bit for bit ``F.linear``'s output."""
    x = torch.randn(2, 7, 96, dtype=dtype)
    with use_backend("torch"), torch.no_grad():  # the magnitude's norm from the backend that runs it
        layer = FusedLoRALinear(
            96, 40, bias=bias, r=4, use_dora=True, dtype=dtype, adapter_dtype=adapter_dtype
        )
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        y = layer.train()(x)  # the dropout form too (p = 0: the same)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fresh_dora_col_scale_is_exactly_one(backend, dtype):
    """``c = m / n`` is 1.0 exactly, and the DoRA output is the same layer's LoRA output bit for bit."""
    skip_unless_dtype_runs(backend, dtype)
    device = backend.device
    with use_backend(backend.name):
        layer = FusedLoRALinear(40, 24, r=4, use_dora=True, dtype=dtype, device=device)
        x = torch.randn(6, 40, dtype=dtype, device=device)
        with torch.no_grad():
            _, _, _, col_scale, _ = run_dora_forward(
                backend.name, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude,
                LoRAParams(layer.scaling, 0.0, 0),
            )  # fmt: skip
            assert torch.equal(col_scale, torch.ones_like(col_scale))
            # DoRA runs the Triton backend's fused GEMM (it is not routed): compare with LoRA on that path
            with use_path("fused" if backend.name == "triton" else "auto"):
                lora = lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
            assert torch.equal(layer(x), lora)


def test_inject_lora_use_dora_is_exactly_the_base_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.GELU(), nn.Linear(200, 50))
    x = torch.rand(10, 300)
    with torch.no_grad(), use_backend("torch"):
        expected = model(x)
        inject_lora(model, ["0", "2"], r=8, use_dora=True)
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("init_lora_weights", [True, False])
def test_fused_peft_dora_model_is_peft_bit_for_bit(init_lora_weights):
    """PEFT's ``test_lora_use_dora_linear``: a fresh DoRA model is the base model (``allclose``); fused, it
    is PEFT's output exactly, fresh (so the base model's) or not."""
    peft = pytest.importorskip("peft")
    from lora_kernels.peft import fuse

    class MyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(300, 200)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    model = MyModule()
    data = torch.rand(10, 300)
    with torch.no_grad():
        base = model(data)
        config = peft.LoraConfig(
            target_modules=["linear"], use_dora=True, init_lora_weights=init_lora_weights
        )
        model = peft.get_peft_model(model, config)
        expected = model(data)
        assert fuse(model) == 1
        with use_backend("torch"):
            fused = model(data)
    assert torch.equal(fused, expected)
    if init_lora_weights:
        assert torch.equal(fused, base)
