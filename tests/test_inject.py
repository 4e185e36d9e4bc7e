"""inject_lora, lora_state_dict, merge_lora / unmerge_lora on plain torch models.

Also torch's attention modules: inject_lora warns for nn.MultiheadAttention's out_proj (its forward never
calls it), and nn.TransformerEncoderLayer's eval fast path still runs the adapters of linear1 / linear2.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import (
    FusedLoRALinear,
    inject_lora,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
    use_backend,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.norm(self.q_proj(x) + self.v_proj(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _run(model, x):
    with use_backend("torch"):
        return model(x)


def test_names_match_like_peft_and_freeze_the_rest():
    model = Net()
    before = _run(model, torch.randn(3, 16))
    inject_lora(model, ["q_proj", "layers.1.v_proj"], r=4, lora_alpha=8)
    fused = {n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    assert fused == {"layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in fused for p in ("lora_A", "lora_B")}
    assert model.layers[0].q_proj.scaling == 2.0
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    after = _run(model, x)
    assert after.shape == before.shape
    # B starts at zero: the injected model computes what the base model did.
    base = Net()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    torch.testing.assert_close(after, _run(base, x))


def test_regex_is_a_full_match_and_rslora():
    model = Net()
    inject_lora(model, r"layers\.\d+\.(q|v)_proj", r=4, lora_alpha=8, use_rslora=True)
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)]
    assert len(fused) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in fused)
    assert model.layers[1].v_proj.scaling == pytest.approx(8 / 2)
    model = Net()
    with pytest.raises(ValueError, match="no module"):
        inject_lora(model, r"q_proj")  # a regex must match the whole name


def test_clear_errors():
    with pytest.raises(ValueError, match=r"no module .* layers\.0\.q_proj"):
        inject_lora(Net(), ["k_proj"])
    with pytest.raises(TypeError, match=r"norm.*not nn.Linear"):
        inject_lora(Net(), ["norm", "q_proj"])


def test_training_updates_only_adapters_and_state_dict_round_trip():
    model = inject_lora(Net(), ["q_proj", "v_proj", "out"], r=2, lora_alpha=4)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 16)
    for _ in range(3):
        opt.zero_grad()
        _run(model, x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    sd = lora_state_dict(model)
    assert set(sd) == {
        f"layers.{i}.{m}.{p}"
        for i in (0, 1)
        for m in ("q_proj", "v_proj", "out")
        for p in ("lora_A", "lora_B")
    }
    other = inject_lora(Net(), ["q_proj", "v_proj", "out"], r=2, lora_alpha=4)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k not in sd}, strict=False)
    _, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected
    torch.testing.assert_close(_run(other, x), _run(model, x))


def test_merge_and_unmerge():
    model = inject_lora(Net(), ["q_proj", "v_proj"], r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(4, 16)
    y = _run(model, x)
    weight = model.layers[0].q_proj.weight.clone()
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, FusedLoRALinear))
    torch.testing.assert_close(_run(model, x), y, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # idempotent, no warning storm
    unmerge_lora(model)
    torch.testing.assert_close(model.layers[0].q_proj.weight, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_run(model, x), y, rtol=1e-5, atol=1e-5)


def test_inject_rejects_an_unknown_option_before_changing_the_model():
    model = Net()
    with pytest.raises(TypeError, match=r"inject_lora\(\) got an unexpected keyword argument 'rank'"):
        inject_lora(model, ["q_proj"], rank=4)
    assert isinstance(model.layers[0].q_proj, nn.Linear)
    assert all(p.requires_grad for p in model.parameters())


def test_attach_lora_gives_each_module_its_own_options():
    from lora_kernels.inject import attach_lora

    model = Net()
    existing = inject_lora(model, ["head"], r=2).head
    layers = attach_lora(
        model, {"layers.0.q_proj": {"r": 4, "lora_alpha": 8}, "layers.1.v_proj": {"r": 2}, "head": {}}
    )
    assert layers["head"] is existing  # a FusedLoRALinear is kept as it is
    assert (layers["layers.0.q_proj"].r, layers["layers.0.q_proj"].scaling) == (4, 2.0)
    assert layers["layers.1.v_proj"].r == 2 and model.layers[1].v_proj is layers["layers.1.v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in layers for ab in ("lora_A", "lora_B")}
    with pytest.raises(ValueError, match=r"has no module 'layers\.7\.q_proj'"):
        attach_lora(model, {"layers.7.q_proj": {}})
    with pytest.raises(TypeError, match=r"layers.0.norm \(LayerNorm\)"):
        attach_lora(model, {"layers.0.norm": {}})


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (an output scale), as float8 or cast wrappers have."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_subclass_with_its_own_forward_is_refused_by_name_before_anything_changes():
    model = Net()
    model.layers[0].q_proj = ScaledLinear(16, 16)
    x = torch.randn(3, 16)
    before = _run(model, x)
    with pytest.raises(TypeError, match=r"layers\.0\.q_proj.*ScaledLinear overrides nn\.Linear\.forward"):
        inject_lora(model, ["q_proj"], r=4)
    assert type(model.layers[0].q_proj) is ScaledLinear and not any(
        isinstance(m, FusedLoRALinear) for m in model.modules()
    )
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(_run(model, x), before)
    with pytest.raises(TypeError, match=r"overrides nn\.Linear\.forward"):
        FusedLoRALinear.from_linear(ScaledLinear(4, 4), r=2)
    replaced = nn.Linear(16, 16)
    replaced.forward = lambda x: x  # as accelerate's add_hook_to_module replaces it
    model.layers[1].q_proj = replaced
    with pytest.raises(TypeError, match=r"layers\.1\.q_proj.*forward was replaced"):
        inject_lora(model, ["layers.1.q_proj"], r=4)


def test_subclass_keeping_linear_forward_is_replaced():
    """``NonDynamicallyQuantizableLinear`` (nn.MultiheadAttention's out_proj class) keeps nn.Linear's forward."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    model = nn.Sequential(NonDynamicallyQuantizableLinear(8, 8))
    inject_lora(model, ["0"], r=2)
    assert isinstance(model[0], FusedLoRALinear)


def test_hooks_on_a_replaced_module_move_to_its_fused_layer():
    """Forward, pre-forward (with kwargs too), backward and state-dict hooks on a replaced nn.Linear keep
    running on its fused layer, in order, and their handles still remove them: with a fresh adapter the
    model computes what it computed before."""
    model = Net()
    linear = model.layers[0].q_proj
    calls = []
    handles = [
        linear.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,)),
        linear.register_forward_hook(lambda m, args, out: out + 1.0),
        linear.register_forward_hook(
            lambda m, args, kwargs, out: calls.append("kw") or out, with_kwargs=True
        ),
        linear.register_full_backward_hook(lambda m, gin, gout: calls.append("backward")),
        linear._register_state_dict_hook(lambda m, sd, prefix, local: calls.append("state_dict")),
    ]
    x = torch.randn(3, 16, requires_grad=True)
    before = _run(model, x)
    inject_lora(model, ["q_proj"], r=4)
    fused = model.layers[0].q_proj
    assert isinstance(fused, FusedLoRALinear)
    calls.clear()
    after = _run(model, x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    after.sum().backward()
    model.state_dict()
    assert calls == ["kw", "backward", "state_dict"]
    for handle in handles:
        handle.remove()
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_state_dict_hooks"):
        assert not getattr(fused, attr), attr
    plain = Net()
    plain.load_state_dict(model.state_dict(), strict=False)
    inject_lora(plain, ["q_proj"], r=4)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(_run(model, x), _run(plain, x))


# --------------------------------------------------------------------------------- torch's attention modules


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
