"""Regression tests for "Drop-in means drop-in": the module, PEFT interop, inject_lora and the bench CLI.

Each test here failed before its fix. Tests that run the op do so on every backend (``backend`` fixture:
the torch composite, and the Triton kernels, through the interpreter on a CPU machine).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import benchmarks_module
from torch import nn

import lora_kernels
from lora_kernels import (
    FusedLoRALinear,
    inject_lora,
    lora_linear_reference,
    lora_state_dict,
    use_backend,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoHaConfig, LoraConfig, get_peft_model  # noqa: E402

import lora_kernels.peft as lk_peft  # noqa: E402

bench = benchmarks_module("report")  # python benchmarks/report.py

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ helpers


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by ``lora_kernels.peft``'s fused forward."""
    calls = []
    op = lk_peft.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(lk_peft, "lora_linear", counting)
    return calls


@pytest.fixture
def fresh_warnings(monkeypatch):
    """``lora_kernels.peft`` warns once per reason and process: start from none warned."""
    monkeypatch.setattr(lk_peft, "_warned", set())


# ----------------------------------------------------------------- 2. LoRA stacked on another tuner layer


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


def test_lora_on_another_tuner_layer_keeps_peft_forward(backend, fresh_warnings):
    reference = _mixed(("loha", "lora")).to(backend.device)
    lora_layer = reference.base_model.model.lin
    assert isinstance(lora_layer, peft.tuners.lora.Linear)  # lora.Linear over loha.Linear over nn.Linear
    assert isinstance(lora_layer.base_layer, peft.tuners.loha.Linear)
    fused = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="tuner layer"):
        assert lk_peft.fuse(fused) == 0
    x = torch.randn(5, 16, device=backend.device)
    with use_backend(backend.name):
        torch.testing.assert_close(fused(x), reference(x))


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


# ---------------------------------------------------------------------- 3. hooks on the wrapped base layer


def _peft_two_layers(device) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    _randomize_lora(model)
    return model.eval().to(device)


def test_base_layer_hooks_run_after_fuse(backend, fresh_warnings, fused_calls):
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
    with use_backend(backend.name), pytest.warns(UserWarning, match="hook"):
        y = fused(x)
    torch.testing.assert_close(y, reference(x))
    assert not torch.allclose(y, plain)
    assert seen == {"reference": 1, "fused": 1}
    assert len(fused_calls) == 1  # PEFT's forward ran, not the fused op

    for handle in handles:
        handle.remove()
    with use_backend(backend.name):
        torch.testing.assert_close(fused(x), plain)
    assert len(fused_calls) == 2  # fused again once the hooks are gone


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


# ------------------------------------------------------------------------ 4. a merged layer's state dict


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


# -------------------------------------------------------------------- 6. saving and copying a fused model


def test_fused_peft_model_saves_pickles_and_copies(backend, tmp_path, fused_calls):
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
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


# ------------------------------------------------------------------------------------- bench command line


def test_bench_quick_writes_outside_the_committed_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(bench, "quick_cases", lambda device: [bench.Case(16, 32, 24, 4, 0.0, "fp32", "fwd")])
    assert bench.main(["--quick", "--modes", "fwd", "--providers", "torch", "--device", "cpu"]) == 0
    assert not (tmp_path / "benchmarks").exists()
    out = capsys.readouterr().out
    written = re.search(r"wrote (\S+results\.json)", out)
    assert written, out
    path = written.group(1)
    assert path.startswith(str(tmp_path / "tmp")), path
    assert (tmp_path / "tmp").joinpath(path[len(str(tmp_path / "tmp")) + 1 :]).exists()


def test_bench_rejects_unknown_providers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # were the name accepted, a run would write here, not into the repo
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--providers", "torch,tritn", "--device", "cpu"])
    assert exc.value.code == 2
    assert "tritn" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"r": True}, "r"),
        ({"r": 2.0}, "r"),
        ({"r": -1}, "r"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"lora_alpha": "8"}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": True}, "lora_dropout"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"in_features": True}, "in_features"),
        ({"in_features": 4.0}, "in_features"),
        ({"out_features": -3}, "out_features"),
        ({"out_features": None}, "out_features"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"in_features": 4, "out_features": 3, **kwargs}
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        FusedLoRALinear(**args)


def test_bad_arguments_of_from_linear():
    with pytest.raises(TypeError, match=r"\br\b"):
        FusedLoRALinear.from_linear(nn.Linear(4, 3), r=True)


# ------------------------------------------------------------------------------------ fuse warns falsely


def test_fuse_warns_only_for_layers_that_should_fuse(fresh_warnings, fused_calls):
    reference = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
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
    fused.unmerge_adapter()  # PEFT warns "Already unmerged" for the layers without "other"
    fused.base_model.set_adapter(["default", "other"])
    with pytest.warns(UserWarning, match="2 active adapters"):
        fused(input_ids=ids)


# ------------------------------------------------------------------------------------- reset_parameters


def test_reset_parameters_after_meta_init(backend):
    layer = FusedLoRALinear(64, 48, r=4, lora_alpha=8, device="meta")
    layer.to_empty(device=backend.device)
    layer.reset_parameters()
    bound = 1 / math.sqrt(64)
    reference = nn.Linear(64, 48)
    for name in ("weight", "bias"):
        tensor = getattr(layer, name)
        assert tensor.abs().max() <= bound and tensor.std() > 0.5 * bound / math.sqrt(3)
        assert not tensor.requires_grad
        assert tensor.std().item() == pytest.approx(getattr(reference, name).std().item(), rel=0.25)
    assert layer.lora_A.abs().max() <= bound and torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    x = torch.randn(5, 64, device=backend.device)
    with use_backend(backend.name):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_reset_parameters_of_a_merged_layer_unmerges():
    layer = FusedLoRALinear(8, 6, r=2, init_lora_weights=False)  # reset keeps this init: B random
    layer.merge()
    layer.reset_parameters()
    assert not layer.merged and torch.count_nonzero(layer.lora_B) > 0
    x = torch.randn(3, 8)
    expected = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    with use_backend("torch"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- inject_lora into nn.MultiheadAttention


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_inject_warns_for_mha_out_proj():
    with pytest.warns(UserWarning, match=r"attn\.out_proj.*MultiheadAttention"):
        inject_lora(WithAttention(), ["out_proj", "proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_lora(WithAttention(), ["proj"])
