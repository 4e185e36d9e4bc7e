"""FusedLoRALinear: PEFT's names and semantics, from_linear, merge, state dicts, train/eval.

Also: each bad constructor argument named in its error, ``reset_parameters`` (after a meta-device init, on
a merged layer), and ``out_features = 0`` (LoRA and DoRA: forward, backward, merge). A merged layer's
state dict: ``test_state_dict.py``.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels import FusedLoRALinear, lora_linear_reference, use_backend


def test_defaults_match_peft():
    layer = FusedLoRALinear(20, 30, r=4, lora_alpha=8)
    assert layer.weight.shape == (30, 20) and layer.bias.shape == (30,)
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert FusedLoRALinear(20, 30, r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert "r=4" in repr(layer) and "lora_alpha=8" in repr(layer)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_init_variants():
    gaussian = FusedLoRALinear(200, 10, r=50, init_lora_weights="gaussian")
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 50, rel=0.1)
    assert torch.count_nonzero(gaussian.lora_B) == 0
    random = FusedLoRALinear(20, 10, r=4, init_lora_weights=False)
    assert torch.count_nonzero(random.lora_B) > 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        FusedLoRALinear(20, 10, init_lora_weights="pissa")


def test_starts_as_the_base_layer():
    linear = nn.Linear(16, 12)
    layer = FusedLoRALinear.from_linear(linear, r=4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x))


def test_from_linear_shares_storage_and_keeps_dtype():
    linear = nn.Linear(16, 12, dtype=torch.float16)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=16, lora_dropout=0.1)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.lora_A.dtype == torch.float16 and layer.lora_A.device == linear.weight.device
    assert not linear.weight.requires_grad
    assert layer.scaling == 4.0 and layer.lora_dropout == 0.1
    fp32_adapters = FusedLoRALinear.from_linear(linear, r=4, adapter_dtype=torch.float32)
    assert fp32_adapters.lora_B.dtype == torch.float32
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_forward_matches_reference_3d():
    layer = FusedLoRALinear(24, 18, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(2, 7, 24)
    expected = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_round_trip():
    layer = FusedLoRALinear(32, 24, r=4, init_lora_weights=False).eval()
    x = torch.randn(6, 32)
    before_weight = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # not merged twice
    layer.unmerge()
    assert not layer.merged
    delta_scale = layer.delta_weight().abs().max().item()
    torch.testing.assert_close(layer.weight, before_weight, atol=4 * 2**-23 * delta_scale * 4, rtol=0)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_state_dict_round_trip():
    layer = FusedLoRALinear(10, 6, r=2, init_lora_weights=False)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = FusedLoRALinear(10, 6, r=2)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 10)
    torch.testing.assert_close(other(x), layer(x))


def test_train_eval_switches_dropout():
    layer = FusedLoRALinear(64, 32, r=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, 64)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # fresh masks each call
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)  # torch.manual_seed fixes the masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_training_updates_only_adapters():
    layer = FusedLoRALinear(8, 4, r=2)
    weight = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(10, 8)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.weight, weight)
    assert torch.count_nonzero(layer.lora_B) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be"):
        FusedLoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear(4, 4, lora_dropout=1.0)
    layer = FusedLoRALinear(4, 3)
    with pytest.raises(ValueError, match="in_features=4"):
        layer(torch.randn(2, 5))
    assert math.isfinite(layer.scaling)


def test_scaling_is_derived_from_alpha_rank_and_rslora():
    """PEFT's scaling, computed from lora_alpha, r and use_rslora: never stale, never set on its own."""
    layer = FusedLoRALinear(8, 6, r=4, lora_alpha=8)
    assert layer.scaling == 2.0
    layer.lora_alpha = 12
    assert layer.scaling == 3.0
    layer.use_rslora = True
    assert layer.scaling == pytest.approx(6.0)
    with pytest.raises(AttributeError):
        layer.scaling = 5.0


def test_lora_options_are_checked_once_for_every_entry_point():
    """The constructor and from_linear take the same LoRA options and name the caller on a typo."""
    with pytest.raises(TypeError, match=r"FusedLoRALinear\(\) got an unexpected keyword argument 'rank'"):
        FusedLoRALinear(8, 6, rank=4)
    with pytest.raises(TypeError, match=r"from_linear\(\) got an unexpected keyword argument 'alpha'"):
        FusedLoRALinear.from_linear(nn.Linear(8, 6), alpha=4)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear.from_linear(nn.Linear(8, 6), lora_dropout=1.0)
    layer = FusedLoRALinear(8, 6)
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora) == (8, 8, 0.0, False)


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


# ----------------------------------------------------------------------------------- out_features = 0


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
