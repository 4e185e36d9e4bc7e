"""lora_kernels.peft against the real PEFT package on a tiny Llama built from a config (fp32, torch backend).

Then fuse's limits, where a layer keeps PEFT's forward (with a warning, once per reason): LoRA stacked on
another tuner layer (and a tuner layer on LoRA, which fuses), hooks on the wrapped base layer or on the
adapter modules (accelerate's too), a forward someone else replaced, adapters active on some layers
only; and a fused model saved, pickled and copied. The tests there that take the ``backend`` fixture run
on every backend.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft_helpers import (  # noqa: E402
    TARGETS,
    loss_and_grads,
    mixed_model,
    one_layer_llama,
    peft_model,
    peft_two_layers,
    randomize_lora,
)

import lora_kernels.peft as lk_peft  # noqa: E402
from lora_kernels import inject_lora, use_backend  # noqa: E402


def test_lora_kernels_peft_does_not_shadow_peft():
    import importlib

    module = importlib.import_module("peft")
    assert module is peft and hasattr(module, "LoraConfig")
    assert lk_peft.__name__ == "lora_kernels.peft"
    import lora_kernels

    assert lora_kernels.peft is lk_peft


def test_fuse_matches_peft_outputs_and_gradients(base_model, ids):
    reference = peft_model(base_model)
    fused = copy.deepcopy(reference)
    keys = list(fused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
    assert list(fused.state_dict()) == keys
    with use_backend("torch"):
        logits, grads = loss_and_grads(fused, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert lk_peft.unfuse(fused) == 2 * len(TARGETS)
    assert "forward" not in fused.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_fuse_with_dropout_trains_and_is_exact_in_eval(base_model, ids):
    reference = peft_model(base_model, lora_dropout=0.1)
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    fused.train()
    with use_backend("torch"):
        _, grads = loss_and_grads(fused, ids)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
        fused.eval()
        reference.eval()
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_fuse_save_pretrained_is_peft_s(base_model, tmp_path):
    model = peft_model(base_model)
    lk_peft.fuse(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    for (n, p), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2), n


def test_save_adapter_loads_in_peft(base_model, ids, tmp_path):
    ours = inject_lora(copy.deepcopy(base_model), TARGETS, r=4, lora_alpha=8)
    randomize_lora(ours)
    lk_peft.save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path, is_trainable=True)
    with use_backend("torch"):
        logits, grads = loss_and_grads(ours, ids)
    ref_logits, ref_grads = loss_and_grads(loaded, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():  # ours: ...q_proj.lora_A; PEFT: ...q_proj.lora_A.default.weight
        peft_name = "base_model.model." + name + ".default.weight"
        torch.testing.assert_close(grad, ref_grads[peft_name], rtol=1e-4, atol=1e-5)


def test_save_adapter_with_partial_targets_and_rank_pattern(base_model, ids, tmp_path):
    ours = inject_lora(copy.deepcopy(base_model), [r"model.layers.0.self_attn.q_proj"], r=4, lora_alpha=8)
    inject_lora(ours, ["model.layers.1.mlp.up_proj"], r=2, lora_alpha=2)
    randomize_lora(ours)
    lk_peft.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_load_adapter_from_peft(base_model, ids, tmp_path):
    reference = peft_model(base_model, use_rslora=True)
    reference.save_pretrained(tmp_path)
    ours = lk_peft.load_adapter(copy.deepcopy(base_model), tmp_path)
    with use_backend("torch"):
        logits, grads = loss_and_grads(ours, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads["base_model.model." + name + ".default.weight"], rtol=1e-4, atol=1e-5
        )


def test_load_adapter_rejects_lora_bias(base_model, tmp_path):
    peft_model(base_model, lora_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias"):
        lk_peft.load_adapter(copy.deepcopy(base_model), tmp_path)


def test_lora_on_another_tuner_layer_runs_fused(backend, fresh_warnings, grouped_calls):
    """LoRA over LoHa (a PeftMixedModel): the LoHa layer is called as PEFT calls it, its output passed to
    the grouped op, which adds the LoRA term."""
    reference = mixed_model(("loha", "lora")).to(backend.device)
    lora_layer = reference.base_model.model.lin
    assert isinstance(lora_layer, peft.tuners.lora.Linear)  # lora.Linear over loha.Linear over nn.Linear
    assert isinstance(lora_layer.base_layer, peft.tuners.loha.Linear)
    fused = copy.deepcopy(reference)
    x = torch.randn(5, 16, device=backend.device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1
        with use_backend(backend.name):
            y = fused(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert grouped_calls
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    (grad_x_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-5, atol=1e-5)


def test_tuner_layer_on_lora_still_fuses(backend, fresh_warnings, fused_calls):
    reference = mixed_model(("lora", "loha")).to(
        backend.device
    )  # loha.Linear over lora.Linear over nn.Linear
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1
        x = torch.randn(5, 16, device=backend.device)
        with use_backend(backend.name):
            torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    assert fused_calls


def test_base_layer_hooks_run_after_fuse(backend, fresh_warnings, fused_calls, grouped_calls):
    reference = peft_two_layers(backend.device)
    fused = copy.deepcopy(reference)
    assert lk_peft.fuse(fused) == 1
    x = torch.randn(5, 16, device=backend.device)
    with use_backend(backend.name):
        plain = fused(x)
    assert len(fused_calls) == 1

    seen = {"reference": 0, "fused": 0}
    handles = []
    for name, model in (("reference", reference), ("fused", fused)):
        base = model.base_model.model.lin.base_layer

        def record(module, args, output, name=name):
            seen[name] += 1

        # added after fuse: the fused forward decides at call time
        handles.append(base.register_forward_pre_hook(lambda module, args: (args[0] * 2,)))
        handles.append(base.register_forward_hook(record))
    with use_backend(backend.name), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fused(x)  # the base layer called with its hooks, its output into the grouped op
    torch.testing.assert_close(y, reference(x))
    assert not torch.allclose(y, plain)
    assert seen == {"reference": 1, "fused": 1}
    assert len(fused_calls) == 1 and len(grouped_calls) == 1

    for handle in handles:
        handle.remove()
    with use_backend(backend.name):
        torch.testing.assert_close(fused(x), plain)
    assert len(fused_calls) == 2  # the single-adapter op again once the hooks are gone


def test_adapter_module_hooks_and_accelerate_hooks_are_honoured(backend, fresh_warnings, fused_calls):
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class Doubling(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 2, *args[1:]), kwargs

    reference = peft_two_layers(backend.device)
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    x = torch.randn(5, 16, device=backend.device)
    for model in (reference, fused):
        accelerate_hooks.add_hook_to_module(model.base_model.model.lin.base_layer, Doubling())
    with use_backend(backend.name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused(x), reference(x))
    assert not fused_calls
    for model in (reference, fused):
        accelerate_hooks.remove_hook_from_module(model.base_model.model.lin.base_layer)
        model.base_model.model.lin.lora_A["default"].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    with use_backend(backend.name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fused(x), reference(x))
    assert not fused_calls


def test_fuse_keeps_a_forward_someone_else_replaced(fresh_warnings):
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class Doubling(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 2, *args[1:]), kwargs

    reference = peft_two_layers("cpu")
    fused = copy.deepcopy(reference)
    for model in (reference, fused):
        accelerate_hooks.add_hook_to_module(model.base_model.model.lin, Doubling())
    with pytest.warns(UserWarning, match="forward"):
        assert lk_peft.fuse(fused) == 0
    x = torch.randn(5, 16)
    torch.testing.assert_close(fused(x), reference(x))
    assert lk_peft.unfuse(fused) == 0
    torch.testing.assert_close(fused(x), reference(x))


def test_fused_peft_model_saves_pickles_and_copies(backend, tmp_path, fused_calls):
    model = get_peft_model(one_layer_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora(model)
    model = model.to(backend.device)
    n_fused = lk_peft.fuse(model)
    assert n_fused == len(TARGETS)
    ids = torch.randint(0, 64, (2, 6), device=backend.device)
    with use_backend(backend.name), torch.no_grad():
        expected = model(input_ids=ids).logits

    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    copies = {
        "torch.load": loaded,
        "pickle": pickle.loads(pickle.dumps(model)),
        "deepcopy": copy.deepcopy(model),
    }
    for how, other in copies.items():
        fused_calls.clear()
        with use_backend(backend.name), torch.no_grad():
            torch.testing.assert_close(
                other(input_ids=ids).logits, expected, msg=lambda m, h=how: f"{h}: {m}"
            )
        assert len(fused_calls) == n_fused, how  # still runs fused
        assert lk_peft.unfuse(other) == n_fused, how
    # the copies do not share their layers with the original
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lk_peft.unfuse(model) == n_fused
    assert "forward" not in q_proj.__dict__


def test_fused_forward_refers_to_its_own_layer_after_a_copy():
    model = peft_two_layers("cpu")
    lk_peft.fuse(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.model.lin.lora_B["default"].weight.zero_()
    x = torch.randn(3, 16)
    base = twin.base_model.model
    with use_backend("torch"):
        torch.testing.assert_close(twin(x), base.out(torch.tanh(base.lin.base_layer(x))))
        assert not torch.allclose(model(x), twin(x))


def test_fuse_warns_only_for_layers_that_should_fuse(fresh_warnings, fused_calls):
    reference = get_peft_model(one_layer_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    reference.set_adapter("other")
    randomize_lora(reference)
    fused = copy.deepcopy(reference)
    ids = torch.randint(0, 64, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1  # only q_proj holds "other"
        with use_backend("torch"), torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert len(fused_calls) == 1
        fused.merge_adapter()
        reference.merge_adapter()
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns "Already unmerged" for the layers without "other"
        fused.unmerge_adapter()
        reference.unmerge_adapter()
    for model in (fused, reference):
        model.base_model.set_adapter(["default", "other"])
    with warnings.catch_warnings():  # several active adapters run fused (the grouped op), silently
        warnings.simplefilter("error")
        with use_backend("torch"), torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
