"""A merged layer's state dict, saved and loaded: of a layer, of a model, as a Hugging Face checkpoint.

A merged ``FusedLoRALinear`` saves its merged weight with the ``lora_merged`` flag (and DoRA's
``lora_merged_norm``) as tensors, so strict ``load_state_dict``, safetensors, ``torch.save`` and
``save_pretrained`` / ``from_pretrained`` all take it, and a layer loads it back merged and unmerges it;
adapter-only state dicts load into a merged layer; the dict ``_extra_state`` of earlier versions still
loads. (The unmerged round trips: ``test_module.py``, ``test_inject.py``.)
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import FusedLoRALinear, inject_lora, lora_state_dict, use_backend
from lora_kernels.testing import tiny_llama


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


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_save_pretrained_and_from_pretrained(tmp_path, use_dora):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    inject_lora(model, targets, r=4, init_lora_weights=False, use_dora=use_dora)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), use_backend("torch"):
        expected = model(ids).logits
        lora_kernels.merge_lora(model)
        model.save_pretrained(tmp_path)  # safetensors
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()  # plain: the merged weights
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
        # into an injected model, through load_state_dict: it comes back merged, and unmerges
        from safetensors.torch import load_file

        again = inject_lora(tiny_llama(), targets, r=4, use_dora=use_dora).eval()
        again.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
        assert all(layer.merged for layer in lora_kernels.inject.lora_layers(again).values())
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)
        lora_kernels.unmerge_lora(again)
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_layer_safetensors_and_torch_save(tmp_path, use_dora):
    from safetensors.torch import load_model, save_model

    def make():
        return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))

    torch.manual_seed(0)
    model = inject_lora(make(), ["0", "2"], r=3, init_lora_weights=False, use_dora=use_dora)
    with torch.no_grad():
        model[0].lora_B.mul_(3.0)
    x = torch.randn(4, 12)
    with use_backend("torch"):
        expected = model(x).detach()
        lora_kernels.merge_lora(model)
        state = model.state_dict()
        assert state["0.lora_merged"].dtype == torch.bool and state["0.lora_merged"].item()
        assert ("0.lora_merged_norm" in state) == use_dora
        save_model(model, str(tmp_path / "model.safetensors"))
        torch.save(state, tmp_path / "state.pt")
        torch.save(model, tmp_path / "model.pt")
        for load in ("safetensors", "torch.load", "whole model"):
            if load == "whole model":
                other = torch.load(tmp_path / "model.pt", weights_only=False)
            else:
                other = inject_lora(make(), ["0", "2"], r=3, use_dora=use_dora)
                if load == "safetensors":
                    load_model(other, str(tmp_path / "model.safetensors"))  # strict
                else:
                    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # strict
            assert all(layer.merged for layer in lora_kernels.inject.lora_layers(other).values()), load
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
            lora_kernels.unmerge_lora(other)  # DoRA: with the norm it was merged with
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
        # the lora_ keys filtered out, the rest loads strictly into the plain model
        plain = make()
        plain.load_state_dict({k: v for k, v in state.items() if "lora_" not in k})
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_old_extra_state_format_still_loads(use_dora):
    """State dicts saved by earlier versions held ``_extra_state = {"merged": True[, "dora_weight_norm"]}``."""
    torch.manual_seed(0)
    layer = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, use_dora=use_dora)
    x = torch.randn(4, 12)
    with use_backend("torch"):
        expected = layer(x).detach()
        layer.merge()
        state = layer.state_dict()
        old = {"merged": bool(state.pop("lora_merged"))}
        if use_dora:
            old["dora_weight_norm"] = state.pop("lora_merged_norm")
        state["_extra_state"] = old
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        other = FusedLoRALinear(12, 10, r=3, use_dora=use_dora)
        other.load_state_dict(torch.load(buffer, weights_only=True))  # strict
        assert other.merged
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
        other.unmerge()
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
