"""A merged layer's state dict, saved and loaded: of a layer and of a model.

A merged ``FusedLoRALinear``'s state dict loads strictly (through ``torch.save`` / ``torch.load`` too) into
a fresh layer, a merged one and an injected model, which come back merged and unmerge; adapter-only state
dicts load into a merged layer. (The unmerged round trips: ``test_module.py``, ``test_inject.py``.)
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

import lora_kernels
from lora_kernels import FusedLoRALinear, inject_lora, lora_state_dict, use_backend


def test_merged_state_dict_loads_as_merged(backend):
    device = backend.device
    layer = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, device=device).eval()
    x = torch.randn(4, 12, device=device)
    with use_backend(backend.name):
        expected = layer(x)
        unmerged_sd = copy.deepcopy(layer.state_dict())
        assert set(unmerged_sd) == {"weight", "bias", "lora_A", "lora_B"}  # unchanged format when unmerged
        layer.merge()
        merged_sd = copy.deepcopy(layer.state_dict())

        buffer = io.BytesIO()
        torch.save(merged_sd, buffer)
        buffer.seek(0)
        fresh = FusedLoRALinear(12, 10, r=3, device=device).eval()
        fresh.load_state_dict(torch.load(buffer))  # strict
        assert fresh.merged
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
        fresh.unmerge()
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh.weight, unmerged_sd["weight"], rtol=1e-5, atol=1e-5)

        # a merged layer loading a merged state dict, and one loading an unmerged (old-format) one
        merged_target = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, device=device).eval()
        merged_target.merge()
        merged_target.load_state_dict(merged_sd)
        assert merged_target.merged
        torch.testing.assert_close(merged_target(x), expected, rtol=1e-5, atol=1e-5)
        merged_target.load_state_dict(unmerged_sd)  # strict, no extra state: the weight is the base weight
        assert not merged_target.merged
        torch.testing.assert_close(merged_target(x), expected, rtol=1e-5, atol=1e-5)


def test_adapter_only_state_dict_into_a_merged_layer(backend):
    device = backend.device
    source = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, device=device).eval()
    target = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, device=device).eval()
    target.load_state_dict({"weight": source.weight, "bias": source.bias}, strict=False)
    x = torch.randn(4, 12, device=device)
    with use_backend(backend.name):
        expected = source(x)
        target.merge()
        adapters = {k: v for k, v in source.state_dict().items() if k.startswith("lora_")}
        target.load_state_dict(adapters, strict=False)
        assert target.merged
        torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-5)
        target.unmerge()
        torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_model_state_dict_round_trip():
    model = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), ["0", "1"], init_lora_weights=False)
    x = torch.randn(3, 8)
    with use_backend("torch"):
        expected = model(x)
    lora_kernels.merge_lora(model)
    other = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), ["0", "1"])
    other.load_state_dict(model.state_dict())
    assert all(layer.merged for layer in lora_kernels.inject.lora_layers(other).values())
    torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
    assert set(lora_state_dict(other)) == {"0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"}
