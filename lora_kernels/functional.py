"""The fused LoRA linear as an autograd Function and a functional call.

``lora_linear`` validates its inputs, picks the backend (:mod:`lora_kernels.dispatch`) and runs
:class:`LoRALinearFunction`, which saves only ``x`` (as ``nn.Linear`` does), the frozen weight and adapters
(parameters, no copies) and the ``(M, r)`` float32 intermediate ``t``. The dropout mask is regenerated
from its seed in backward, never saved.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .dispatch import backend_module, select_backend
from .dropout import new_seed

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with a fused forward and backward on one backend."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: int,
        backend: str,
    ) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        y, t = backend_module(backend).lora_forward(
            x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, t)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, lora_A, lora_B, t = ctx.saved_tensors
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        if grad_y2d.dtype != x.dtype:
            grad_y2d = grad_y2d.to(x.dtype)
        grads = backend_module(ctx.backend).lora_backward(
            grad_y2d,
            x.reshape(-1, x.shape[-1]),
            weight,
            lora_A,
            lora_B,
            t,
            ctx.scaling,
            ctx.dropout_p,
            ctx.seed,
            tuple(ctx.needs_input_grad[:5]),
        )
        grad_x, grad_weight, grad_bias, grad_A, grad_B = grads
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None


def _describe(name: str, tensor: torch.Tensor) -> str:
    return f"{name} (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device})"


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument before any kernel is launched."""
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{_describe(name, tensor)} must be a floating-point tensor (fp16, bf16, fp32, fp64)"
            )
    if x.dim() < 1:
        raise ValueError(f"{_describe('x', x)} needs at least one dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"{_describe('weight', weight)} must be 2-D (out_features, in_features)")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"last dim of {_describe('x', x)} must equal in_features={in_features} of "
            f"{_describe('weight', weight)}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"{_describe('lora_A', lora_A)} must be (r, in_features={in_features})")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"the LoRA rank r must be >= 1, got {_describe('lora_A', lora_A)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(
            f"{_describe('lora_B', lora_B)} must be (out_features={out_features}, r={r}) to match "
            f"{_describe('weight', weight)} and {_describe('lora_A', lora_A)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{_describe('bias', bias)} must be (out_features={out_features},)")
    for name, tensor in named[1:]:
        if tensor.device != x.device:
            raise ValueError(f"{_describe(name, tensor)} is not on the device of {_describe('x', x)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"{_describe('x', x)} and the base layer ({_describe('weight', weight)}"
            f"{', ' + _describe('bias', bias) if bias is not None else ''}) must share one dtype, "
            "as nn.Linear requires; cast the input or the layer"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(
            f"{_describe('lora_A', lora_A)} and {_describe('lora_B', lora_B)} must share one dtype"
        )
    if isinstance(scaling, torch.Tensor) or not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be a finite Python float, got {scaling!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Fused LoRA linear: ``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    Args:
        x: input ``(..., in_features)``; any number of leading dims, any strides.
        weight: base weight ``(out_features, in_features)``, same dtype as ``x``.
        bias: base bias ``(out_features,)`` or ``None``.
        lora_A: adapter ``(r, in_features)``.
        lora_B: adapter ``(out_features, r)``; same dtype as ``lora_A`` (may be fp32 on a bf16/fp16 base).
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_p: dropout probability on the LoRA branch, applied only when ``training``.
        training: whether dropout is active, as ``F.dropout``'s ``training``.
        dropout_seed: seed of the dropout mask (see :func:`lora_kernels.dropout_mask`); by default a fresh
            one is drawn from torch's generator, so ``torch.manual_seed`` makes runs repeatable.

    Returns:
        ``(..., out_features)`` in ``x.dtype``.
    """
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    dropout_p = float(dropout_p) if training else 0.0
    seed = 0
    if dropout_p > 0.0:
        seed = new_seed() if dropout_seed is None else int(dropout_seed)
    backend = select_backend(x.device, x.dtype)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p, seed, backend)
