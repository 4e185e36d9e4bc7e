"""Drop-in, round 3 (issue 24, items 4-8): defects found by using the project as a new user would.

4. an ``inf`` in ``x`` gave NaN rows on Triton when r is not a multiple of 16 (the rank padding);
5. a fresh DoRA layer was not exactly the base layer (``c = m / ‖W + s·B·A‖`` off by an ulp, bf16 by one
   bf16 ulp, and the bias added in another order than ``F.linear``'s);
6. ``nn.TransformerEncoderLayer``'s eval fast path never called ``linear1``/``linear2`` (adapters ignored);
7. a merged model's state dict held a dict (``_extra_state``) that safetensors / ``save_pretrained`` refuse;
8. DoRA with ``out_features = 0`` raised in ``torch.cat``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, skip_unless_dtype_runs
from torch import nn

import lora_kernels
from lora_kernels import FusedLoRALinear, dora_linear, inject_lora, lora_linear, use_backend, use_path
from lora_kernels.ops import LoRAParams, run_dora_forward
from lora_kernels.reference import dora_linear_reference, lora_linear_reference
from lora_kernels.testing import tiny_llama

# ------------------------------------------------------------------------------- 4. inf in x on Triton


def _assert_same_with_infinities(actual: torch.Tensor, expected: torch.Tensor, dtype, name: str) -> None:
    """The non-finite entries equal (inf with its sign, NaN where the reference has NaN), the rest close."""
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite entries differ"
    torch.testing.assert_close(actual[~finite], expected[~finite], equal_nan=True, msg=f"{name}: non-finite")
    if finite.any():
        assert_close(actual[finite], expected[finite], dtype, name, 4.0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("r", [4, 8, 20])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["inf", "-inf"])
def test_inf_in_x_stays_inf(backend, use_dora, r, sign):
    """All weights and dY >= 0, so every result is a finite number or an inf of one sign, never NaN."""
    device = backend.device
    M, K, N, s = 5, 24, 10, 0.5
    x = torch.rand(M, K, device=device)
    x[2, 7] = sign * float("inf")
    weight, bias = torch.rand(N, K, device=device), torch.rand(N, device=device)
    lora_A = torch.rand(r, K, device=device, requires_grad=True)
    lora_B = torch.rand(N, r, device=device, requires_grad=True)
    magnitude = (torch.rand(N, device=device) + 4.0).requires_grad_()
    x.requires_grad_()
    leaves = [x, lora_A, lora_B] + ([magnitude] if use_dora else [])
    grad_y = torch.rand(M, N, device=device)
    with use_backend(backend.name):
        if use_dora:
            y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, s)
        else:
            y = lora_linear(x, weight, bias, lora_A, lora_B, s)
        grads = torch.autograd.grad(y, leaves, grad_y)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    w64, b64 = weight.double(), bias.double()
    if use_dora:
        y_ref = dora_linear_reference(leaves64[0], w64, b64, *leaves64[1:3], leaves64[3], s)
    else:
        y_ref = lora_linear_reference(leaves64[0], w64, b64, *leaves64[1:3], s)
    grads_ref = torch.autograd.grad(y_ref, leaves64, grad_y.double())
    assert torch.isinf(y[2]).all() and not torch.isnan(y).any()
    _assert_same_with_infinities(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(["x", "A", "B", "m"], grads, grads_ref, strict=False):
        _assert_same_with_infinities(g, g_ref, torch.float32, f"d{name}")


# ----------------------------------------------------------------------- 5. DoRA is a no-op at init


@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_dora_layer_is_exactly_the_base_layer(dtype, adapter_dtype, bias):
    """The torch path (CPU, and the CUDA extension's DoRA): bit for bit ``F.linear``'s output."""
    x = torch.randn(2, 7, 96, dtype=dtype)
    with use_backend("torch"), torch.no_grad():  # the magnitude's norm from the backend that runs it
        layer = FusedLoRALinear(
            96, 40, bias=bias, r=4, use_dora=True, dtype=dtype, adapter_dtype=adapter_dtype
        )
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        y = layer.train()(x)  # the dropout form too (p = 0: the same)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fresh_dora_col_scale_is_exactly_one(backend, dtype):
    """``c = m / n`` is 1.0 exactly, and the DoRA output is the same layer's LoRA output bit for bit."""
    skip_unless_dtype_runs(backend, dtype)
    device = backend.device
    with use_backend(backend.name):
        layer = FusedLoRALinear(40, 24, r=4, use_dora=True, dtype=dtype, device=device)
        x = torch.randn(6, 40, dtype=dtype, device=device)
        with torch.no_grad():
            _, _, _, col_scale, _ = run_dora_forward(
                backend.name, x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude,
                LoRAParams(layer.scaling, 0.0, 0),
            )  # fmt: skip
            assert torch.equal(col_scale, torch.ones_like(col_scale))
            # DoRA runs the Triton backend's fused GEMM (it is not routed): compare with LoRA on that path
            with use_path("fused" if backend.name == "triton" else "auto"):
                lora = lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
            assert torch.equal(layer(x), lora)


def test_inject_lora_use_dora_is_exactly_the_base_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.GELU(), nn.Linear(200, 50))
    x = torch.rand(10, 300)
    with torch.no_grad(), use_backend("torch"):
        expected = model(x)
        inject_lora(model, ["0", "2"], r=8, use_dora=True)
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("init_lora_weights", [True, False])
def test_fused_peft_dora_model_is_peft_bit_for_bit(init_lora_weights):
    """PEFT's ``test_lora_use_dora_linear``: a fresh DoRA model is the base model (``allclose``); fused, it
    is PEFT's output exactly, fresh (so the base model's) or not."""
    peft = pytest.importorskip("peft")
    from lora_kernels.peft import fuse

    class MyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(300, 200)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    model = MyModule()
    data = torch.rand(10, 300)
    with torch.no_grad():
        base = model(data)
        config = peft.LoraConfig(
            target_modules=["linear"], use_dora=True, init_lora_weights=init_lora_weights
        )
        model = peft.get_peft_model(model, config)
        expected = model(data)
        assert fuse(model) == 1
        with use_backend("torch"):
            fused = model(data)
    assert torch.equal(fused, expected)
    if init_lora_weights:
        assert torch.equal(fused, base)


# ---------------------------------------------------------- 6. nn.TransformerEncoderLayer's fast path


def _encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True).eval()


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_transformer_encoder_layer_in_eval_runs_the_adapters(merge):
    torch.manual_seed(0)
    layer = _encoder_layer()
    base = copy.deepcopy(layer)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    base_encoder = copy.deepcopy(encoder)
    with pytest.warns(UserWarning, match="out_proj"):  # MHA's out_proj still cannot: it warns
        inject_lora(encoder, ["linear1", "linear2", "out_proj"], r=4, init_lora_weights=False)
    reference = copy.deepcopy(base_encoder)  # the adapters folded into plain weights: the fast path is right
    with torch.no_grad():
        for name, fused in lora_kernels.inject.lora_layers(encoder).items():
            if merge or not name.endswith("out_proj"):  # (merged, out_proj's adapter is in its weight)
                reference.get_submodule(name).weight += fused.delta_weight()
    if merge:
        lora_kernels.merge_lora(encoder)
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), use_backend("torch"):
        y = encoder(x)
        assert (y - base_encoder(x)).abs().max() > 1e-2
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
        # one layer on its own, with a padding mask (another input of the fast path)
        single = copy.deepcopy(base)
        inject_lora(single, ["linear1"], r=4, init_lora_weights=False)
        mask = torch.tensor([[False] * 4 + [True], [False] * 5])
        assert (single(x, src_key_padding_mask=mask) - base(x, src_key_padding_mask=mask)).abs().max() > 1e-2


# ----------------------------------------------------------------------- 7. saving a merged model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_save_pretrained_and_from_pretrained(tmp_path, use_dora):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    inject_lora(model, targets, r=4, init_lora_weights=False, use_dora=use_dora)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), use_backend("torch"):
        expected = model(ids).logits
        lora_kernels.merge_lora(model)
        model.save_pretrained(tmp_path)  # safetensors
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()  # plain: the merged weights
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
        # into an injected model, through load_state_dict: it comes back merged, and unmerges
        from safetensors.torch import load_file

        again = inject_lora(tiny_llama(), targets, r=4, use_dora=use_dora).eval()
        again.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
        assert all(layer.merged for layer in lora_kernels.inject.lora_layers(again).values())
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)
        lora_kernels.unmerge_lora(again)
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_layer_safetensors_and_torch_save(tmp_path, use_dora):
    from safetensors.torch import load_model, save_model

    def make():
        return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))

    torch.manual_seed(0)
    model = inject_lora(make(), ["0", "2"], r=3, init_lora_weights=False, use_dora=use_dora)
    with torch.no_grad():
        model[0].lora_B.mul_(3.0)
    x = torch.randn(4, 12)
    with use_backend("torch"):
        expected = model(x).detach()
        lora_kernels.merge_lora(model)
        state = model.state_dict()
        assert state["0.lora_merged"].dtype == torch.bool and state["0.lora_merged"].item()
        assert ("0.lora_merged_norm" in state) == use_dora
        save_model(model, str(tmp_path / "model.safetensors"))
        torch.save(state, tmp_path / "state.pt")
        torch.save(model, tmp_path / "model.pt")
        for load in ("safetensors", "torch.load", "whole model"):
            if load == "whole model":
                other = torch.load(tmp_path / "model.pt", weights_only=False)
            else:
                other = inject_lora(make(), ["0", "2"], r=3, use_dora=use_dora)
                if load == "safetensors":
                    load_model(other, str(tmp_path / "model.safetensors"))  # strict
                else:
                    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # strict
            assert all(layer.merged for layer in lora_kernels.inject.lora_layers(other).values()), load
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
            lora_kernels.unmerge_lora(other)  # DoRA: with the norm it was merged with
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
        # the lora_ keys filtered out, the rest loads strictly into the plain model
        plain = make()
        plain.load_state_dict({k: v for k, v in state.items() if "lora_" not in k})
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_old_extra_state_format_still_loads(use_dora):
    """State dicts saved by earlier versions held ``_extra_state = {"merged": True[, "dora_weight_norm"]}``."""
    torch.manual_seed(0)
    layer = FusedLoRALinear(12, 10, r=3, init_lora_weights=False, use_dora=use_dora)
    x = torch.randn(4, 12)
    with use_backend("torch"):
        expected = layer(x).detach()
        layer.merge()
        state = layer.state_dict()
        old = {"merged": bool(state.pop("lora_merged"))}
        if use_dora:
            old["dora_weight_norm"] = state.pop("lora_merged_norm")
        state["_extra_state"] = old
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        other = FusedLoRALinear(12, 10, r=3, use_dora=use_dora)
        other.load_state_dict(torch.load(buffer, weights_only=True))  # strict
        assert other.merged
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
        other.unmerge()
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 8. out_features = 0


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_zero_out_features(backend, use_dora):
    device = backend.device
    with use_backend(backend.name):
        with pytest.warns(UserWarning, match="zero-element"):  # as nn.Linear(16, 0) warns
            layer = FusedLoRALinear(16, 0, r=4, use_dora=use_dora, init_lora_weights=False, device=device)
        x = torch.randn(2, 3, 16, device=device, requires_grad=True)
        y = layer(x)
        assert y.shape == (2, 3, 0)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
        assert layer.lora_B.grad.shape == (0, 4)
        if use_dora:
            assert layer.lora_magnitude.shape == (0,) and layer.lora_magnitude.grad.shape == (0,)
        layer.merge()
        assert layer(x).shape == (2, 3, 0)
        layer.unmerge()
        assert layer(x).shape == (2, 3, 0)
