"""lora_kernels.peft against the real PEFT package on a tiny Llama built from a config (fp32, torch backend)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lora_kernels.peft as lk_peft  # noqa: E402
from lora_kernels import inject_lora, use_backend  # noqa: E402
from lora_kernels.testing import LLAMA_PROJECTIONS, tiny_llama  # noqa: E402

TARGETS = LLAMA_PROJECTIONS


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128)


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12))


def _randomize_lora(model) -> None:
    """Non-zero B (PEFT and our default init start at B = 0, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _peft_model(base_model, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)
    model = get_peft_model(copy.deepcopy(base_model), config)
    _randomize_lora(model)
    return model


def test_lora_kernels_peft_does_not_shadow_peft():
    import importlib

    module = importlib.import_module("peft")
    assert module is peft and hasattr(module, "LoraConfig")
    assert lk_peft.__name__ == "lora_kernels.peft"
    import lora_kernels

    assert lora_kernels.peft is lk_peft


def test_fuse_matches_peft_outputs_and_gradients(base_model, ids):
    reference = _peft_model(base_model)
    fused = copy.deepcopy(reference)
    keys = list(fused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
    assert list(fused.state_dict()) == keys
    with use_backend("torch"):
        logits, grads = _loss_and_grads(fused, ids)
    ref_logits, ref_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert lk_peft.unfuse(fused) == 2 * len(TARGETS)
    assert "forward" not in fused.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_fuse_with_dropout_trains_and_is_exact_in_eval(base_model, ids):
    reference = _peft_model(base_model, lora_dropout=0.1)
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    fused.train()
    with use_backend("torch"):
        _, grads = _loss_and_grads(fused, ids)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
        fused.eval()
        reference.eval()
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_fuse_save_pretrained_is_peft_s(base_model, tmp_path):
    model = _peft_model(base_model)
    lk_peft.fuse(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    for (n, p), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2), n


def test_unfusable_layers_warn_and_keep_peft_forward(base_model, ids):
    reference = _peft_model(base_model, lora_bias=True)
    fused = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="lora_bias"):
        assert lk_peft.fuse(fused) == 0
    torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_mixed_batch_and_merged_fall_back(base_model, ids):
    reference = _peft_model(base_model)
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    reference.eval()
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    names = ["default", "other"]
    with pytest.warns(UserWarning, match="adapter_names"):
        y = fused(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(y, reference(input_ids=ids, adapter_names=names).logits)
    fused.merge_adapter()
    reference.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_save_adapter_loads_in_peft(base_model, ids, tmp_path):
    ours = inject_lora(copy.deepcopy(base_model), TARGETS, r=4, lora_alpha=8)
    _randomize_lora(ours)
    lk_peft.save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path, is_trainable=True)
    with use_backend("torch"):
        logits, grads = _loss_and_grads(ours, ids)
    ref_logits, ref_grads = _loss_and_grads(loaded, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():  # ours: ...q_proj.lora_A; PEFT: ...q_proj.lora_A.default.weight
        peft_name = "base_model.model." + name + ".default.weight"
        torch.testing.assert_close(grad, ref_grads[peft_name], rtol=1e-4, atol=1e-5)


def test_save_adapter_with_partial_targets_and_rank_pattern(base_model, ids, tmp_path):
    ours = inject_lora(copy.deepcopy(base_model), [r"model.layers.0.self_attn.q_proj"], r=4, lora_alpha=8)
    inject_lora(ours, ["model.layers.1.mlp.up_proj"], r=2, lora_alpha=2)
    _randomize_lora(ours)
    lk_peft.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_load_adapter_from_peft(base_model, ids, tmp_path):
    reference = _peft_model(base_model, use_rslora=True)
    reference.save_pretrained(tmp_path)
    ours = lk_peft.load_adapter(copy.deepcopy(base_model), tmp_path)
    with use_backend("torch"):
        logits, grads = _loss_and_grads(ours, ids)
    ref_logits, ref_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads["base_model.model." + name + ".default.weight"], rtol=1e-4, atol=1e-5
        )


def test_load_adapter_rejects_lora_bias(base_model, tmp_path):
    _peft_model(base_model, lora_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias"):
        lk_peft.load_adapter(copy.deepcopy(base_model), tmp_path)
