"""What the PEFT test files share (``test_peft.py``, ``test_peft_adapters.py``, ``test_peft_bases.py``): the
models they build and the comparisons they make against PEFT's own forward (fp32, torch backend unless a
test says otherwise). Their fixtures (``base_model``, ``ids``, the call counters) are in conftest.py."""

from __future__ import annotations

import copy
import warnings

import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from torch import nn

import lora_kernels.peft as lk_peft
from lora_kernels import use_backend
from lora_kernels.testing import LLAMA_PROJECTIONS, tiny_llama

TARGETS = LLAMA_PROJECTIONS


def randomize_lora(model) -> None:
    """Non-zero B (PEFT and our default init start at B = 0, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def randomize_lora_biases(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(std=0.1)


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def loss_and_grads_with(model, ids, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def peft_model(base_model, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)
    model = get_peft_model(copy.deepcopy(base_model), config)
    randomize_lora(model)
    return model


def assert_same_logits_and_grads(fused, reference, ids, **kwargs):
    with use_backend("torch"):
        logits, grads = loss_and_grads_with(fused, ids, **kwargs)
    ref_logits, ref_grads = loss_and_grads_with(reference, ids, **kwargs)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def fused_copy_agrees(reference, ids, calls: list):
    """A fused copy of ``reference``: every LoRA layer fuses silently, logits and gradients are PEFT's, and
    ``calls`` (a counting fixture) saw one call a layer. Returns the copy."""
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
    assert_same_logits_and_grads(fused, reference, ids)
    assert len(calls) == 2 * len(TARGETS)
    return fused


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def one_layer_llama() -> nn.Module:
    """A Llama of one layer, width 32 and a vocabulary of 64 (seeded)."""
    torch.manual_seed(0)
    return tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)


def two_adapters(base_model, **other):
    reference = peft_model(base_model)
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, **other))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B.other" in name:
                p.normal_(std=0.05)
    return reference


def mixed_model(order: tuple[str, str]) -> nn.Module:
    """A PeftMixedModel with LoHa and LoRA on ``lin``; the adapter added first is the inner layer."""
    torch.manual_seed(0)
    configs = {
        "loha": LoHaConfig(r=4, alpha=4, target_modules=["lin"], init_weights=False),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False),
    }
    first, second = order
    model = get_peft_model(TwoLayers(), configs[first], adapter_name=first, mixed=True)
    model.add_adapter(second, configs[second])
    model.set_adapter([first, second])
    return model.eval()


def peft_two_layers(device) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    randomize_lora(model)
    return model.eval().to(device)
