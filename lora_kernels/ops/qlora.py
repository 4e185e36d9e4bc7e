"""The fused LoRA linear over a 4-bit (bitsandbytes) base: the two paths and the choice between them.

``"fused"``: the base GEMMs (forward and dX) read the packed 4-bit weight and dequantize tiles in registers
(:mod:`lora_kernels.ops.triton_nf4`); the LoRA side runs on the Triton LoRA kernels. Triton backend only.
``"dequant"``: ``W`` is dequantized once per call to the compute dtype (the Triton dequantization kernel on
the Triton backend, bitsandbytes' ``dequantize_4bit`` elsewhere) and the ordinary fused LoRA path
(:func:`lora_kernels.ops.run_forward` / :func:`run_backward`) runs on it; the backward dequantizes again
rather than keeping the dense ``W`` (QLoRA's memory saving stays).

Which is faster is for a GPU to measure (``benchmarks/gpu_run.sh``); until then :func:`select_path` takes
the *predicted* winner: ``fused`` for M <= :data:`FUSED_MAX_M` rows on the Triton backend (decode-sized
batches read the weight once, at a quarter of the bytes of bf16), ``dequant`` above (the dense GEMM's
tensor-core rate, for one extra N·K write and read). :func:`use_qlora_path` or ``LORA_KERNELS_QLORA_PATH``
(``auto``, ``fused``, ``dequant``) forces one.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
from torch import Tensor

from .. import quant4bit
from ..dispatch import interpreting, override
from . import LoRAParams, _flat_grad, _flat_input, _no_autocast, run_backward, run_forward

PATHS = ("fused", "dequant")
ENV_VAR = "LORA_KERNELS_QLORA_PATH"
#: Rows up to which ``auto`` takes the in-kernel path. Predicted, not measured (see the module docstring).
FUSED_MAX_M = 64

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lora_kernels_qlora_path", default=None
)


def use_qlora_path(name: str) -> contextlib.AbstractContextManager:
    """Run 4-bit layers on path ``name`` (``auto``, ``fused`` or ``dequant``) inside."""
    return override(_requested, name, PATHS, "QLoRA path")


def select_path(backend: str, rows: int) -> str:
    """The path for an input of ``rows`` rows on ``backend`` (see the module docstring)."""
    name = _requested.get() or (os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name == "auto":
        return "fused" if backend == "triton" and rows <= FUSED_MAX_M else "dequant"
    if name not in PATHS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a QLoRA path; choose one of auto, {', '.join(PATHS)}")
    if name == "fused" and backend != "triton":
        raise RuntimeError(f"the fused 4-bit path runs on the Triton backend, not on {backend!r}")
    return name


def dequantize(backend: str, w: quant4bit.Weight4bit, dtype: torch.dtype) -> Tensor:
    """``W`` (N, K) in ``dtype``: the Triton kernel on the Triton backend, else bitsandbytes'."""
    if backend == "triton" and (w.device.type == "cuda" or interpreting()):
        from . import triton_nf4

        return triton_nf4.dequantize(w, dtype)
    return quant4bit.dequantize(w, dtype)


def run_qlora_forward(
    backend: str, path: str, x: Tensor, w: quant4bit.Weight4bit, bias: Tensor | None, lora_A: Tensor,
    lora_B: Tensor, params: LoRAParams,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(y (..., out), t (M, r))`` as :func:`lora_kernels.ops.run_forward`, the base weight 4-bit."""
    if path == "fused":
        from . import triton_nf4

        x2d, out_shape = _flat_input(x, w.shape[0])
        with _no_autocast(x.device.type):
            return triton_nf4.lora_forward_4bit(x2d, w, bias, lora_A, lora_B, params, out_shape)
    return run_forward(backend, x, dequantize(backend, w, x.dtype), bias, lora_A, lora_B, params)


def run_qlora_backward(
    backend: str, path: str, grad_y: Tensor, x: Tensor, w: quant4bit.Weight4bit, lora_A: Tensor,
    lora_B: Tensor, t: Tensor, params: LoRAParams, needs_grad: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients for ``(x, bias, lora_A, lora_B)`` (the 4-bit weight is frozen)."""
    need_x, need_bias, need_A, need_B = needs_grad
    needs = (need_x, False, need_bias, need_A, need_B)
    if path == "fused":
        from . import triton_nf4

        x2d, grad_y2d = _flat_grad(x, grad_y, w.shape[0])
        with _no_autocast(x.device.type):
            grad_x, grad_A, grad_B, grad_bias = triton_nf4.lora_backward_4bit(
                grad_y2d, x2d, w, lora_A, lora_B, t, params, needs
            )
        if grad_x is not None and grad_x.shape != x.shape:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_bias, grad_A, grad_B
    if need_x:
        weight = dequantize(backend, w, x.dtype)
    else:  # dX not needed: the backends never read the weight then
        weight = torch.zeros((), device=x.device, dtype=x.dtype).expand(w.shape)
    grad_x, _, grad_bias, grad_A, grad_B = run_backward(
        backend, grad_y, x, weight, lora_A, lora_B, t, params, needs
    )
    return grad_x, grad_bias, grad_A, grad_B
