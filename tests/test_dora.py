"""Fused DoRA (``use_dora``): parity with a float64 reference written from PEFT's semantics, on every
backend; the module (magnitude init, merge/unmerge, state dicts); PEFT interop (fuse, adapter files);
memory saved for backward against PEFT's DoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import TOLERANCE, assert_close, make_problem, skip_unless_dtype_runs
from hypothesis import given
from hypothesis import strategies as st
from test_properties import PROPERTY_SETTINGS, lora_cases

import lora_kernels
from lora_kernels import FusedLoRALinear, dora_linear, dropout_mask, use_backend
from lora_kernels.reference import dora_linear_reference, dora_weight_norm_reference
from lora_kernels.testing import SavedTensorCounter, tiny_llama

SEED = 1234
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def dora_problem(*args, **kwargs):
    """:func:`helpers.make_problem` with ``s·B·A`` at about a fifth of ``W``'s scale, as in DoRA training
    (``B`` starts at zero). Where ``s·B·A ≈ −W`` a row's norm cancels and no float32 computation, PEFT's
    included, gets it to float32 accuracy: that is the problem's conditioning, not the op's."""
    problem = make_problem(*args, **kwargs)
    problem.lora_B = (problem.lora_B.detach() * 0.1).requires_grad_(problem.lora_B.requires_grad)
    return problem


def _magnitude(problem, device, dtype, requires_grad=True):
    """A magnitude off the initial norm by a few percent per row, so ``c = m / n`` is not 1."""
    norm = dora_weight_norm_reference(problem.weight, problem.lora_A, problem.lora_B, problem.scaling)
    jitter = 1 + 0.1 * torch.rand(norm.shape, dtype=torch.float64)
    return (norm * jitter).to(device, dtype).requires_grad_(requires_grad)


def _run(backend_name, problem, magnitude, grad_y, dropout_p, seed=SEED):
    p = problem
    with use_backend(backend_name):
        y = dora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, dropout_p, True,
                        dropout_seed=seed)  # fmt: skip
        leaves = [t for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude) if t is not None]
        grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad_y)
    return y, grads


def _reference(problem, magnitude, grad_y, dropout_p, seed=SEED):
    p = problem
    leaves = [
        t.detach().double().requires_grad_()
        for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude)
        if t is not None
    ]
    bias = leaves[2] if p.bias is not None else None
    x, weight, lora_A, lora_B, m = (
        leaves[i] for i in ((0, 1, 3, 4, 5) if p.bias is not None else (0, 1, 2, 3, 4))
    )
    mask = dropout_mask(seed, p.x.shape, dropout_p, dtype=torch.float64) if dropout_p else None
    y = dora_linear_reference(x, weight, bias, lora_A, lora_B, m, p.scaling, mask)
    originals = [t for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude) if t is not None]
    wanted = [leaf for leaf, t in zip(leaves, originals, strict=True) if t.requires_grad]
    return y, torch.autograd.grad(y, wanted, grad_y.double())


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize(
    ("lead", "in_f", "out_f", "r", "bias"),
    [((37,), 29, 23, 5, True), ((2, 9), 40, 33, 16, False), ((3, 1, 5), 17, 70, 1, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dora_matches_reference(backend, dtype, lead, in_f, out_f, r, bias, dropout_p):
    """Forward and every gradient (x, W, b, A, B, m) against the float64 reference, odd shapes, 3-D and
    4-D inputs, exact dropout masks."""
    skip_unless_dtype_runs(backend, dtype)
    if dtype == torch.float64 and backend.name != "torch":
        pytest.skip("float64 runs on the torch backend (the kernels take fp16/bf16/fp32)")
    problem = dora_problem(
        lead, in_f, out_f, r, dtype, device=backend.device, bias=bias, weight_requires_grad=True
    )
    magnitude = _magnitude(problem, backend.device, dtype)
    grad_y = torch.randn(*lead, out_f, dtype=torch.float64).to(backend.device, dtype)
    y, grads = _run(backend.name, problem, magnitude, grad_y, dropout_p)
    y_ref, grads_ref = _reference(problem, magnitude, grad_y, dropout_p)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    names = [n for n in NAMES if n != "bias" or bias]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(g, g_ref, dtype, f"d{name}", slack=4.0)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_dora_property(backend, data):
    """Random shapes, ranks, dtypes, strides, bias and dropout (the LoRA property test's cases), DoRA."""
    dtypes = [torch.float32, torch.float16] + ([] if backend.interpreted else [torch.bfloat16])
    case = data.draw(lora_cases(max_dim=120 if backend.interpreted else 300, dtypes=dtypes), label="case")
    dtype, lead, out_f = case["dtype"], case["lead"], case["out_features"]
    problem = dora_problem(lead, case["in_features"], out_f, case["r"], dtype, device=backend.device,
                           bias=case["bias"] is not None)  # fmt: skip
    if case["transposed"]:
        problem.x = problem.x.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()
    magnitude = _magnitude(problem, backend.device, dtype)
    grad_y = torch.randn(*lead, out_f, dtype=torch.float64).to(backend.device, dtype)
    y, grads = _run(backend.name, problem, magnitude, grad_y, case["dropout_p"], case["seed"])
    y_ref, grads_ref = _reference(problem, magnitude, grad_y, case["dropout_p"], case["seed"])
    depth = max(case["in_features"], out_f, problem.x.numel() // max(case["in_features"], 1))
    slack = max(1.0, (depth / 64) ** 0.5) * (1.0 if dtype == torch.float32 else 2.0)
    assert_close(y, y_ref, dtype, "y", slack)
    for index, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_close(g, g_ref, dtype, f"gradient {index}", 4 * slack)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_dora_fp32_adapters_on_half_base_and_strided_input(backend, dropout_p):
    """PEFT's default mixed precision (fp32 adapters and magnitude on an fp16 base), non-contiguous x."""
    dtype = torch.float16
    problem = dora_problem((24,), 64, 40, 8, dtype, adapter_dtype=torch.float32, device=backend.device)
    wide = torch.randn(24, 128, dtype=torch.float64).to(backend.device, dtype)
    problem.x = wide[:, ::2].requires_grad_()  # stride 2 along in_features
    magnitude = _magnitude(problem, backend.device, torch.float32)
    grad_y = torch.randn(24, 40, dtype=torch.float64).to(backend.device, dtype)
    y, grads = _run(backend.name, problem, magnitude, grad_y, dropout_p)
    y_ref, grads_ref = _reference(problem, magnitude, grad_y, dropout_p)
    assert_close(y, y_ref, dtype, "y")
    names = ("x", "bias", "lora_A", "lora_B", "magnitude")  # weight is frozen here
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == (torch.float32 if name in ("lora_A", "lora_B", "magnitude") else dtype), name
        assert_close(g, g_ref, dtype, f"d{name}", slack=4.0)


def test_weight_norm_matches_reference(backend):
    """``‖W + s·B·A‖`` from the algebra (one read of W) against the direct float64 norm."""
    problem = dora_problem((4,), 75, 33, 12, torch.float32, device=backend.device)
    with use_backend(backend.name):
        norm = lora_kernels.dora_weight_norm(problem.weight, problem.lora_A, problem.lora_B, 3.0)
    expected = dora_weight_norm_reference(problem.weight, problem.lora_A, problem.lora_B, 3.0)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    assert_close(norm, expected, torch.float32, "norm")


def test_norm_is_detached():
    """No gradient flows through the norm (DoRA §4.3): dA and dB equal those of a reference that uses a
    constant norm, and differ from one that differentiates it."""
    problem = make_problem((6,), 10, 7, 3, torch.float64)
    magnitude = _magnitude(problem, "cpu", torch.float64)
    grad_y = torch.randn(6, 7, dtype=torch.float64)
    _, grads = _run("torch", problem, magnitude, grad_y, 0.0)
    p = problem
    A, B = p.lora_A.detach().requires_grad_(), p.lora_B.detach().requires_grad_()
    norm_live = torch.linalg.vector_norm(p.weight + p.scaling * B @ A, dim=1)
    y_live = (p.x @ p.weight.t() + p.scaling * (p.x @ A.t()) @ B.t()) * (
        magnitude.detach() / norm_live
    ) + p.bias
    dA_live = torch.autograd.grad(y_live, A, grad_y)[0]
    A_grad = grads[2]  # (x, bias, lora_A, lora_B, magnitude): the weight is frozen
    assert (A_grad - dA_live).abs().max() > 1e-6  # a live norm would change dA


def test_bad_magnitude_is_named():
    problem = make_problem((3,), 8, 5, 2)
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(problem.x, problem.weight, None, problem.lora_A, problem.lora_B, torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear(problem.x, problem.weight, None, problem.lora_A, problem.lora_B, [1.0] * 5, 1.0)


def test_composite_paths_func_and_meta():
    """torch.func, meta tensors and torch.compile run the composite with the same math."""
    problem = make_problem((5,), 12, 9, 3, torch.float64)
    p = problem
    magnitude = _magnitude(problem, "cpu", torch.float64)
    expected = dora_linear_reference(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling)

    def f(m):
        return dora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, m, p.scaling).sum()

    grad_m = torch.func.grad(f)(magnitude.detach())
    grad_ref = torch.autograd.grad(expected.sum(), magnitude)[0]
    assert_close(grad_m, grad_ref, torch.float64, "dm (torch.func.grad)")
    meta = dora_linear(*(t.to("meta") for t in (p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude)), 2.0)
    assert meta.shape == (5, 9) and meta.device.type == "meta"
    compiled = torch.compile(dora_linear, backend="aot_eager", fullgraph=True)
    y = compiled(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling)
    assert_close(y, expected, torch.float64, "y (torch.compile)")


# ------------------------------------------------------------------------------------------------ module


def test_module_starts_as_base_layer_with_peft_magnitude():
    linear = torch.nn.Linear(20, 12)
    layer = FusedLoRALinear.from_linear(copy.deepcopy(linear), r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(3, 20)
    expected_m = torch.linalg.vector_norm(linear.weight, dim=1)  # B = 0 at init: ‖W‖
    assert layer.lora_magnitude.requires_grad and layer.lora_magnitude.shape == (12,)
    torch.testing.assert_close(layer.lora_magnitude.detach(), expected_m.detach())
    torch.testing.assert_close(layer(x), linear(x), atol=1e-6, rtol=1e-6)
    assert "use_dora=True" in repr(layer)
    assert set(layer.adapter_parameters()) == {"lora_A", "lora_B", "lora_magnitude"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_merge_unmerge_and_state_dict(dtype):
    torch.manual_seed(1)
    layer = FusedLoRALinear(24, 16, r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, dtype=dtype)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(16, dtype=dtype))
    base_weight = layer.weight.detach().clone()
    x = torch.randn(5, 24, dtype=dtype)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y.double(), dtype, "merged y")
    saved = copy.deepcopy(layer.state_dict())
    assert "lora_merged_norm" in saved
    layer.unmerge()
    assert_close(layer.weight, base_weight.double(), dtype, "unmerged weight")
    assert_close(layer(x), y.double(), dtype, "unmerged y")
    other = FusedLoRALinear(24, 16, r=4, lora_alpha=6, use_dora=True, dtype=dtype)  # (alpha is not saved)
    other.load_state_dict(saved)
    assert other.merged
    other.unmerge()  # with the norm it was merged with, from the state dict
    assert_close(other.weight, base_weight.double(), dtype, "loaded and unmerged weight")
    assert_close(other(x), y.double(), dtype, "loaded and unmerged y")


def test_inject_lora_use_dora_trains_magnitude():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    lora_kernels.inject_lora(model, ["0", "2"], r=2, use_dora=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{i}.{n}" for i in (0, 2) for n in ("lora_A", "lora_B", "lora_magnitude")]
    assert sorted(lora_kernels.lora_state_dict(model)) == trainable
    model(torch.randn(4, 8)).sum().backward()
    assert model[0].lora_magnitude.grad is not None and model[0].lora_magnitude.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="use_dora"):
        lora_kernels.inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0"], use_dora=1)


# ------------------------------------------------------------------------------------------------- PEFT


peft = pytest.importorskip("peft")


def _peft_dora_model(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=True, init_lora_weights=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama().to(dtype), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    return model


def test_fused_peft_dora_matches_peft():
    """``lora_kernels.peft.fuse`` on a PEFT DoRA model: same logits and gradients as PEFT's own DoRA."""
    model = _peft_dora_model(dtype=torch.float64)
    fused = copy.deepcopy(model)
    assert lora_kernels.peft.fuse(fused) == 6
    calls = []
    real = lora_kernels.peft.dora_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_kernels.peft, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        ids = torch.randint(0, 100, (2, 11))
        logits, fused_logits = model(ids).logits, fused(ids).logits
    assert len(calls) == 6  # every DoRA layer ran the fused op
    assert_close(fused_logits, logits, torch.float64, "logits")
    logits.square().sum().backward()
    fused_logits.square().sum().backward()
    peft_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ours = dict(fused.named_parameters())
    assert any("lora_magnitude_vector" in n for n in peft_grads)
    for name, grad in peft_grads.items():
        assert_close(ours[name].grad, grad, torch.float64, name)


def _peft_layer(base: torch.nn.Linear, **options) -> torch.nn.Module:
    """PEFT's DoRA ``lora.Linear`` around ``base`` (adapter "default")."""
    config = peft.LoraConfig(use_dora=True, **options)
    return peft.tuners.lora.layer.Linear(base, "default", config=config, use_dora=True, **options)


class _FixedMask(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_peft_dora_dropout_semantics():
    """With dropout in training, PEFT scales the base product of the *dropped* input: our op with the same
    mask gives PEFT's output and gradients (PEFT's layer run with that mask in place of its nn.Dropout)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(19, 13).double()
    layer = _peft_layer(base, r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
    layer.train()
    x = torch.randn(2, 7, 19, dtype=torch.float64, requires_grad=True)
    layer.lora_dropout["default"] = _FixedMask(dropout_mask(SEED, x.shape, 0.2, dtype=torch.float64))
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    params = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    ]
    grads_peft = torch.autograd.grad(y_peft, [x, *params], g)
    y = dora_linear(
        x,
        base.weight,
        base.bias,
        *params[:2],
        params[2],
        layer.scaling["default"],
        0.2,
        True,
        dropout_seed=SEED,
    )
    grads = torch.autograd.grad(y, [x, *params], g)
    assert_close(y, y_peft, torch.float64, "y")
    for name, a, b in zip(("x", "A", "B", "m"), grads, grads_peft, strict=True):
        assert_close(a, b, torch.float64, f"d{name}")


def test_dora_adapter_files_round_trip_with_peft(tmp_path):
    """Ours → ``PeftModel.from_pretrained`` and PEFT's ``save_pretrained`` → ours give the same outputs."""
    torch.manual_seed(0)
    model = lora_kernels.inject_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True,
                                     init_lora_weights=False)  # fmt: skip
    with torch.no_grad():
        for layer in lora_kernels.inject.lora_layers(model).values():
            layer.lora_magnitude.mul_(1.1)
    lora_kernels.peft.save_adapter(model, tmp_path / "ours")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert loaded.peft_config["default"].use_dora
    ids = torch.randint(0, 100, (2, 8))
    model.eval(), loaded.eval()
    assert_close(loaded(ids).logits, model(ids).logits.double(), torch.float32, "PEFT loading ours")

    theirs = _peft_dora_model()
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    ours = lora_kernels.peft.load_adapter(tiny_llama(), tmp_path / "theirs")
    assert all(layer.use_dora for layer in lora_kernels.inject.lora_layers(ours).values())
    theirs.eval(), ours.eval()
    assert_close(ours(ids).logits, theirs(ids).logits.double(), torch.float32, "ours loading PEFT's")


def test_saves_less_for_backward_than_peft_dora():
    """Activation memory held for backward: ours against PEFT's DoRA on the same layer, with dropout."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 192)
    layer = _peft_layer(base, r=8, lora_alpha=16, lora_dropout=0.1)
    layer.train()
    ours = FusedLoRALinear.from_linear(
        copy.deepcopy(base), r=8, lora_alpha=16, lora_dropout=0.1, use_dora=True
    )
    ours.train()
    x = torch.randn(64, 256, requires_grad=True)
    with SavedTensorCounter([x, *layer.parameters()]) as peft_saved:
        layer(x)
    with SavedTensorCounter([x, *ours.parameters()]) as our_saved:
        ours(x)
    m_by_n = 64 * 192 * 4
    assert our_saved.activation_bytes <= m_by_n + 64 * 8 * 4 + 2 * 192 * 4  # z, t, c and n
    assert our_saved.activation_bytes < peft_saved.activation_bytes
    assert TOLERANCE  # (the module's tolerances are the suite's)


def test_tradeoff_tool_runs():
    """``tools/dora_tradeoff.py`` (the figures behind benchmarks/NOTES.md's choice to save ``z``) still runs."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "dora_tradeoff.py"
    out = subprocess.run([sys.executable, str(script), "--size", "64", "--rank", "4"], capture_output=True,
                         text=True, timeout=300, check=True).stdout  # fmt: skip
    assert "DoRA fwd+bwd, z saved" in out and "saved 0.02 MiB" in out  # z: 64 × 64 fp32 = 16 KiB


def test_module_drop_in_behaviours():
    """In-place ops on the output, autocast, deepcopy/pickle, ``.to`` of a merged layer, meta init."""
    import pickle

    layer = FusedLoRALinear(12, 10, r=3, use_dora=True, init_lora_weights=False)
    x = torch.randn(4, 12, requires_grad=True)
    y = layer(x)
    y += 1.0  # as on nn.Linear's output: nothing of y is saved for backward
    y.sum().backward()
    assert layer.lora_magnitude.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        other = copy_of(layer)
        torch.testing.assert_close(other(x), layer(x))
    layer.merge()
    moved = layer.to(torch.float64)
    assert moved._dora_merged_norm.dtype == torch.float64  # a buffer: it moves with the layer
    moved.unmerge()
    meta = FusedLoRALinear(12, 10, r=3, use_dora=True, device="meta")
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    torch.testing.assert_close(meta.lora_magnitude.detach(), torch.linalg.vector_norm(meta.weight, dim=1))


def test_compiled_dora_with_dropout():
    """Under ``torch.compile``: a given ``dropout_seed`` traces in one graph and applies that seed's mask;
    without one the seed is drawn eagerly (a graph break), a new mask per call."""
    problem = dora_problem((6,), 16, 10, 3, torch.float64)
    p = problem
    magnitude = _magnitude(problem, "cpu", torch.float64)

    def layer(x, seed=None):
        return dora_linear(
            x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, 0.2, True, dropout_seed=seed
        )

    seeded = torch.compile(lambda x: layer(x, 7), backend="aot_eager", fullgraph=True)
    mask = dropout_mask(7, p.x.shape, 0.2, dtype=torch.float64)
    expected = dora_linear_reference(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, mask)
    assert_close(seeded(p.x), expected, torch.float64, "y (compiled, seeded)")
    unseeded = torch.compile(layer, backend="aot_eager")
    assert not torch.equal(unseeded(p.x), unseeded(p.x))
