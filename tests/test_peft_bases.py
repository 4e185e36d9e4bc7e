"""lora_kernels.peft on every base PEFT's LoRA layers wrap: GPT-2's ``Conv1D`` (``fan_in_fan_out``), an
``nn.Linear`` with ``fan_in_fan_out`` set by hand, and ``lora_bias`` on each kind of base (folded into the
op's bias, or added to a base called as a module): outputs and every gradient against PEFT's forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft_helpers import (  # noqa: E402
    TwoLayers,
    fused_copy_agrees,
    loss_and_grads_with,
    peft_model,
    randomize_lora,
    randomize_lora_biases,
)

import lora_kernels.peft as lk_peft  # noqa: E402
from lora_kernels import use_backend, use_path  # noqa: E402


def test_lora_bias_runs_fused(base_model, ids, fused_calls):
    reference = peft_model(base_model, lora_bias=True)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(std=0.1)
    fused = fused_copy_agrees(reference, ids, fused_calls)
    assert any(n.endswith("lora_B.default.bias") for n, p in fused.named_parameters() if p.grad is not None)


def test_lora_bias_on_a_base_called_as_a_module(fresh_warnings, grouped_calls):
    """A base the op cannot read (here: a forward hook on it) is called, and its output passed to the
    grouped op: s·b_B is added to that output, with its gradient."""
    torch.manual_seed(0)
    reference = get_peft_model(
        TwoLayers(), LoraConfig(r=4, target_modules=["lin"], lora_bias=True, init_lora_weights=False)
    )
    randomize_lora_biases(reference)
    reference.base_model.model.lin.base_layer.register_forward_hook(lambda module, args, out: out * 2.0)
    fused = copy.deepcopy(reference)
    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1
        with use_backend("torch"):
            y = fused(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(grouped_calls) == 1
    bias = fused.base_model.model.lin.lora_B["default"].bias
    ref_bias = reference.base_model.model.lin.lora_B["default"].bias
    (grad,), (ref_grad,) = torch.autograd.grad(y.sum(), [bias]), torch.autograd.grad(y_ref.sum(), [ref_bias])
    torch.testing.assert_close(grad, ref_grad)


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


def test_a_bias_on_lora_a_falls_back(fresh_warnings, fused_calls):
    """PEFT never gives lora_A a bias; one set by hand is PEFT's forward's to apply."""
    torch.manual_seed(0)
    reference = get_peft_model(TwoLayers(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights=False))
    layer = reference.base_model.model.lin
    layer.lora_A["default"].bias = nn.Parameter(torch.randn(4))
    fused = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="a bias on lora_A"):
        assert lk_peft.fuse(fused) == 0
    x = torch.randn(5, 16)
    torch.testing.assert_close(fused(x), reference(x))
    assert not fused_calls


_GPT2_CASES = {
    "lora": {},
    "dora": {"use_dora": True},
    "lora_bias, trainable base bias": {"lora_bias": True, "bias": "all"},
    "dora, trainable base bias": {"use_dora": True, "bias": "all"},
}


@pytest.mark.parametrize("options", list(_GPT2_CASES.values()), ids=list(_GPT2_CASES))
def test_gpt2_conv1d_bases_run_fused(backend, fused_calls, dora_calls, options):
    """transformers' Conv1D stores its weight (in, out): the op reads its transpose, a view of the
    parameter (no copy), on each backend and each of its paths; with lora_bias, s·b_B folded into the bias;
    with bias="all", the base bias trains too. PEFT's logits and every gradient."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    ).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], **options)
    reference = get_peft_model(gpt2, config).to(backend.device)  # PEFT sets fan_in_fan_out (a warning)
    randomize_lora(reference)
    randomize_lora_biases(reference)
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 2 * 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    conv1d = transformers.pytorch_utils.Conv1D
    stored = {m.weight.data_ptr() for m in fused.modules() if isinstance(m, conv1d)}
    ids = torch.randint(0, 50, (2, 9), device=backend.device)
    ref_logits, ref_grads = loss_and_grads_with(reference, ids)
    assert ref_grads
    if options.get("bias") == "all":
        assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in ref_grads
    if options.get("lora_bias"):
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.bias" in ref_grads
    calls = dora_calls if options.get("use_dora") else fused_calls
    for path in ("split", "fused") if backend.name == "triton" else ("auto",):
        calls.clear()
        with use_backend(backend.name), use_path(path):
            logits, grads = loss_and_grads_with(fused, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name, p=path: f"{p}: {n}: {m}"
            )
        assert len(calls) == 8
        for args in calls:  # (x, weight, ...): the (out, in) view of the (in, out) parameter
            weight = args[1]
            assert weight.data_ptr() in stored and weight.stride() == (1, weight.shape[0])


@pytest.mark.parametrize("use_dora", [False, True])
def test_fan_in_fan_out_set_on_an_nn_linear_runs_fused(fused_calls, dora_calls, use_dora):
    """PEFT resets fan_in_fan_out to False on an nn.Linear base; set by hand later, PEFT's forward still
    calls the nn.Linear (the flag only transposes when merging), and so does the fused one. A DoRA adapter
    reads the flag its magnitude layer took when it was added (here False): fused too."""
    torch.manual_seed(0)
    reference = get_peft_model(
        TwoLayers(), LoraConfig(r=4, target_modules=["lin"], init_lora_weights=False, use_dora=use_dora)
    )
    reference.base_model.model.lin.fan_in_fan_out = True
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lk_peft.fuse(fused) == 1
        x = torch.randn(5, 16, requires_grad=True)
        with use_backend("torch"):
            y = fused(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(dora_calls if use_dora else fused_calls) == 1
    layer, ref_layer = fused.base_model.model.lin, reference.base_model.model.lin
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    ref_params = [x, ref_layer.lora_A["default"].weight, ref_layer.lora_B["default"].weight]
    for grad, ref_grad in zip(
        torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(y_ref.square().sum(), ref_params),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_dora_whose_fan_in_fan_out_does_not_match_its_base_falls_back(fresh_warnings, dora_calls):
    """PEFT's DoRA transposes the base weight by its magnitude layer's own fan_in_fan_out: where that does
    not match the base's storage, PEFT's forward runs (its result, or its error), with a warning."""
    torch.manual_seed(0)
    square = nn.Sequential(nn.Linear(8, 8))
    reference = get_peft_model(square, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    reference.base_model.model[0].lora_magnitude_vector["default"].fan_in_fan_out = True
    fused = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="DoRA with fan_in_fan_out=True on a Linear base"):
        assert lk_peft.fuse(fused) == 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), reference(x))
    assert not dora_calls
