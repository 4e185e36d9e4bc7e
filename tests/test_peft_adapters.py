"""lora_kernels.peft with several adapters against PEFT: mixed batches (``adapter_names=``), several active
adapters, and DoRA among them (PEFT's order-dependent chain): outputs and every gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft_helpers import (  # noqa: E402
    TARGETS,
    assert_same_logits_and_grads,
    fused_copy_agrees,
    loss_and_grads_with,
    peft_model,
    randomize_lora,
    randomize_lora_biases,
    two_adapters,
)

import lora_kernels.peft as lk_peft  # noqa: E402
from lora_kernels import use_backend  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_mixed_batch_runs_fused_with_peft_s_outputs_and_gradients(base_model, backend, grouped_calls):
    reference = two_adapters(base_model).eval()  # PEFT takes adapter_names in eval mode only
    for name, p in reference.named_parameters():  # gradients still flow to every adapter it names
        if "lora_" in name:
            p.requires_grad_(True)
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    ids = torch.randint(0, 128, (4, 7))
    names = ["other", "default", "__base__", "other"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_backend(backend.name):
            logits, grads = loss_and_grads_with(fused, ids, adapter_names=names)
    ref_logits, ref_grads = loss_and_grads_with(reference, ids, adapter_names=names)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and any(".other." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert len(grouped_calls) == 2 * len(TARGETS)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own errors first
        fused(input_ids=ids, adapter_names=names[:3])


def test_several_active_adapters_run_fused(base_model, ids, grouped_calls):
    reference = two_adapters(base_model, lora_dropout=0.0)
    reference.base_model.set_adapter(["default", "other"])
    fused_copy_agrees(reference, ids, grouped_calls)


def test_mixed_batch_with_dora_raises_peft_s_error_and_merged_layers_fall_back(base_model, ids):
    reference = two_adapters(base_model)
    reference.eval()
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    fused.merge_adapter()
    reference.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    dora = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    ).eval()
    lk_peft.fuse(dora)
    with pytest.raises(ValueError, match="DoRA"):
        dora(input_ids=ids, adapter_names=["default", "default"])


def test_lora_bias_among_several_active_adapters_with_dora(base_model, ids, grouped_calls):
    """A plain LoRA adapter with lora_bias before a DoRA adapter: its s·b_B is rescaled by the DoRA
    adapter as in PEFT's loop (PEFT refuses lora_bias on a DoRA adapter itself)."""
    reference = peft_model(base_model, lora_bias=True)
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, use_dora=True))
    randomize_lora(reference)
    randomize_lora_biases(reference)
    reference.base_model.set_adapter(["default", "other"])
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
    assert_same_logits_and_grads(fused, reference, ids)
    assert any(n.endswith("lora_B.default.bias") for n, p in fused.named_parameters() if p.grad is not None)
    assert grouped_calls


@pytest.mark.parametrize("order", [("default", "other"), ("other", "default")])
@pytest.mark.parametrize("training", [False, True])
def test_several_active_adapters_with_dora_keep_peft_s_order(base_model, order, training, grouped_calls):
    """A DoRA adapter rescales what the adapters before it made (PEFT's loop): the fused chain gives PEFT's
    logits and gradients, in either order, and with the DoRA adapter's dropout in training (PEFT's own
    dropout module draws its mask, as in PEFT)."""
    reference = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                              lora_dropout=0.1)
    )  # fmt: skip
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    randomize_lora(reference)
    reference.base_model.set_adapter(list(order))
    reference.train(training)
    fused = copy.deepcopy(reference)
    ids = torch.randint(0, 128, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
        torch.manual_seed(5)
        with use_backend("torch"):
            logits, grads = loss_and_grads_with(fused, ids)
    torch.manual_seed(5)
    ref_logits, ref_grads = loss_and_grads_with(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("magnitude" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert grouped_calls
