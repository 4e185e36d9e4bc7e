"""lora_kernels.adapter_io: PEFT's adapter file format, written and read back without PEFT.

``load_adapter`` into merged layers (the new adapter merged in its turn); the LoRA variants and
initialisations of PEFT's LoraConfig, loaded as ``PeftModel.from_pretrained`` loads them (PiSSA, OLoRA,
...) or refused by name (aLoRA, BD-LoRA, ...); tensors whose shapes do not fit their modules. Every
refusal comes before the model changes. The tests that compare with PEFT skip without it.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

from lora_kernels import adapter_io, inject_lora, merge_lora, unmerge_lora, use_backend
from lora_kernels.inject import lora_layers
from lora_kernels.testing import LLAMA_PROJECTIONS, tiny_llama


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


# ---------------------------------------------------------------- a failed load leaves the model as it was


def _moved_off_init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded noise on every adapter tensor (DoRA's magnitude too), so none is at its initialisation."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters().values():
                param.add_(torch.randn_like(param) * 0.2)
    return model


def _snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    """Everything a failed load must leave as it was: tensors, module types, trainability."""
    state = copy.deepcopy(model.state_dict())  # may hold a merged layer's extra state
    types = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, types, grads


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict, dict, dict]) -> None:
    state, types, grads = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        same = torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value
        assert same, key


# -------------------------------------------------------------------------------------- into merged layers


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_adapter_into_merged_layers_merges_the_new_adapter(tmp_path, use_dora):
    """Before: the new A and B were copied in while the weights still held the old adapter (outputs off by
    6.07 LoRA / 1.76 DoRA), and unmerge_lora then took the wrong delta out of the base weights."""
    source = _moved_off_init(inject_lora(_model(), ["0", "2"], r=4, lora_alpha=16, use_dora=use_dora), 1)
    adapter_io.save_adapter(source, tmp_path)
    base = {k: v.clone() for k, v in _model().state_dict().items()}

    target = _moved_off_init(inject_lora(_model(), ["0", "2"], r=4, lora_alpha=4, use_dora=use_dora), 2)
    merge_lora(target)
    adapter_io.load_adapter(target, tmp_path)
    assert all(layer.merged for layer in lora_layers(target).values())
    assert target[0].lora_alpha == 16
    x = torch.randn(5, 8)
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)
    unmerge_lora(target)
    for name in ("0", "2"):
        torch.testing.assert_close(
            target.get_submodule(name).weight, base[f"{name}.weight"], rtol=0, atol=1e-5
        )
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


# ---------------------- PEFT's options: loaded as PeftModel.from_pretrained loads them, or refused by name


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama. The tests that take it compare with PEFT, so they skip without peft and transformers."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12))


def _peft_adapter(base, directory, **options) -> nn.Module:
    """A PEFT model of ``base`` with ``options``, its adapters moved off their initialisation, saved."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS, **options)
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    return model


INITIALISATIONS = {
    "true": {},
    "false": {"init_lora_weights": False},
    "gaussian": {"init_lora_weights": "gaussian"},
    "eva": {"init_lora_weights": "eva"},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "lora_ga": {"init_lora_weights": "lora_ga"},
    "mica": {"init_lora_weights": "mica"},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "pissa_dora": {"init_lora_weights": "pissa", "use_dora": True},
    "olora_rslora_patterns": {
        "init_lora_weights": "olora",
        "use_rslora": True,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"down_proj": 3},
    },
}


@pytest.mark.parametrize("options", INITIALISATIONS.values(), ids=INITIALISATIONS.keys())
def test_each_accepted_initialisation_loads_as_peft_loads_it(llama, ids, tmp_path, options):
    """Before: PiSSA and OLoRA adapters gave logits 5e-3 off PeftModel.from_pretrained's, which replaces each
    targeted base weight by the residual of its SVD / QR; the others already matched."""
    from peft import PeftModel

    _peft_adapter(llama, tmp_path, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path, is_trainable=True)
    ours = adapter_io.load_adapter(copy.deepcopy(llama), tmp_path)
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {
        n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    peft_trainable = {n.replace("lora_magnitude_vector", "lora_magnitude") for n in peft_trainable}
    assert trainable == peft_trainable  # MiCA: lora_B stays frozen


def test_converted_pissa_adapter_loads_as_the_trained_model(llama, ids, tmp_path):
    """PEFT's way to use a PiSSA adapter on the original base: save_pretrained converts it into plain LoRA."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    options = dict(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS)
    trained = get_peft_model(copy.deepcopy(llama), LoraConfig(init_lora_weights="pissa", **options))
    trained.peft_config["default"].init_lora_weights = True
    trained.save_pretrained(tmp_path / "initial")
    trained.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.save_pretrained(
            tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial"
        )
    ours = adapter_io.load_adapter(copy.deepcopy(llama), tmp_path / "lora")
    with use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_alora_adapter_is_refused_by_name(llama, tmp_path):
    """Before: an aLoRA adapter loaded silently as plain LoRA (logits 0.56 off PEFT's)."""
    _peft_adapter(llama, tmp_path, alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    model = copy.deepcopy(llama)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 6\] \(aLoRA"):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


REFUSED = [
    ("fan_in_fan_out", True),
    ("bias", "lora_only"),
    ("lora_bias", True),
    ("modules_to_save", ["lm_head"]),
    ("trainable_token_indices", [1, 2]),
    ("layer_replication", [[0, 1], [0, 2]]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("megatron_config", {"num_layers": 2}),
    ("alora_invocation_tokens", [5]),
    ("velora_config", {"num_groups": 4}),
    ("use_qalora", True),
    ("monteclora_config", {"num_samples": 2}),
    ("use_bdlora", {"target_modules_bd_a": ["o_proj"], "nblocks": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 1.0}),
    ("a_future_option", {"enabled": True}),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "Eva"),
]


@pytest.mark.parametrize(("option", "value"), REFUSED, ids=[f"{k}={v}" for k, v in REFUSED])
def test_options_that_change_the_model_are_refused_by_name(tmp_path, option, value):
    """Each LoraConfig option the fused layers do not implement: a ValueError naming it, the model untouched.
    Before: the variants (aLoRA, VeLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA...) and these initialisations loaded
    as plain LoRA, silently."""
    adapter_io.save_adapter(_moved_off_init(inject_lora(_model(), ["0", "2"], r=4), 1), tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[option] = value
    path.write_text(json.dumps(config))
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_pissa_adapter_into_an_injected_layer_is_refused(tmp_path):
    """A PiSSA/OLoRA adapter rewrites the base weight it loads onto: never onto a layer already adapted."""
    adapter_io.save_adapter(_moved_off_init(inject_lora(_model(), ["0"], r=4), 1), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa"}))
    model = inject_lora(_model(), ["0"], r=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="0 already has a fused LoRA adapter; an init_lora_weights='pissa'"):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


# ----------------------------------------------------------- tensors whose shapes do not fit their modules


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((8, 16, 32), r"'?2'?: the adapter's lora_B has shape \(16, 4\).*out_features=32\) needs \(32, 4\)"),
        ((8, 24, 16), r"'?2'?: the adapter's lora_A has shape \(4, 16\).*in_features=24.*needs \(4, 24\)"),
    ],
    ids=["out_features", "in_features"],
)
@pytest.mark.parametrize("injected", [False, True], ids=["plain", "merged_injected"])
def test_wrong_sizes_are_refused_before_the_model_changes(tmp_path, sizes, message, injected):
    """Before: a bare "The size of tensor a (32) must match ..." after layers were swapped and frozen."""
    adapter_io.save_adapter(_moved_off_init(inject_lora(_model(), ["0", "2"], r=4), 1), tmp_path)
    a, b, c = sizes
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(a, 16), nn.ReLU(), nn.Linear(b, c))
    if injected:
        merge_lora(_moved_off_init(inject_lora(model, ["0", "2"], r=4), 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_dora_magnitude_of_the_wrong_size_is_refused(tmp_path):
    adapter_io.save_adapter(_moved_off_init(inject_lora(_model(), ["2"], r=4, use_dora=True), 1), tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.2.lora_magnitude_vector"
    tensors[key] = tensors[key][:8].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"lora_magnitude has shape \(8,\).*needs \(16,\)"):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_bdlora_adapter_is_refused_before_the_model_changes(llama, tmp_path):
    """A BD-LoRA adapter (block-diagonal lora_A on o_proj): refused by name; and with that option
    removed from its config, by the shape of its block-diagonal tensor."""
    bd = {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": [], "nblocks": 2}
    bd["match_strict"] = False
    _peft_adapter(llama, tmp_path, use_bdlora=bd)
    model = copy.deepcopy(llama)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="use_bdlora"):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_bdlora": None}))
    with pytest.raises(
        ValueError, match=r"o_proj: the adapter's lora_A has shape \(4, 32\).*needs \(4, 64\)"
    ):
        adapter_io.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)
