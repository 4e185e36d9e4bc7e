"""Several adapters trained at once over one frozen base: ``inject_lora(..., adapters=...)``,
:class:`lora_kernels.MultiLoRALinear` and :func:`lora_kernels.adapter_rows`.

The claim under test: in one step on a mixed batch, each adapter's gradients (hence its update) equal those
of training it alone on its own samples, dropout included; each adapter saves as its own PEFT directory.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_kernels
from lora_kernels import MultiLoRALinear, adapter_rows, inject_lora, use_backend
from lora_kernels.testing import LLAMA_PROJECTIONS, tiny_llama

transformers = pytest.importorskip("transformers")

ADAPTERS = {"alice": {"r": 4, "lora_alpha": 8}, "bob": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1}}


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return tiny_llama(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)


def _multi(base_model, **common):
    model = inject_lora(copy.deepcopy(base_model), LLAMA_PROJECTIONS, adapters=ADAPTERS, **common)
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            for adapter in layer.adapters.values():
                torch.nn.init.normal_(adapter.lora_B, std=0.2)
    return model


def _per_sample_loss(model, ids, names):
    """Sum over samples of each sample's mean token loss (so samples' gradients add up)."""
    with adapter_rows(model, names):
        logits = model(ids).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    ).mean(1)
    return losses.sum(), logits


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("training", [False, True])
def test_each_adapter_gets_the_gradients_of_training_alone(base_model, backend, training):
    model = _multi(base_model).train(training)
    ids = torch.randint(0, 128, (5, 9))
    names = ["bob", "alice", None, "alice", "bob"]
    with use_backend(backend.name):
        torch.manual_seed(7)  # the adapters' dropout seeds are drawn per layer call
        loss, logits = _per_sample_loss(model, ids, names)
        loss.backward()
        mixed = _grads(model)
        model.zero_grad()
        for name in ("alice", "bob"):
            rows = [i for i, n in enumerate(names) if n == name]
            torch.manual_seed(7)
            alone_loss, alone_logits = _per_sample_loss(model, ids[rows], [name] * len(rows))
            # the same seeds drawn per layer, the masks by position in the adapter's rows: the same masks
            torch.testing.assert_close(alone_logits, logits[rows], atol=1e-5, rtol=1e-5)
            alone_loss.backward()
            alone = _grads(model)
            model.zero_grad()
            own = {k: v for k, v in mixed.items() if f".adapters.{name}." in k}
            assert own and own.keys() == {k for k in alone if f".adapters.{name}." in k}
            for key, grad in own.items():
                torch.testing.assert_close(grad, alone[key], atol=1e-5, rtol=1e-4, msg=key)
    with torch.no_grad():  # the base sample: the base model's logits
        plain = base_model(ids[2:3]).logits
    torch.testing.assert_close(logits[2:3], plain, atol=1e-5, rtol=1e-5)


def test_matches_single_adapter_layers_without_dropout(base_model):
    """The same adapter weights in FusedLoRALinear layers (one adapter) give the same logits and grads."""
    model = _multi(base_model)
    single = inject_lora(copy.deepcopy(base_model), LLAMA_PROJECTIONS, r=4, lora_alpha=8)
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, MultiLoRALinear):
                fused = single.get_submodule(name)
                fused.lora_A.copy_(layer.adapters["alice"].lora_A)
                fused.lora_B.copy_(layer.adapters["alice"].lora_B)
    ids = torch.randint(0, 128, (3, 7))
    with use_backend("torch"):
        loss, logits = _per_sample_loss(model, ids, ["alice"] * 3)
        loss.backward()
        ref = single(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    ref_loss = torch.nn.functional.cross_entropy(ref[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    ref_loss.mean(1).sum().backward()
    for name, p in single.named_parameters():
        if p.grad is not None:
            module, _, param = name.rpartition(".")
            torch.testing.assert_close(
                model.get_parameter(f"{module}.adapters.alice.{param}").grad, p.grad, atol=1e-5, rtol=1e-4
            )


def test_each_adapter_saves_as_its_own_peft_directory(base_model, tmp_path):
    peft = pytest.importorskip("peft")
    model = _multi(base_model).eval()
    ids = torch.randint(0, 128, (2, 8))
    for name in ADAPTERS:
        lora_kernels.peft.save_adapter(model, tmp_path / name, adapter=name)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / name).eval()
        with torch.no_grad(), use_backend("torch"), adapter_rows(model, [name, name]):
            ours = model(ids).logits
        with torch.no_grad():
            theirs = loaded(ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no layer of the model has an adapter 'carol'"):
        lora_kernels.peft.save_adapter(model, tmp_path / "c", adapter="carol")


def test_outside_a_block_every_adapter_applies_and_state_dict_names(base_model):
    model = _multi(base_model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad(), use_backend("torch"):
        both = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        for adapter in layer.adapters.values():
            expected = expected + adapter.scaling * (x @ adapter.lora_A.t()) @ adapter.lora_B.t()
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    keys = set(layer.state_dict())
    assert {"weight", "adapters.alice.lora_A", "adapters.bob.lora_B"} <= keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)


def test_clear_errors(base_model):
    model = _multi(base_model)
    with pytest.raises(ValueError, match="no adapter 'carol'"), adapter_rows(model, ["carol"]):
        pass
    with pytest.raises(ValueError, match="samples"), adapter_rows(model, ["alice"] * 3):
        model(torch.randint(0, 128, (2, 4)))
    with pytest.raises(ValueError, match="use_dora"):
        inject_lora(copy.deepcopy(base_model), ["q_proj"], adapters=["a"], use_dora=True)
    with pytest.raises(ValueError, match="already"):
        inject_lora(model, ["q_proj"], adapters=["alice"])
