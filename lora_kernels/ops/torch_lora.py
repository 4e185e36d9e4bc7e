"""The torch composite backend: the CPU path and the fallback wherever Triton cannot run.

It is the split path (:mod:`lora_kernels.ops.routing`) in torch ops: the LoRA term ``bias + s·t·Bᵀ`` is
written into the output's storage and the base GEMM accumulated into it (``addmm_``, beta = 1), so the only
M×N tensor is the output itself; ``dX`` the same way (``mask ⊙ s·(dY·B)·A``, then ``dX += dY·W``). Dropout
uses the shared Philox mask of :mod:`lora_kernels.dropout`: on the CPU with the extension it is made once in
the forward, packed at one bit per element (``params.keep_bits``, see :func:`lora_kernels.ops.with_kept_mask`)
and applied from those bits in the backward (measured faster than making it again: benchmarks/NOTES.md);
elsewhere it is regenerated from its seed in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dropout import dropout_mask
from . import DoRANeedsGrad, LoRAParams, NeedsGrad, as_output, t_dtype

MaskFn = Callable[[Tensor], Tensor]


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipped when it is a no-op (the call alone costs about a µs)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _dropped(x: Tensor, params: LoRAParams) -> Tensor:
    if params.dropout_p == 0.0:
        return x
    if params.x_dropped is not None:  # made with the kept mask, in the forward (with_kept_mask)
        return params.x_dropped
    return _masking(x, params)(x)


def project_t(x_dropped: Tensor, lora_A: Tensor) -> Tensor:
    """``t = dropout(x)·Aᵀ`` in float32 (float64 for float64 inputs), the product in ``x``'s dtype."""
    return _projection(x_dropped, lora_A)[1]


def _projection(x_dropped: Tensor, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """``(dropout(x)·Aᵀ in x's dtype, t)``: the product, which the LoRA GEMM takes as it is (``t`` cast back
    to ``x``'s dtype would give the same values: one cast kernel fewer for half inputs), and ``t``, its float32
    copy (float64 for float64 inputs) that the backward keeps."""
    product = torch.mm(x_dropped, _as(lora_A, x_dropped.dtype).t())
    return product, _as(product, t_dtype(x_dropped.dtype))


def _scaled_mm(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``s·(a·b)`` in ``a``'s dtype, ``s`` as the GEMM's alpha: applied to its float32 accumulator, one
    rounding (and one op: a separate ``mul_`` by a Python float costs more than the small GEMM itself)."""
    out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    return out.addmm_(a, b, beta=0, alpha=scaling)  # beta = 0: the uninitialised storage is not read


def scaled_grad_t(grad_out: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s·(dY·B)``, the gradient reaching ``t``, in ``dY``'s dtype; ``s`` applied in float32."""
    return _scaled_mm(grad_out, _as(lora_B, grad_out.dtype), scaling)


def scaled_grad_B(grad_out: Tensor, t: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """``dB = s·dYᵀ·t`` in ``dtype`` (``t`` carries no ``s``); ``s`` applied in float32."""
    if grad_out.dtype != torch.float16:  # s as the GEMM's alpha: one op, one rounding
        return _as(_scaled_mm(grad_out.t(), _as(t, grad_out.dtype), scaling), dtype)
    # float16: the product rounded to float16, then s in float32 (s·dYᵀ·t itself could overflow float16)
    product = torch.mm(grad_out.t(), _as(t, grad_out.dtype))
    return _as(_as(product, t_dtype(grad_out.dtype)).mul_(scaling), dtype)


def _masking(x: Tensor, params: LoRAParams) -> MaskFn:
    """``tensor ↦ tensor ⊙ mask`` for tensors of ``x``'s shape: from the bits the forward kept (one pass of
    the extension's ``lora_dropout_apply``), else from the mask made here once from the seed."""
    if params.keep_bits is not None:
        bits, scale = params.keep_bits, 1.0 / (1.0 - params.dropout_p)
        return lambda tensor: torch.ops.lora_kernels.lora_dropout_apply.default(tensor, bits, scale)
    mask = dropout_mask(params.seed, x.shape, params.dropout_p, x.device, x.dtype, params.column_offset)
    return lambda tensor: tensor * mask


def _grad_A(grad_t: Tensor, x: Tensor, masked: MaskFn | None, dtype: torch.dtype) -> Tensor:
    """``dA = (s·dY·B)ᵀ·dropout(x)`` in ``dtype``."""
    return _as(torch.mm(grad_t.t(), x if masked is None else masked(x)), dtype)


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, params: LoRAParams,
    out_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``y = x·Wᵀ + b + s·(t·Bᵀ)`` with ``t = dropout(x)·Aᵀ`` (float32, returned for backward)."""
    dtype = x.dtype
    t_, t = _projection(_dropped(x, params), lora_A)
    # s as the GEMM's alpha: applied to the float32 accumulator, after t's cast (no fp16 overflow of s·t)
    B_t = _as(lora_B, dtype).t()
    if bias is None:  # beta = 0: the uninitialised storage is not read
        y = torch.empty((x.shape[0], lora_B.shape[0]), device=x.device, dtype=dtype)
        y.addmm_(t_, B_t, beta=0, alpha=params.scaling)
    else:
        y = torch.addmm(bias, t_, B_t, alpha=params.scaling)
    y.addmm_(x, weight.t())  # the base GEMM accumulates into the LoRA term (beta = 1)
    return as_output(y, out_shape), t


def lora_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, params: LoRAParams,
    needs_grad: NeedsGrad,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # fmt: skip
    """``(dX, dA, dB, None)`` for :func:`lora_forward` (the bias gradient is left to ``run_backward``)."""
    need_x, _, _, need_A, need_B = needs_grad
    dtype = grad_y.dtype
    grad_x = grad_A = grad_B = None
    if need_x or need_A:  # the gradient reaching t, scaled once here for both dX and dA
        grad_t = scaled_grad_t(grad_y, lora_B, params.scaling)
    masked = None
    if params.dropout_p > 0.0 and (need_x or need_A):  # one mask, shared by dX and dA
        masked = _masking(x, params)
    if need_x:  # the LoRA term into dX's storage, then dY·W accumulated into it
        grad_x = torch.mm(grad_t, _as(lora_A, dtype))
        if masked is not None:
            grad_x = masked(grad_x)
        grad_x.addmm_(grad_y, weight)
    if need_A:
        grad_A = _grad_A(grad_t, x, masked, lora_A.dtype)
    if need_B:
        grad_B = scaled_grad_B(grad_y, t, params.scaling, lora_B.dtype)
    return grad_x, grad_A, grad_B, None


def lora_linear_composite(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, params: LoRAParams
) -> Tensor:
    """The fused LoRA linear as plain differentiable torch ops on an ``(..., in_features)`` input.

    No autograd Function: autograd, forward-mode AD and every ``torch.func`` transform (``vmap``, ``grad``,
    ``jvp``, ``jacrev``…) differentiate or batch it op by op, and it runs on ``meta`` tensors. Used by
    :func:`lora_kernels.lora_linear` where the fused path cannot run (see ``_composite_needed`` there).
    The same math and precision contract as the backends (the product with ``t = dropout(x)·Aᵀ`` in
    ``x.dtype``, ``s`` applied after it; the dropout mask of the shared Philox scheme for ``x.shape``),
    in PEFT's order of operations: ``x·Wᵀ + b + s·((dropout(x)·Aᵀ)·Bᵀ)``.
    """
    dtype = x.dtype
    lora = F.linear(F.linear(_dropped(x, params), _as(lora_A, dtype)), _as(lora_B, dtype))
    return F.linear(x, weight, bias).add(lora, alpha=params.scaling)


# --------------------------------------------------------------------------------------------------------
# DoRA (see lora_kernels/ops/__init__.py for the contract)
# --------------------------------------------------------------------------------------------------------


#: Rows of ``W + s·B·A`` formed at once by :func:`dora_weight_norm` (a float32 temporary of at most 64 MiB).
_NORM_CHUNK_ELEMENTS = 1 << 24


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``‖W + s·B·A‖`` per row in float32 (float64 for float64 weights), a chunk of rows at a time.

    PEFT's sequence of ops (``W + s·(B @ A)``, then ``torch.linalg.norm``), so that in float32 a magnitude
    PEFT initialised from its norm gives ``c = m / n = 1`` exactly here (the CPU path and the CUDA
    extension's DoRA)."""
    dtype = t_dtype(weight.dtype)
    A, B = _as(lora_A, dtype), _as(lora_B, dtype)
    rows = max(1, _NORM_CHUNK_ELEMENTS // max(weight.shape[1], 1))
    norms = [
        torch.linalg.vector_norm(
            torch.mm(B[i : i + rows], A).mul_(scaling).add_(_as(weight[i : i + rows], dtype)), dim=1
        )
        for i in range(0, weight.shape[0], rows)
    ]
    if not norms:  # out_features == 0
        return torch.empty(0, device=weight.device, dtype=dtype)
    return torch.cat(norms) if len(norms) != 1 else norms[0]


def norm_as_magnitude(norm: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA's norm rounded to the magnitude's dtype (and back; a no-op for a float32 magnitude), the norm
    ``c = m / n`` divides by: the magnitude starts as the norm in its own dtype (PEFT rounds its norm to its
    weight's dtype), so an adapter that has not changed gives ``c = 1`` exactly, in bf16 and fp16 too."""
    if torch.finfo(magnitude.dtype).bits < torch.finfo(norm.dtype).bits:
        return norm.to(magnitude.dtype).to(norm.dtype)
    return norm


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, col_scale: Tensor,
    params: LoRAParams, out_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, t, z)``: ``z = x̃·Wᵀ + s·t·Bᵀ``; ``y = c ⊙ z + b`` without dropout, else
    ``y = x·Wᵀ + b + s·t·Bᵀ + (c − 1) ⊙ z``.

    Both start from the base layer's output ``x·Wᵀ + b`` as ``F.linear`` gives it, so a fresh adapter
    (``c = 1``, ``B = 0``) returns exactly the base layer's output: without dropout as
    ``c ⊙ (x·Wᵀ + b + s·t·Bᵀ) + (1 − c) ⊙ b`` (an inf in ``x`` stays inf), with it in PEFT's form. The
    column scale is applied in float32 (c is close to 1: x.dtype would round it), one rounding to
    ``x.dtype``."""
    dtype = x.dtype
    x_dropped = _dropped(x, params)
    t_, t = _projection(x_dropped, lora_A)
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    lora_B_t = _as(lora_B, dtype).t()
    if params.dropout_p > 0.0:
        z = torch.mm(x_dropped, weight.t()).addmm_(t_, lora_B_t, alpha=params.scaling)
        y.addmm_(t_, lora_B_t, alpha=params.scaling)
        y.addcmul_(z, col_scale - 1)
    else:
        y.addmm_(t_, lora_B_t, alpha=params.scaling)  # the LoRA output x·Wᵀ + b + s·t·Bᵀ
        z = y if bias is None else y - bias
        y = y * col_scale if bias is None else torch.addcmul((1 - col_scale) * bias, y, col_scale)
    return as_output(_as(y, dtype), out_shape), t, z


def dora_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, z: Tensor,
    col_scale: Tensor, params: LoRAParams, needs_grad: DoRANeedsGrad,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, Tensor | None]:  # fmt: skip
    """``(dX, dA, dB, None, Σ_rows dY ⊙ z)`` for :func:`dora_forward`.

    The gradient reaching ``z`` is ``dY ⊙ c``; with dropout, ``dX = dY·W + mask ⊙ ((dY ⊙ (c − 1))·W +
    s·(dY ⊙ c)·B·A)``, without it ``(dY ⊙ c)·W + s·(dY ⊙ c)·B·A``.
    """
    need_x, _, _, need_A, need_B, need_m = needs_grad
    dtype = grad_y.dtype
    grad_z = _as(grad_y * col_scale, dtype)  # the product in float32
    grad_x = grad_A = grad_B = None
    if need_x or need_A:
        grad_t = scaled_grad_t(grad_z, lora_B, params.scaling)
    masked = None
    if params.dropout_p > 0.0 and (need_x or need_A):  # one mask, shared by dX and dA
        masked = _masking(x, params)
    if need_x:
        lora_A_ = _as(lora_A, dtype)
        if masked is None:
            grad_x = torch.mm(grad_z, weight).addmm_(grad_t, lora_A_)
        else:
            lora_part = torch.mm(_as(grad_y * (col_scale - 1), dtype), weight).addmm_(grad_t, lora_A_)
            grad_x = torch.mm(grad_y, weight).add_(masked(lora_part))
    if need_A:
        grad_A = _grad_A(grad_t, x, masked, lora_A.dtype)
    if need_B:
        grad_B = scaled_grad_B(grad_z, t, params.scaling, lora_B.dtype)
    grad_z_colsum = (grad_y * z).sum(0, dtype=t_dtype(dtype)) if need_m else None
    return grad_x, grad_A, grad_B, None, grad_z_colsum


def dora_linear_composite(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    params: LoRAParams, norm: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DoRA's linear as plain differentiable torch ops (as :func:`lora_linear_composite` for LoRA): for
    ``torch.func`` transforms, forward-mode AD, ``meta`` tensors and ``torch.compile``. The norm is computed
    without autograd (detached, as PEFT's), unless given."""
    dtype = x.dtype
    with torch.no_grad():
        if norm is None:
            norm = dora_weight_norm(weight, lora_A, lora_B, params.scaling)
        norm = norm_as_magnitude(norm, magnitude)
    col_scale = magnitude.to(norm.dtype) / norm
    x_dropped = _dropped(x, params)
    lora = F.linear(F.linear(x_dropped, _as(lora_A, dtype)), _as(lora_B, dtype)) * params.scaling
    # from F.linear's output, so that c = 1 and B = 0 give it exactly (see dora_forward)
    y = F.linear(x, weight, bias)
    if params.dropout_p > 0.0:
        y = y + (col_scale - 1) * F.linear(x_dropped, weight) + col_scale * lora
    else:
        y = (y + lora) * col_scale + (0.0 if bias is None else (1 - col_scale) * bias)
    return y.to(dtype)
