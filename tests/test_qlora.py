"""QLoRA: the fused LoRA linear over a 4-bit bitsandbytes base (issue 23), against bitsandbytes and PEFT.

Shapes keep ``in_features`` a multiple of 64 wherever bitsandbytes' own CPU dequantization is the oracle:
bitsandbytes 0.50's AVX-512 CPU kernel assumes blocks do not straddle rows (see lora_kernels/quant4bit.py and
``test_torch_dequantization_where_bitsandbytes_cpu_kernel_is_wrong``). bf16 in Triton kernels is checked on
a GPU only (the interpreter truncates float32 to bf16 instead of rounding, as it gets bf16 ``tl.dot`` wrong).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import requires_cuda
from torch import nn

from lora_kernels import FusedLoRALinear, dropout_mask, inject_lora, lora_state_dict, quant4bit, use_backend
from lora_kernels.dropout import draw_seed
from lora_kernels.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")

from lora_kernels.ops import triton_nf4  # noqa: E402
from lora_kernels.ops.qlora import select_path, use_qlora_path  # noqa: E402
from lora_kernels.testing import to_4bit  # noqa: E402

QUANTS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
# (backend, path): the torch composite and both Triton paths (interpreted on the CPU)
PATHS = [("torch", "dequant"), ("triton", "dequant"), ("triton", "fused")]


def _linear4bit(in_features=64, out_features=40, quant_type="nf4", nested=False, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(dtype)
    return to_4bit(linear, quant_type=quant_type, compress_statistics=nested, **kw)


def _params4bit(shape, quant_type, nested, dtype, storage=torch.uint8):
    torch.manual_seed(1)
    weight = torch.randn(shape, dtype=dtype)
    kw = dict(quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    return bnb.nn.Params4bit(weight, requires_grad=False, **kw).to("cpu")


# ------------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize(("quant_type", "nested"), QUANTS)
def test_kernel_dequantization_is_bitsandbytes_bit_for_bit(quant_type, nested, storage, dtype):
    param = _params4bit((24, 192), quant_type, nested, dtype, storage)
    expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    w = quant4bit.describe(param)
    assert torch.equal(triton_nf4.dequantize(w, dtype), expected)
    assert torch.equal(quant4bit.dequantize_torch(w), expected)
    assert torch.equal(quant4bit.dequantize(w), expected)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize(("quant_type", "nested"), QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_dequantizes_in_registers_bit_for_bit(quant_type, nested, dtype, transposed):
    """The GEMM on an identity input gives W (dX's orientation) or Wᵀ (the forward's) exactly."""
    param = _params4bit((40, 64), quant_type, nested, dtype)
    expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    expected = expected.t() if transposed else expected
    w = quant4bit.describe(param)
    rows = expected.shape[0]
    eye = torch.eye(rows, dtype=dtype)
    t, u = torch.zeros(rows, 4), torch.zeros(4, expected.shape[1], dtype=dtype)
    out = triton_nf4._qlinear_with_lora(eye, w, transposed, t, u, None, 1.0, 0.0, 0)
    assert torch.equal(out, expected)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize(("quant_type", "nested"), QUANTS)
def test_kernel_dequantization_bf16_on_gpu(quant_type, nested):
    torch.manual_seed(1)
    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    kw = dict(quant_type=quant_type, compress_statistics=nested)
    param = bnb.nn.Params4bit(weight, requires_grad=False, **kw).to("cuda")
    expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(triton_nf4.dequantize(quant4bit.describe(param), torch.bfloat16), expected)


def test_torch_dequantization_where_bitsandbytes_cpu_kernel_is_wrong():
    """K = 80 (blocks straddle rows): our dequantization equals bitsandbytes' reference implementation."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    param = _params4bit((24, 80), "nf4", True, torch.float32)
    w = quant4bit.describe(param)
    absmax = quant4bit.absmax_float(w)
    expected = default_ops._dequantize_4bit_compute(w.packed, absmax, w.code, w.blocksize, w.shape, w.dtype)
    assert torch.equal(quant4bit.dequantize(w), expected)
    assert torch.equal(triton_nf4.dequantize(w, torch.float32), expected)


# ------------------------------------------------------------------------- parity with PEFT's 4-bit layer


class _Model(nn.Module):
    is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit bases in lora.bnb.Linear4bit

    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


class _ExactDropout(nn.Module):
    """The mask the fused op draws for ``seed``, in PEFT's reference layer."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return x * dropout_mask(self.seed, x.shape, self.p, dtype=x.dtype)


def _peft_pair(base, dropout=0.0, use_dora=False):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout, init_lora_weights=False,
        use_dora=use_dora,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(_Model(base), config)
    layer = reference.base_model.model.proj
    assert type(layer).__name__ == "Linear4bit" and layer.__module__.endswith("lora.bnb")
    layer.base_layer.bias.requires_grad_(True)
    fused = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert __import__("lora_kernels.peft").peft.fuse(fused) == 1
    return reference, fused


def _run(model, x, grad):
    x = x.detach().clone().requires_grad_(True)
    layer = model.base_model.model.proj
    y = model(x)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.bias]
    if layer.use_dora["default"]:
        params.append(layer.lora_magnitude_vector["default"].weight)
    return y, torch.autograd.grad(y, params, grad)


def _check_parity(reference, fused, x, dropout, dtype, backend, path):
    grad = torch.randn(*x.shape[:-1], 40, dtype=x.dtype)
    fused.train(dropout > 0)
    reference.train(dropout > 0)
    with use_backend(backend), use_qlora_path(path):
        torch.manual_seed(7)
        y, grads = _run(fused, x, grad)
    if dropout > 0:
        torch.manual_seed(7)
        reference.base_model.model.proj.lora_dropout["default"] = _ExactDropout(dropout, int(draw_seed()))
    y_ref, grads_ref = _run(reference, x, grad)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, dtype, "y")
    assert len(grads) == len(grads_ref)
    for name, g, g_ref in zip(("x", "A", "B", "bias", "magnitude"), grads, grads_ref, strict=False):
        assert_close(g, g_ref, dtype, f"d{name}", slack=2)


@pytest.mark.parametrize(("backend", "path"), PATHS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("quant_type", "nested"), QUANTS)
def test_fused_peft_4bit_layer_matches_peft(quant_type, nested, dtype, dropout, backend, path):
    base = _linear4bit(quant_type=quant_type, nested=nested, compute_dtype=dtype)
    reference, fused = _peft_pair(base, dropout)
    x = torch.randn(2, 3, 64, dtype=dtype)
    _check_parity(reference, fused, x, dropout, dtype, backend, path)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_peft_4bit_dora_matches_peft(dropout, backend):
    base = _linear4bit(quant_type="nf4", nested=True, compute_dtype=torch.float32)
    reference, fused = _peft_pair(base, dropout, use_dora=True)
    _check_parity(reference, fused, torch.randn(5, 64), dropout, torch.float32, backend, "auto")


def test_compute_dtype_casts_as_linear4bit():
    """fp32 input, fp16 compute: the output comes back fp32, computed in fp16 as Linear4bit computes."""
    base = _linear4bit(compute_dtype=torch.float16)
    reference, fused = _peft_pair(base)
    x = torch.randn(6, 64)
    y, y_ref = fused(x), reference(x)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref, torch.float16, "y")


def test_quant_storage_bf16():
    base = _linear4bit(quant_storage=torch.bfloat16, nested=True)
    assert base.weight.dtype == torch.bfloat16
    reference, fused = _peft_pair(base, 0.1)
    _check_parity(reference, fused, torch.randn(4, 64), 0.1, torch.float32, "triton", "fused")


def test_paths_predicted_and_selectable():
    assert select_path("triton", 16) == "fused" and select_path("triton", 4096) == "dequant"
    assert select_path("torch", 16) == "dequant"
    with use_qlora_path("dequant"):
        assert select_path("triton", 16) == "dequant"
    with use_qlora_path("fused"), pytest.raises(RuntimeError, match="Triton backend"):
        select_path("torch", 16)


# ---------------------------------------------------------------------------- FusedLoRALinear, inject


@pytest.mark.parametrize(("quant_type", "nested"), QUANTS[:2])
def test_from_linear4bit_matches_dequantized_reference(quant_type, nested):
    base = _linear4bit(quant_type=quant_type, nested=nested)
    layer = FusedLoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.1)
    assert (layer.in_features, layer.out_features) == (64, 40) and layer.lora_A.dtype == torch.float32
    assert layer.weight is base.weight and "4-bit" in repr(layer)
    dense = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    plain = FusedLoRALinear.from_linear(nn.Linear(64, 40), r=4, lora_alpha=8, lora_dropout=0.1)
    with torch.no_grad():
        plain.weight.copy_(dense)
        plain.bias.copy_(base.bias)
        plain.lora_A.copy_(layer.lora_A)
        plain.lora_B.copy_(layer.lora_B)
    x = torch.randn(3, 5, 64)
    for training in (False, True):
        layer.train(training)
        plain.train(training)
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        assert_close(y, plain(x).double(), torch.float32, "y")


def test_from_linear4bit_dora_state_dict_and_merge_refused():
    base = _linear4bit(nested=True)
    layer = FusedLoRALinear.from_linear(base, r=4, use_dora=True, init_lora_weights=False)
    x = torch.randn(4, 64)
    y = layer(x)
    torch.testing.assert_close(layer.lora_magnitude, layer.weight_norm())  # starts as the base layer's norm
    state = layer.state_dict()
    assert any(key.startswith("weight.quant_state.bitsandbytes__") for key in state)
    other = FusedLoRALinear.from_linear(_linear4bit(nested=True, out_features=40), r=4, use_dora=True)
    with torch.no_grad():
        other.weight.data.zero_()  # the packed codes must come from the state dict
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), y)
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge()


def test_inject_lora_on_4bit_model_trains_and_adapters_round_trip(tmp_path):
    from lora_kernels.adapter_io import load_adapter, save_adapter

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40))
        net[0], net[2] = to_4bit(net[0]), to_4bit(net[2])
        return net

    net = inject_lora(model(), ["0", "2"], r=4, init_lora_weights=False)
    assert all(isinstance(net[i], FusedLoRALinear) and net[i].is_4bit for i in (0, 2))
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 64)
    for _ in range(2):
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(net, tmp_path)
    other = inject_lora(model(), ["0", "2"], r=4)
    load_adapter(other, tmp_path)
    for key, value in lora_state_dict(net).items():
        torch.testing.assert_close(lora_state_dict(other)[key], value)
    torch.testing.assert_close(other(x), net(x))
    assert other[0].weight.dtype == torch.uint8  # the base stays quantized


def test_peft_qlora_model_trains_after_fuse_as_unfused():
    peft = pytest.importorskip("peft")
    from lora_kernels import peft as lk_peft
    from lora_kernels.testing import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=64)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets:
                setattr(parent, name, to_4bit(child, compress_statistics=True, compute_dtype=torch.float32))
    model.is_loaded_in_4bit = True
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    reference = peft.get_peft_model(model, config)
    fused = copy.deepcopy(reference)
    assert lk_peft.fuse(fused) == len(targets)
    ids = torch.randint(0, 64, (2, 10))
    losses = []
    for net in (reference, fused):
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(3):
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_8bit_base_is_refused_clearly():
    base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    with pytest.raises(TypeError, match="8-bit"):
        FusedLoRALinear.from_linear(base, r=4)
    net = nn.Sequential(base)
    with pytest.raises(TypeError, match="8-bit"):
        inject_lora(net, ["0"], r=4)
    assert net[0] is base


def test_peft_8bit_layer_keeps_peft_forward_with_a_warning():
    peft = pytest.importorskip("peft")
    from lora_kernels import peft as lk_peft

    model = _Model(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu"))
    model.is_loaded_in_8bit = True
    del _Model.is_loaded_in_4bit  # (a class attribute: restored below)
    try:
        net = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["proj"]))
    finally:
        _Model.is_loaded_in_4bit = True
    with pytest.warns(UserWarning, match="8-bit"):
        assert lk_peft.fuse(net) == 0


def test_unknown_quant_type_and_foreign_device_fall_back_or_raise():
    base = _linear4bit(nested=True)
    _, fused = _peft_pair(base)
    layer = FusedLoRALinear.from_linear(_linear4bit(), r=4)
    x = torch.randn(3, 64)
    state = fused.base_model.model.proj.base_layer.weight.quant_state
    state.quant_type = "int4"
    # PEFT's forward, with the warning that says why (bitsandbytes then refuses the quant type itself)
    with pytest.warns(UserWarning, match="unknown 4-bit quant type"), pytest.raises(ValueError):
        fused(x)
    layer.weight.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="unknown 4-bit quant type"):
        layer(x)
    layer.weight.quant_state.quant_type = "nf4"
    layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.to("meta")
    with pytest.raises(ValueError, match="absmax is on meta"):
        layer(x)


def test_without_bitsandbytes_everything_else_works():
    code = """
import sys
sys.modules["bitsandbytes"] = None  # import fails
import torch, lora_kernels
from lora_kernels import FusedLoRALinear, quant4bit
layer = FusedLoRALinear(16, 8, r=2)
layer(torch.randn(3, 16)).sum().backward()
try:
    quant4bit.describe(object())
except ImportError as err:
    assert "lora_kernels[qlora]" in str(err), err
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_4bit_kernels_compile_for_sm90():
    """The 4-bit kernels lower to cubin (the interpreter is lenient); the full set: tools/compile_qlora_kernels.py
    (all 36 variants for sm_80 and sm_90 compiled with triton 3.8 when this was written)."""
    script = Path(__file__).resolve().parents[1] / "tools" / "compile_qlora_kernels.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--quick"], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 2 * 2 * 2


def test_weight_repacked_by_bitsandbytes_cpu_inference_is_refused():
    """On an AVX-512-bf16 CPU, Linear4bit's eval forward repacks its weight for bitsandbytes' own kernel
    (``packing_format_for_cpu``: another layout, absmax rounded to bf16): a clear error, not wrong numbers
    (PEFT's layer then keeps PEFT's forward, with the warning)."""
    base = _linear4bit(out_features=64)  # (bitsandbytes repacks blocks of 32 rows)
    layer = FusedLoRALinear.from_linear(base, r=4, init_lora_weights=False)
    x = torch.randn(3, 64)
    layer(x)
    base.eval()
    with torch.no_grad():
        base(x)
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU (no AVX-512 bf16)")
    with pytest.raises(ValueError, match="repacked"):
        layer(x)


# ------------------------------------------------------------------------------------ pickling, torch.save


def _round_trip(obj, how: str):
    if how == "pickle":
        import pickle

        return pickle.loads(pickle.dumps(obj))
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_4bit_layer_survives_torch_save_and_pickle(how, dora):
    """A FusedLoRALinear over a Linear4bit (from_linear and inject_lora) reloads with its Params4bit weight and
    computes what it computed, gradients included, as bitsandbytes' own Linear4bit round-trips."""
    layer = FusedLoRALinear.from_linear(_linear4bit(nested=True), r=4, init_lora_weights=False, use_dora=dora)
    net = inject_lora(nn.Sequential(_linear4bit(), nn.ReLU()), ["0"], r=4, init_lora_weights=False)
    x = torch.randn(2, 3, 64)
    for model in (layer, net):
        again = _round_trip(model, how)
        loaded = again if isinstance(again, FusedLoRALinear) else again[0]
        assert quant4bit.is_4bit_weight(loaded.weight) and loaded.weight.dtype == torch.uint8
        y, y_again = model(x), again(x)
        torch.testing.assert_close(y_again, y, rtol=0, atol=0)
        grads = torch.autograd.grad(y.sum(), [p for p in model.parameters() if p.requires_grad])
        grads_again = torch.autograd.grad(y_again.sum(), [p for p in again.parameters() if p.requires_grad])
        for g, g_again in zip(grads, grads_again, strict=True):
            torch.testing.assert_close(g_again, g, rtol=0, atol=0)


def test_fused_peft_qlora_model_reloads_and_runs_fused(monkeypatch):
    """A fuse()d PEFT QLoRA model saved with torch.save runs fused after torch.load (not PEFT's forward with
    a warning), with the same outputs."""
    from lora_kernels import peft as lk_peft

    base = _linear4bit(quant_type="nf4", nested=True, compute_dtype=torch.float32)
    _, fused = _peft_pair(base)
    x = torch.randn(5, 64)
    y = fused(x)
    again = _round_trip(fused, "torch.save")
    calls, fused_call = [], lk_peft.qlora_linear
    monkeypatch.setattr(lk_peft, "qlora_linear", lambda *a, **k: calls.append(1) or fused_call(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to PEFT's forward would warn
        y_again = again(x)
    assert calls == [1]
    torch.testing.assert_close(y_again, y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ FSDP2 (refused)


def _fsdp2_qlora_worker(rank: int, world: int) -> dict:
    """Each way to hold a 4-bit base (FusedLoRALinear, PEFT fused) under fully_shard: the error raised."""
    from torch.distributed.fsdp import fully_shard

    errors = {}
    for kind in ("fused_layer", "peft"):
        base = _linear4bit(64, 32, dtype=torch.bfloat16, quant_storage=torch.bfloat16)
        if kind == "fused_layer":
            model = nn.Sequential(FusedLoRALinear.from_linear(base, r=4))
        else:
            model = _peft_pair(base)[1]
        for param in model.parameters():  # FSDP2 takes one dtype per group: bf16 adapters, as the storage
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        fully_shard(model)
        try:
            model(torch.randn(3, 64, dtype=torch.bfloat16))
            errors[kind] = None
        except NotImplementedError as err:
            errors[kind] = str(err)
    return errors


def test_fsdp2_over_a_4bit_base_is_refused_naming_the_limit():
    """FSDP2 shards a ``quant_storage=bf16`` weight's bytes, not bitsandbytes' quant state: no kernel could
    dequantize it, so the layer refuses (never a number), naming the limit; PEFT's fused layer too."""
    pytest.importorskip("torch.distributed.fsdp")
    from helpers import run_ranks

    errors = run_ranks(_fsdp2_qlora_worker, 2)
    for kind, message in errors.items():
        assert message is not None, f"{kind}: ran under FSDP2"
        assert "FSDP2" in message and "quant state" in message, message
