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
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

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


def _assert_same_logits_and_grads(fused, reference, ids, **kwargs):
    with use_backend("torch"):
        logits, grads = _loss_and_grads_with(fused, ids, **kwargs)
    ref_logits, ref_grads = _loss_and_grads_with(reference, ids, **kwargs)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def _fused_copy_agrees(reference, ids, calls: list):
    """A fused copy of ``reference``: every LoRA layer fuses silently, logits and gradients are PEFT's, and
    ``calls`` (a counting fixture) saw one call a layer. Returns the copy."""
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
    _assert_same_logits_and_grads(fused, reference, ids)
    assert len(calls) == 2 * len(TARGETS)
    return fused


def _loss_and_grads_with(model, ids, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_bias_runs_fused(base_model, ids, fused_calls):
    reference = _peft_model(base_model, lora_bias=True)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(std=0.1)
    fused = _fused_copy_agrees(reference, ids, fused_calls)
    assert any(n.endswith("lora_B.default.bias") for n, p in fused.named_parameters() if p.grad is not None)


def _two_adapters(base_model, **other):
    reference = _peft_model(base_model)
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, **other))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B.other" in name:
                p.normal_(std=0.05)
    return reference


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_mixed_batch_runs_fused_with_peft_s_outputs_and_gradients(base_model, backend, grouped_calls):
    reference = _two_adapters(base_model).eval()  # PEFT takes adapter_names in eval mode only
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
            logits, grads = _loss_and_grads_with(fused, ids, adapter_names=names)
    ref_logits, ref_grads = _loss_and_grads_with(reference, ids, adapter_names=names)
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
    reference = _two_adapters(base_model, lora_dropout=0.0)
    reference.base_model.set_adapter(["default", "other"])
    _fused_copy_agrees(reference, ids, grouped_calls)


def test_mixed_batch_with_dora_raises_peft_s_error_and_merged_layers_fall_back(base_model, ids):
    reference = _two_adapters(base_model)
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


# ---------------------------------------------------------------------------------- fuse's limits: helpers


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def _one_layer_llama() -> nn.Module:
    """A Llama of one layer, width 32 and a vocabulary of 64 (seeded)."""
    torch.manual_seed(0)
    return tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)


def _counted(monkeypatch, name: str) -> list:
    """The calls of ``lora_kernels.peft.<name>`` from now on (one entry a call)."""
    calls = []
    op = getattr(lk_peft, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(lk_peft, name, counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by ``lora_kernels.peft``'s fused forward."""
    return _counted(monkeypatch, "lora_linear")


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts the grouped op's calls made by ``lora_kernels.peft`` (several adapters, a mixed batch, or a
    base layer called as a module)."""
    return _counted(monkeypatch, "multi_lora_linear")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """``lora_kernels.peft`` warns once per reason and process: start from none warned."""
    monkeypatch.setattr(lk_peft, "_warned", set())


# --------------------------------------------------------------------- LoRA stacked on another tuner layer


def _mixed(order: tuple[str, str]) -> nn.Module:
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


def test_lora_on_another_tuner_layer_runs_fused(backend, fresh_warnings, grouped_calls):
    """LoRA over LoHa (a PeftMixedModel): the LoHa layer is called as PEFT calls it, its output passed to
    the grouped op, which adds the LoRA term."""
    reference = _mixed(("loha", "lora")).to(backend.device)
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
    reference = _mixed(("lora", "loha")).to(backend.device)  # loha.Linear over lora.Linear over nn.Linear
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1
        x = torch.randn(5, 16, device=backend.device)
        with use_backend(backend.name):
            torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    assert fused_calls


# ------------------------------------------------------------------------- hooks on the wrapped base layer


def _peft_two_layers(device) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    _randomize_lora(model)
    return model.eval().to(device)


def test_base_layer_hooks_run_after_fuse(backend, fresh_warnings, fused_calls, grouped_calls):
    reference = _peft_two_layers(backend.device)
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

    reference = _peft_two_layers(backend.device)
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

    reference = _peft_two_layers("cpu")
    fused = copy.deepcopy(reference)
    for model in (reference, fused):
        accelerate_hooks.add_hook_to_module(model.base_model.model.lin, Doubling())
    with pytest.warns(UserWarning, match="forward"):
        assert lk_peft.fuse(fused) == 0
    x = torch.randn(5, 16)
    torch.testing.assert_close(fused(x), reference(x))
    assert lk_peft.unfuse(fused) == 0
    torch.testing.assert_close(fused(x), reference(x))


# ------------------------------------------------------------------------ saving and copying a fused model


def test_fused_peft_model_saves_pickles_and_copies(backend, tmp_path, fused_calls):
    model = get_peft_model(_one_layer_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_lora(model)
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
    model = _peft_two_layers("cpu")
    lk_peft.fuse(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.model.lin.lora_B["default"].weight.zero_()
    x = torch.randn(3, 16)
    base = twin.base_model.model
    with use_backend("torch"):
        torch.testing.assert_close(twin(x), base.out(torch.tanh(base.lin.base_layer(x))))
        assert not torch.allclose(model(x), twin(x))


# -------------------------------------------------------------------- warnings only where fuse should fuse


def test_fuse_warns_only_for_layers_that_should_fuse(fresh_warnings, fused_calls):
    reference = get_peft_model(_one_layer_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    reference.set_adapter("other")
    _randomize_lora(reference)
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


# ------------------------------------------------------------------- GPT-2's Conv1D (fan_in_fan_out) bases


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_bases_run_fused(backend, fused_calls, use_dora):
    """transformers' Conv1D stores its weight (in, out): the op reads its transpose, a view."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    ).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=use_dora
    )
    reference = get_peft_model(gpt2, config).to(backend.device)
    _randomize_lora(reference)
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    ids = torch.randint(0, 50, (2, 9), device=backend.device)
    with use_backend(backend.name):
        logits, grads = _loss_and_grads_with(fused, ids)
    ref_logits, ref_grads = _loss_and_grads_with(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    if not use_dora:
        assert len(fused_calls) == 8


def test_lora_bias_on_a_half_base_with_fp32_adapters(fused_calls):
    """PEFT keeps adapters (and lora_B's bias) in fp32 on an fp16 base: the folded bias takes the base's
    dtype, as the op wants (PEFT's own test_forward_float16 found this)."""
    torch.manual_seed(0)
    reference = get_peft_model(TwoLayers().half(), LoraConfig(r=4, target_modules=["lin"], lora_bias=True))
    assert reference.base_model.model.lin.lora_B["default"].bias.dtype == torch.float32
    with torch.no_grad():
        reference.base_model.model.lin.lora_B["default"].bias.normal_()
    fused = copy.deepcopy(reference)
    lk_peft.fuse(fused)
    x = torch.randn(5, 16, dtype=torch.float16)
    with use_backend("torch"):
        y = fused(x)
    assert y.dtype == torch.float16 and fused_calls
    torch.testing.assert_close(y, reference(x), rtol=2e-3, atol=2e-3)


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
    _randomize_lora(reference)
    reference.base_model.set_adapter(list(order))
    reference.train(training)
    fused = copy.deepcopy(reference)
    ids = torch.randint(0, 128, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * len(TARGETS)
        torch.manual_seed(5)
        with use_backend("torch"):
            logits, grads = _loss_and_grads_with(fused, ids)
    torch.manual_seed(5)
    ref_logits, ref_grads = _loss_and_grads_with(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("magnitude" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert grouped_calls
