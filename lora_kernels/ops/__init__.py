"""Backend implementations of the fused LoRA linear.

Every backend module exposes the same two functions on 2-D tensors, called by the autograd Function in
:mod:`lora_kernels.functional`:

``lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, t)``
    ``x`` is ``(M, K)`` with any strides; ``y`` is ``(M, N)`` in ``x.dtype``; ``t = s·dropout(x)·Aᵀ`` is the
    ``(M, r)`` float32 intermediate kept for backward.

``lora_backward(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, needs_grad)
-> (grad_x, grad_weight, grad_bias, grad_A, grad_B)``
    ``needs_grad`` is five booleans in that order; a gradient not needed is ``None``.

Precision contract (the same in every backend): the matmuls run in the input's dtype (adapters are cast
tile by tile, never x), accumulate in float32, and ``t`` stays float32; ``y`` and ``grad_x`` come out in
``x.dtype``, ``grad_A``/``grad_B`` in the adapters' dtype, as under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..dispatch import backend_module

_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current inside (kernels launch on the current device, not on their tensors').

    A no-op, at the cost of one query, for CPU tensors and when ``device`` is already the current device.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device.index)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside; entering ``torch.autocast`` costs several µs, so only when it is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_GUARD


def t_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the intermediate ``t`` for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def run_forward(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend``'s ``lora_forward`` on an ``(..., in_features)`` input: ``(y (..., out), t (M, r))``."""
    flat = x.dim() != 2  # (the reshapes cost µs a call: skipped where x is 2-D already)
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    with _no_autocast(x.device.type):  # the caller applied autocast's casts already
        y, t = backend_module(backend).lora_forward(
            x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
        )
    return (y.reshape(*x.shape[:-1], weight.shape[0]) if flat else y), t


def run_backward(
    backend: str,
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    t: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_grad: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``backend``'s ``lora_backward`` for an ``(..., in_features)`` input; ``grad_x`` comes back in x's shape."""
    flat = x.dim() != 2
    if flat:
        rows = math.prod(x.shape[:-1])
        grad_y, x2d = grad_y.reshape(rows, weight.shape[0]), x.reshape(rows, x.shape[-1])
    else:
        x2d = x
    if grad_y.dtype != x.dtype:
        grad_y = grad_y.to(x.dtype)
    with _no_autocast(x.device.type):
        grad_x, *rest = backend_module(backend).lora_backward(
            grad_y, x2d, weight, lora_A, lora_B, t, scaling, dropout_p, seed, needs_grad
        )
    return (grad_x.reshape(x.shape) if flat and grad_x is not None else grad_x, *rest)
