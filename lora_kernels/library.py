"""The fused LoRA linear registered with ``torch.library``, so ``torch.compile`` traces it without breaks.

Two custom ops, neither mutating its inputs:

``lora_kernels::lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend) -> (y, t)``
    ``y = x·Wᵀ + b + s·(t·Bᵀ)`` with ``t = dropout(x)·Aᵀ`` (the ``(M, r)`` float32 intermediate, returned so
    autograd can save it; it is marked non-differentiable).
``lora_kernels::lora_linear_backward(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed,
backend, needs_grad) -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)``
    a gradient that is not needed comes back as an empty tensor (custom ops cannot return ``None``).

Everything that depends on Python state is decided by the caller (:func:`lora_kernels.lora_linear`) and
passed in: ``backend`` is a string, ``seed`` an int64 CPU scalar tensor (or ``None`` without dropout) so a
compiled graph can draw a fresh one per call with ``torch.randint`` instead of breaking on ``int()``.
Both ops have a fake (meta) implementation and the forward has ``register_autograd``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import run_backward, run_forward, t_dtype

__all__ = ["lora_linear_backward_op", "lora_linear_op", "once_differentiable_grads"]


def _seed_int(seed: Tensor | None, dropout_p: float) -> int:
    if seed is None or dropout_p == 0.0:
        return 0
    return int(seed.item())  # a CPU scalar: no device sync


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=(), device_types=None)
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Forward of the fused LoRA linear on ``backend``; ``x`` is ``(..., in_features)``."""
    y, t = run_forward(
        backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_int(seed, dropout_p)
    )
    return y.contiguous(), t.contiguous()  # custom ops may not return views of their inputs


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    t = x.new_empty(rows, lora_A.shape[0], dtype=t_dtype(x.dtype))
    return y, t


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=(), device_types=None)
def lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    t: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for ``(x, weight, bias, lora_A, lora_B)``; an empty tensor where ``needs_grad`` is False."""
    grads = run_backward(
        backend, grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, _seed_int(seed, dropout_p),
        tuple(bool(n) for n in needs_grad),
    )  # fmt: skip
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(
    grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, backend, needs_grad
):
    need_x, need_weight, need_bias, need_A, need_B = needs_grad
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else empty,
        x.new_empty(weight.shape) if need_weight else x.new_empty(0),
        x.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_A else x.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_B else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, t = output
    ctx.mark_non_differentiable(t)
    ctx.save_for_backward(x, weight, lora_A, lora_B, t, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


class OnceDifferentiable(torch.autograd.Function):
    """Identity on gradients; differentiating through it again is a clear error (as ``once_differentiable``).

    Use :func:`once_differentiable_grads`: the op's inputs ride along as anchors, so the returned gradients
    hang off the graph and a second backward reaches this error instead of treating them as constants.
    """

    @staticmethod
    def forward(ctx, num_anchors: int, *tensors):
        return tensors[num_anchors:]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "lora_kernels' fused LoRA linear is once differentiable: double backward (create_graph=True "
            "through its gradients) is not supported"
        )


def once_differentiable_grads(anchors: tuple, grads: tuple) -> tuple:
    """``grads`` unchanged, tied to ``anchors`` so that differentiating them again raises a clear error."""
    anchors = tuple(a for a in anchors if isinstance(a, Tensor) and a.requires_grad)
    if not anchors:
        return grads
    return OnceDifferentiable.apply(len(anchors), *anchors, *grads)


def _backward(ctx, grad_y: Tensor, _grad_t: Tensor | None):
    x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = lora_linear_backward_op(
        grad_y, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, seed, ctx.backend, needs
    )
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # backward(create_graph=True)
        grads = once_differentiable_grads((grad_y, x, weight, lora_A, lora_B), grads)
    out = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*out, None, None, None, None)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
