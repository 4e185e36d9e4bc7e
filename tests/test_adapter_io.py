"""lora_kernels.adapter_io: PEFT's adapter file format, written and read back without PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_kernels import adapter_io, inject_lora, use_backend
from lora_kernels.inject import lora_layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    return model


def test_round_trip_keeps_outputs_ranks_and_alphas(tmp_path):
    ours = inject_lora(_model(), ["0", "2"], r=4, lora_alpha=8, use_rslora=True)
    inject_lora(ours, ["4"], r=2, lora_alpha=3, use_rslora=True)
    _randomized(ours)
    adapter_io.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["rank_pattern"] == {"^4$": 2} and config["alpha_pattern"] == {"^4$": 3}
    loaded = adapter_io.load_adapter(_model(), tmp_path)
    x = torch.randn(5, 8)
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x))
    layers = lora_layers(loaded)
    assert {n: (m.r, m.lora_alpha, m.scaling) for n, m in layers.items()} == {
        n: (m.r, m.lora_alpha, m.scaling) for n, m in lora_layers(ours).items()
    }
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B")
    }


def test_save_refuses_layers_with_different_dropouts(tmp_path):
    """PEFT's LoraConfig has one lora_dropout: saving the largest would silently change the others."""
    model = inject_lora(_model(), ["0", "2"], lora_dropout=0.1)
    inject_lora(model, ["4"], lora_dropout=0.0)
    with pytest.raises(ValueError, match=r"one lora_dropout.*lora_dropout=0\.1: 0, 2; lora_dropout=0\.0: 4"):
        adapter_io.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_load_into_an_injected_model_takes_the_adapters_alpha_and_dropout(tmp_path):
    source = _randomized(inject_lora(_model(), ["2"], r=4, lora_alpha=16, lora_dropout=0.25))
    adapter_io.save_adapter(source, tmp_path)
    target = inject_lora(_model(), ["2"], r=4, lora_alpha=4)
    adapter_io.load_adapter(target, tmp_path)
    assert target[2].lora_alpha == 16 and target[2].scaling == 4.0
    assert target[2].lora_dropout == 0.25  # as PeftModel.from_pretrained, the adapter's dropout
    torch.testing.assert_close(target[2].lora_B, source[2].lora_B)


def test_load_checks_everything_before_changing_the_model(tmp_path):
    adapter_io.save_adapter(_randomized(inject_lora(_model(), ["0", "2"], r=4)), tmp_path)
    smaller = nn.Sequential(nn.Linear(8, 16), nn.ReLU())  # has "0", lacks "2"
    with pytest.raises(ValueError, match="'2', which the model does not have"):
        adapter_io.load_adapter(smaller, tmp_path)
    assert isinstance(smaller[0], nn.Linear) and smaller[0].weight.requires_grad
    wrong_rank = inject_lora(_model(), ["2"], r=2)
    with pytest.raises(ValueError, match="FusedLoRALinear of rank 2, the adapter has rank 4"):
        adapter_io.load_adapter(wrong_rank, tmp_path)


def test_peft_module_re_exports_the_file_format():
    import lora_kernels.peft

    assert lora_kernels.peft.save_adapter is adapter_io.save_adapter
    assert lora_kernels.peft.load_adapter is adapter_io.load_adapter


def test_adapter_on_a_tied_lm_head_loads_as_peft_loads_it(tmp_path):
    """PEFT saves the tied lm_head's own weight beside an adapter on it (save_embedding_layers="auto");
    load_adapter loads it as PeftModel.from_pretrained does, into the tied weight, and gives its logits."""
    peft = pytest.importorskip("peft")
    from lora_kernels.testing import tiny_llama

    def base():
        torch.manual_seed(0)
        return tiny_llama(num_hidden_layers=1, tie_word_embeddings=True)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    trained = peft.get_peft_model(base(), config)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        trained.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    reference = peft.PeftModel.from_pretrained(base(), tmp_path)
    ours = adapter_io.load_adapter(base(), tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 128, (2, 7))
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_base_tensor_that_fits_no_parameter_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    adapter_io.save_adapter(_randomized(inject_lora(_model(), ["2"], r=4)), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(file)
    state["base_model.model.2.base_layer.weight"] = torch.zeros(16, 17)
    save_file(state, file)
    model = _model()
    with pytest.raises(ValueError, match=r"base-layer tensor 2\.weight \(16, 17\).*save_embedding_layers"):
        adapter_io.load_adapter(model, tmp_path)
    assert isinstance(model[2], nn.Linear)
