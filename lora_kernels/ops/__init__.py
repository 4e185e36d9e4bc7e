"""Backend implementations of the fused LoRA linear, and the glue every backend shares.

A backend is a module (``triton_lora``, ``cuda_lora``, ``torch_lora``) with two functions on 2-D tensors,
the :class:`Backend` protocol below. They are called through :func:`run_forward` / :func:`run_backward`,
which flatten leading dims, turn autocast off and compute what no backend needs to fuse: the base weight's
gradient ``dW = dYᵀ·x`` and, unless the backend returns it, the bias gradient ``db = Σ_rows dY``.

``lora_forward(x, weight, bias, lora_A, lora_B, params, out_shape=None) -> (y, t)``
    ``x`` is ``(M, K)`` with any strides; ``y = x·Wᵀ + b + s·(t·Bᵀ)`` is a new tensor (never a view: the
    caller may modify it in place, as nn.Linear's output) of shape ``out_shape`` (default ``(M, N)``; any
    shape of ``M·N`` elements, e.g. ``(..., N)`` for an input that had leading dims) in ``x.dtype``.
    ``t = dropout(x)·Aᵀ`` is the ``(M, r)`` float32 intermediate kept for backward, *without* the scaling
    ``s``: it is PEFT's ``x·Aᵀ``. ``params`` is the :class:`LoRAParams` of the call.

``lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, needs_grad) -> (grad_x, grad_A, grad_B, grad_bias)``
    ``needs_grad`` is autograd's five booleans for ``(x, weight, bias, lora_A, lora_B)``; a gradient not
    needed is ``None``. ``dB = s·dYᵀ·t``. ``grad_bias`` is the backend's own ``Σ_rows dY`` where it comes
    for free (the Triton backend sums the columns of dY in the pass that gives dB), else ``None``:
    :func:`run_backward` computes it then. ``weight`` is only read, for ``dX = dY·W + ...``.

Precision contract (the same in every backend): the matmuls run in the input's dtype (adapters are cast
tile by tile, never x), accumulate in float32, and ``t`` stays float32; ``y`` and ``grad_x`` come out in
``x.dtype``, ``grad_A``/``grad_B`` in the adapters' dtype, as under ``torch.autocast``. The scaling ``s`` is
applied in float32 to the result of each product with ``t`` (the LoRA term of ``y``, ``dB``), never folded
into ``t`` before ``t`` is cast to the compute dtype: with float16 inputs a large ``s`` (rsLoRA, large
``lora_alpha``) would overflow ``s·t`` where PEFT, which computes ``((x·Aᵀ)·Bᵀ)·s``, stays finite.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..dispatch import backend_module

#: Autograd's ``needs_input_grad`` for ``(x, weight, bias, lora_A, lora_B)``.
NeedsGrad = tuple[bool, bool, bool, bool, bool]


@dataclass(frozen=True, slots=True)
class LoRAParams:
    """The scalars of one fused LoRA linear call, passed as one value from the autograd layer down to the
    kernels: the scaling ``s`` of the LoRA term and the dropout on its input, ``p`` and the Philox seed of
    the mask (:mod:`lora_kernels.dropout`; ignored when ``p`` is 0)."""

    scaling: float
    dropout_p: float = 0.0
    seed: int = 0


class Backend(Protocol):
    """What a backend module provides (see the module docstring for the contract)."""

    def lora_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
        params: LoRAParams, out_shape: tuple[int, ...] | None = None,
    ) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def lora_backward(
        self, grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
        params: LoRAParams, needs_grad: NeedsGrad,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...  # fmt: skip


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current inside (kernels launch on the current device, not on their tensors').

    A no-op, at the cost of one query, for CPU tensors and when ``device`` is already the current device.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device.index)


def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` exists for ``device_type`` (not for ``meta``, where asking whether it is
    enabled raises). A fraction of a µs; not cached, as a cache would be a guard under torch.compile."""
    return torch.amp.is_autocast_available(device_type)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside; entering ``torch.autocast`` costs several µs, so only when it is on."""
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_GUARD


def t_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the intermediate ``t`` for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _no_view_reshape(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` (contiguous, freshly allocated, not referenced elsewhere) in ``shape``, as a tensor that
    autograd does not see as a view, so that an in-place op on it is allowed (ATen's ``linear`` returns its
    N-D outputs the same way). No copy."""
    return torch.ops.aten._unsafe_view.default(tensor, shape)


def as_output(y: torch.Tensor, out_shape: tuple[int, ...] | None) -> torch.Tensor:
    """A backend's fresh 2-D ``y`` in ``out_shape`` (see ``lora_forward``), without a copy or a view."""
    if out_shape is None or tuple(y.shape) == tuple(out_shape):
        return y
    return _no_view_reshape(y, out_shape)


def run_forward(
    backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    params: LoRAParams,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``backend``'s ``lora_forward`` on an ``(..., in_features)`` input: ``(y (..., out), t (M, r))``.

    ``y`` is not a view (the backend allocates it in the ``(..., out)`` shape), so the caller may modify
    it in place as it may nn.Linear's output.
    """
    flat = x.dim() != 2  # (the reshapes cost µs a call: skipped where x is 2-D already)
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    out_shape = (*x.shape[:-1], weight.shape[0]) if flat else None
    with _no_autocast(x.device.type):  # the caller applied autocast's casts already
        return backend_module(backend).lora_forward(x2d, weight, bias, lora_A, lora_B, params, out_shape)


def run_backward(
    backend: str, grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
    params: LoRAParams, needs_grad: NeedsGrad,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients for ``(x, weight, bias, lora_A, lora_B)`` of an ``(..., in_features)`` input (``grad_x`` in
    x's shape): the backend's ``lora_backward``, plus ``dW = dYᵀ·x`` and, where the backend leaves it,
    ``db = Σ_rows dY``."""
    flat = x.dim() != 2
    if flat:
        rows = math.prod(x.shape[:-1])
        grad_y, x2d = grad_y.reshape(rows, weight.shape[0]), x.reshape(rows, x.shape[-1])
    else:
        x2d = x
    if grad_y.dtype != x.dtype:
        grad_y = grad_y.to(x.dtype)
    _, need_weight, need_bias, _, _ = needs_grad
    with _no_autocast(x.device.type):
        grad_x, grad_A, grad_B, grad_bias = backend_module(backend).lora_backward(
            grad_y, x2d, weight, lora_A, lora_B, t, params, needs_grad
        )
        if need_bias and grad_bias is None:
            grad_bias = grad_y.sum(0)
        grad_weight = torch.mm(grad_y.t(), x2d) if need_weight else None
    if flat and grad_x is not None:
        grad_x = grad_x.reshape(x.shape)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
