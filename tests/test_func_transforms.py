"""torch.func and forward-mode AD through the functional op, as they work on nn.Linear.

``vmap`` over a batch (with dropout: each sample's own mask), ``grad``, ``jvp`` and
``torch.autograd.forward_ad``, and DP-SGD's per-sample gradients (``functional_call`` + ``vmap(grad)``),
against float64 references or the fused autograd path. Every test runs on each backend the ``backend``
fixture gives (the torch path, and the Triton kernels, through the interpreter without a GPU).
"""

from __future__ import annotations

import torch
from helpers import assert_close, make_problem, reference_outputs
from torch.func import functional_call, grad, jvp, vmap

from lora_kernels import dropout_mask, lora_linear, lora_linear_reference, use_backend


def _args(p):
    return (p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling)


def _reference(x, weight, bias, lora_A, lora_B, scaling, mask=None):
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, mask)


def _f64(problem):
    """The problem in float64 (detached leaves that take gradients), for float64 references."""
    return [None if t is None else t.detach().double().requires_grad_() for t in _args(problem)[:5]]


def test_vmap_over_a_batch(backend):
    p = make_problem((6, 5), 16, 12, 4, device=backend.device)
    with use_backend(backend.name):
        y = vmap(lambda x: lora_linear(x, *_args(p)[1:]))(p.x)
    y_ref = _reference(*_f64(p), p.scaling)
    assert_close(y.detach(), y_ref.detach(), torch.float32, "vmap y")


def test_vmap_with_dropout_uses_each_samples_mask(backend):
    p = make_problem((4, 5), 16, 12, 4, device=backend.device)
    with use_backend(backend.name):
        y = vmap(lambda x: lora_linear(x, *_args(p)[1:], 0.3, True, dropout_seed=11))(p.x)
    mask = dropout_mask(11, p.x.shape[1:], 0.3, device=backend.device, dtype=torch.float64)
    y_ref = _reference(*_f64(p), p.scaling, mask)
    assert_close(y.detach(), y_ref.detach(), torch.float32, "vmap y with dropout")


def test_func_grad(backend):
    p = make_problem((3, 5), 16, 12, 4, device=backend.device)
    grad_y = torch.randn(3, 5, 12, device=backend.device)

    def loss(lora_A, lora_B, x):
        return (lora_linear(x, p.weight, p.bias, lora_A, lora_B, p.scaling) * grad_y).sum()

    with use_backend(backend.name):
        g_A, g_B, g_x = grad(loss, argnums=(0, 1, 2))(p.lora_A, p.lora_B, p.x)
    _, ref = reference_outputs(p, grad_y)
    assert_close(g_A, ref["lora_A"], torch.float32, "dA")
    assert_close(g_B, ref["lora_B"], torch.float32, "dB")
    assert_close(g_x, ref["x"], torch.float32, "dx")


def test_func_jvp_and_forward_ad(backend):
    p = make_problem((3, 5), 16, 12, 4, device=backend.device)
    tangents = [torch.randn_like(t) for t in (p.x, p.lora_A, p.lora_B)]

    def f(x, lora_A, lora_B):
        return lora_linear(x, p.weight, p.bias, lora_A, lora_B, p.scaling)

    def f_ref(x, lora_A, lora_B):
        w, b = p.weight.detach().double(), p.bias.detach().double()
        return lora_linear_reference(x, w, b, lora_A, lora_B, p.scaling)

    primals = (p.x.detach(), p.lora_A.detach(), p.lora_B.detach())
    with use_backend(backend.name):
        y, dy = jvp(f, primals, tuple(tangents))
    y_ref, dy_ref = jvp(f_ref, tuple(t.double() for t in primals), tuple(t.double() for t in tangents))
    assert_close(y, y_ref, torch.float32, "jvp y")
    assert_close(dy, dy_ref, torch.float32, "jvp tangent")

    fwAD = torch.autograd.forward_ad
    with use_backend(backend.name), fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip(primals, tangents, strict=True)]
        out = fwAD.unpack_dual(f(*duals))
    assert_close(out.primal, y_ref, torch.float32, "forward-AD y")
    assert_close(out.tangent, dy_ref, torch.float32, "forward-AD tangent")


class _LoRALayer(torch.nn.Module):
    """A minimal LoRA layer on the functional op (the module of lora_kernels.modules is tested elsewhere)."""

    def __init__(self, problem):
        super().__init__()
        self.weight = torch.nn.Parameter(problem.weight.detach(), requires_grad=False)
        self.bias = torch.nn.Parameter(problem.bias.detach(), requires_grad=False)
        self.lora_A = torch.nn.Parameter(problem.lora_A.detach())
        self.lora_B = torch.nn.Parameter(problem.lora_B.detach())
        self.scaling = problem.scaling

    def forward(self, x):
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)


def test_per_sample_gradients_vmap_of_grad(backend):
    """DP-SGD's per-sample gradients of the adapters (functional_call + vmap(grad)) against a loop."""
    layer = _LoRALayer(make_problem((1,), 16, 12, 4, device=backend.device))
    params = {name: p.detach() for name, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(5, 3, 16, device=backend.device)
    target = torch.randn(5, 3, 12, device=backend.device)

    def loss(params, x, target):
        y = functional_call(layer, params, (x.unsqueeze(0),))
        return torch.nn.functional.mse_loss(y, target.unsqueeze(0))

    with use_backend(backend.name):
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
        for i in range(x.shape[0]):  # the fused autograd path, one sample at a time
            leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
            value = loss(leaves, x[i], target[i])
            for name, g in zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True):
                torch.testing.assert_close(per_sample[name][i], g, rtol=1e-4, atol=1e-5, msg=name)
