"""The registered custom ops: opcheck, fullgraph torch.compile (backend aot_eager on CPU; also with
``dynamic=True`` over sequence lengths) and autocast."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_problem
from torch import nn

from lora_kernels import FusedLoRALinear, lora_linear, lora_linear_reference, use_backend
from lora_kernels.dropout import dropout_mask
from lora_kernels.library import lora_linear_backward_op, lora_linear_op


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _forward_args(problem, dropout_p: float, backend: str, seed: int = 5):
    """Arguments of the registered forward op; ``backend`` is a name."""
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None
    p = problem
    return (p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, dropout_p, seed_t, backend)


# The opcheck tests run every backend (the ``backend`` fixture of conftest.py) on the device it runs on.


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(backend, dropout_p, bias):
    problem = make_problem((2, 3), 12, 10, 4, bias=bias, weight_requires_grad=bias, device=backend.device)
    torch.library.opcheck(lora_linear_op, _forward_args(problem, dropout_p, backend.name))


@pytest.mark.parametrize(
    "needs", [[True, False, True, True, True], [False, True, False, True, False], [True] * 5]
)
def test_opcheck_backward(backend, needs):
    p = make_problem((2, 3), 12, 10, 4, device=backend.device)
    seed = torch.tensor(11, dtype=torch.int64)
    name = backend.name
    with torch.no_grad():
        _, t = lora_linear_op(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, 0.25, seed, name)
    grad_y = torch.randn(2, 3, 10, device=p.x.device)
    args = (grad_y, p.x.detach(), p.weight.detach(), p.lora_A.detach(), p.lora_B.detach(), t)
    torch.library.opcheck(lora_linear_backward_op, (*args, p.scaling, 0.25, seed, name, needs))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_function_and_registered_op_share_one_autograd(backend, dropout_p):
    """LoRALinearFunction (eager) and the op (compiled, or called as here) save the same tensors and run
    the same backward: the same output and gradients, bit for bit, and the same saved t."""
    from lora_kernels.library import LoRALinearFunction

    p = make_problem((2, 3), 12, 10, 4, weight_requires_grad=True, device=backend.device)
    grad_y = torch.randn(2, 3, 10, device=p.x.device)
    leaves = (p.x, p.weight, p.bias, p.lora_A, p.lora_B)
    y_op, t = lora_linear_op(*_forward_args(p, dropout_p, backend.name, seed=9))
    grads_op = torch.autograd.grad(y_op, leaves, grad_y)
    y_fn = LoRALinearFunction.apply(*leaves, p.scaling, dropout_p, 9 if dropout_p else 0, backend.name, None)
    grads_fn = torch.autograd.grad(y_fn, leaves, grad_y)
    assert torch.equal(y_op, y_fn)
    for a, b in zip(grads_op, grads_fn, strict=True):
        assert torch.equal(a, b)
    x2d = p.x.detach().reshape(-1, 12).double()
    mask = dropout_mask(9, x2d.shape, dropout_p, device=x2d.device, dtype=torch.float64) if dropout_p else 1.0
    assert_close(t, (x2d * mask) @ p.lora_A.detach().double().t(), p.x.dtype, "t (unscaled)")


def _small_model(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).to(_device())
    for i in (0, 2):
        model[i] = FusedLoRALinear.from_linear(
            model[i], r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False
        )
    return model


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fullgraph_compile_matches_eager(dropout):
    """torch.compile(fullgraph=True) traces FusedLoRALinear with no graph break, dropout off and on."""
    torch._dynamo.reset()
    eager, compiled_model = _small_model(dropout), _small_model(dropout)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16, device=_device())
    with use_backend("torch"):
        torch.manual_seed(123)
        y_eager = eager(x)
        y_eager.square().sum().backward()
        torch.manual_seed(123)
        y_comp = compiled(x)
        y_comp.square().sum().backward()
    # aot_eager keeps torch.randint as an ATen op on torch's generator: the seed, and so the mask, match.
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(_grads(compiled_model), _grads(eager), strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)
    if dropout > 0:
        with use_backend("torch"):
            y2 = compiled(x)
        assert not torch.equal(y2, y_comp), "a compiled step must draw a fresh dropout seed"


def test_compile_explain_has_no_graph_break():
    torch._dynamo.reset()
    model = _small_model(0.1)
    x = torch.randn(3, 16, device=_device())
    with use_backend("torch"):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_dropout_seed_argument_is_honoured():
    torch._dynamo.reset()
    p = make_problem((4,), 16, 8, 4, device=_device())

    def fn(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, p.scaling, 0.5, True, dropout_seed=77)

    with use_backend("torch"):
        y = torch.compile(fn, fullgraph=True, backend="aot_eager")(p.x, p.weight, p.bias, p.lora_A, p.lora_B)
    mask = dropout_mask(77, p.x.shape, 0.5, device=p.x.device)
    expected = lora_linear_reference(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, mask, upcast=True)
    assert_close(y.detach(), expected.detach(), torch.float32, "y")


def test_autocast_casts_like_nn_linear():
    """Under autocast(bf16) x, weight and bias are cast as for nn.Linear; the fp32 adapters get fp32 grads."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(6, 32, requires_grad=True)
    device_type = x.device.type
    with use_backend("torch"), torch.autocast(device_type, dtype=torch.bfloat16):
        y = layer(x)
        y_linear = linear(x)
    assert y.dtype == y_linear.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    expected = lora_linear_reference(
        x.detach().bfloat16(),
        layer.weight.bfloat16(),
        layer.bias.bfloat16(),
        layer.lora_A.detach(),
        layer.lora_B.detach(),
        layer.scaling,
        upcast=True,
    )
    assert_close(y.detach(), expected, torch.bfloat16, "y under autocast")


def test_autocast_inside_compile():
    torch._dynamo.reset()
    model = _small_model(0.0)
    x = torch.randn(4, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    with use_backend("torch"):
        y = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        y_eager = step(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager)


def test_double_backward_is_a_clear_error():
    p = make_problem((3,), 4, 5, 2)
    y = lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling)
    (grad_x,) = torch.autograd.grad(y.square().sum(), p.x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


# ------------------------------------------------------------------------ torch.compile(dynamic=True)


def test_compile_dynamic_fullgraph_over_sequence_lengths(backend):
    torch._dynamo.reset()
    problem = make_problem((2, 5), 16, 12, 4, device=backend.device)
    weight, bias, lora_A, lora_B = problem.weight, problem.bias, problem.lora_A, problem.lora_B
    scaling = problem.scaling

    def step(x):
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.2, True, dropout_seed=7)

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    with use_backend(backend.name), torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (5, 9):
            x = torch.randn(2, seq, 16, device=backend.device, requires_grad=True)
            y = compiled(x)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
            x_eager = x.detach().requires_grad_()
            y_eager = step(x_eager)
            (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x_eager)
            assert y.shape == (2, seq, 12)
            torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-5)
