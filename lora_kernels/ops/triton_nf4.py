"""Triton kernels for a 4-bit (bitsandbytes NF4/FP4) base weight: dequantization in registers.

Read top to bottom: the dequantization helper, the two ``@triton.jit`` kernels, the tile configs, the
launchers, then :func:`lora_forward_4bit` / :func:`lora_backward_4bit` (the backend functions of the
in-kernel path of :mod:`lora_kernels.ops.qlora`).

=========================  ================================================  ===========================
kernel                     computes                                          used for
=========================  ================================================  ===========================
``_dequant_4bit_kernel``   ``W`` (N, K) in a float dtype from the packed     the dequantize-once path
                           weight (bitsandbytes' ``dequantize_4bit``)        (large M), tests
``_qlora_linear_kernel``   ``out = a·b + [mask ⊙] (s·t·u) + bias`` with      ``y`` (forward), ``dX``
                           ``b = Wᵀ`` or ``W`` dequantized tile by tile      (small M)
                           in registers from the packed weight
=========================  ================================================  ===========================

The 4-bit layout and the value of each element are those of :mod:`lora_kernels.quant4bit`: element ``i`` of
``W`` read row-major is nibble ``i % 2`` (high first) of byte ``i // 2``, worth ``code[nibble] ·
absmax[i // blocksize]`` in float32, rounded to the original weight's dtype and then to the compute dtype,
bit for bit bitsandbytes' ``dequantize_4bit`` (tested). Double-quantized: ``absmax = code2[q] ·
absmax2[b // blocksize2] + offset``, a product and a sum rounded separately as bitsandbytes does, so these
kernels are compiled without fp contraction (``enable_fp_fusion=False``) when nested.

The LoRA side (``t = dropout(x)·Aᵀ``, ``s·dY·B``, dA, dB, db) is the Triton LoRA backend's own kernels
(:mod:`lora_kernels.ops.triton_reduce`); only the base GEMMs read the 4-bit weight here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from ..quant4bit import Weight4bit
from . import LoRAParams, device_guard, triton_support
from .triton_reduce import _grad_y_pass, _project, _reduce_rows
from .triton_support import _cdiv, _launch_guard, _pow2_clamp
from .triton_tiles import _add_lora, _epilogue_operands, _seed_words, _store_with_bias, _tile


@triton.jit
def _dequant_4bit(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, blocksize, blocksize2,
    NESTED: tl.constexpr, QDTYPE: tl.constexpr,
):  # fmt: skip
    """The 4-bit weight's elements at flat (row-major) indices ``idx`` (int64, any shape) in ``QDTYPE``,
    bitsandbytes' value; 0 where ``mask`` is False."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble)
    block = idx // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // blocksize2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0).to(QDTYPE)


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    numel, blocksize, blocksize2,
    NESTED: tl.constexpr, QDTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out[i] = W[i]`` for the ``numel`` elements of ``W`` read row-major, in ``out``'s dtype (after
    rounding to ``QDTYPE``, the original weight's dtype)."""
    idx, mask = _tile(tl.program_id(0).to(tl.int64) * BLOCK, BLOCK, numel)
    w = _dequant_4bit(
        packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, blocksize,
        blocksize2, NESTED, QDTYPE,
    )  # fmt: skip
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["dropout_threshold"])
def _qlora_linear_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, t_ptr, u_ptr, bias_ptr,
    out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn,
    stride_tm, stride_tr, stride_ur, stride_un, stride_bias, stride_om, stride_on,
    blocksize, blocksize2, lora_scale, seed_ptr, dropout_threshold, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, NESTED: tl.constexpr, QDTYPE: tl.constexpr,
    LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = a[M, K]·b[K, N] + mask ⊙ (lora_scale·t[M, R]·u[R, N]) + bias[N]``, fp32 accumulation,
    where ``b[k, n]`` is element ``k·stride_wk + n·stride_wn`` of the 4-bit weight read row-major, dequantized
    in registers: forward ``b = Wᵀ`` (strides 1, in_features), dX ``b = W`` (in_features, 1).

    Forward: ``a = x``, ``t = dropout(x)·Aᵀ``, ``u = Bᵀ``, ``lora_scale = s``, bias, no mask.
    dX:      ``a = dY``, ``t = s·dY·B``, ``u = A``, ``lora_scale = 1``, no bias, the dropout mask of x.
    The epilogue is that of the Triton LoRA backend's ``_lora_linear_kernel`` (see there for ``LORA_FP32``).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m, mask_m = _tile(pid_m.to(tl.int64) * BLOCK_M, BLOCK_M, M)
    offs_n, mask_n = _tile(pid_n.to(tl.int64) * BLOCK_N, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    in_dtype = a_ptr.dtype.element_ty
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_cols = offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        rows = (k * BLOCK_K + offs_k).to(tl.int64)
        w = _dequant_4bit(
            packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
            rows[:, None] * stride_wk + w_cols, (offs_k[:, None] < k_left) & mask_n[None, :], blocksize,
            blocksize2, NESTED, QDTYPE,
        )  # fmt: skip
        acc = tl.dot(a, w.to(in_dtype), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak

    # Epilogue: the LoRA term, added while the accumulator is still fp32.
    offs_r, mask_r = _tile(0, BLOCK_R, R)
    t = tl.load(
        t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )
    t_op, u_op = _epilogue_operands(
        t, u_ptr, offs_r, mask_r, offs_n, mask_n, stride_ur, stride_un, lora_scale, in_dtype, LORA_FP32
    )
    seed_lo, seed_hi = _seed_words(seed_ptr, HAS_DROPOUT)
    acc = _add_lora(acc, t_op, u_op, offs_m, pid_n.to(tl.int64) * BLOCK_N, seed_lo, seed_hi, dropout_threshold,
                    dropout_scale, HAS_DROPOUT, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    _store_with_bias(
        acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_bias, stride_om, stride_on, HAS_BIAS
    )


# --------------------------------------------------------------------------------------------------
# Tile configs (none timed yet: the GPU run of benchmarks/gpu_run.sh measures them) and launchers.
# --------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _qlinear_config(M: int, N: int, K: int) -> dict:
    """Tile config of :func:`_qlora_linear_kernel`. Predicted, not timed: small M (decode) reads the weight
    once per column tile, so narrow N tiles give more programs; one config under the interpreter."""
    if interpreting():
        return dict(BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=_pow2_clamp(N, 16, 64),
                    BLOCK_K=_pow2_clamp(K, 16, 64), num_warps=4, num_stages=1)  # fmt: skip
    if M <= 64:
        return dict(BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _quant_args(w: Weight4bit) -> tuple:
    """The quant-state pointers of the kernels (unused ones as a valid dummy)."""
    if w.nested:
        return w.absmax, w.code, w.absmax2, w.code2, w.offset
    return w.absmax, w.code, w.absmax, w.code, w.code


def _quant_constexprs(w: Weight4bit) -> dict:
    flags = dict(NESTED=w.nested, QDTYPE=_TL_DTYPES[w.dtype])
    if w.nested and not interpreting():  # absmax = code2·absmax2 + offset rounded twice, as bitsandbytes
        flags["enable_fp_fusion"] = False
    return flags


def dequantize(w: Weight4bit, dtype: torch.dtype) -> torch.Tensor:
    """``W`` (N, K) in ``dtype``: bitsandbytes' ``dequantize_4bit`` (``w.dtype``), then cast, in one kernel."""
    out = torch.empty(w.shape, device=w.device, dtype=dtype)
    numel = out.numel()
    if numel == 0:
        return out
    block = 1024 if not interpreting() else max(16, min(4096, 1 << (numel - 1).bit_length()))
    with _launch_guard(), device_guard(w.device):
        triton_support._launch(  # (looked up on the module: tests count launches by replacing it)
            _dequant_4bit_kernel,
            lambda cfg: (_cdiv(numel, cfg["BLOCK"]),),
            [dict(BLOCK=block, num_warps=4)],
            (w.packed, *_quant_args(w), out, numel, w.blocksize, max(w.blocksize2, 1)),
            _quant_constexprs(w),
        )
    return out


def _qlinear_with_lora(
    a: torch.Tensor, w: Weight4bit, transposed: bool, t: torch.Tensor, u: torch.Tensor,
    bias: torch.Tensor | None, lora_scale: float, dropout_p: float, seed: int,
    out_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``a·b + [mask ⊙] lora_scale·t·u + bias`` with ``b = Wᵀ`` (``transposed``, forward) or ``W`` (dX)."""
    M, K = a.shape
    n_rows, n_cols = w.shape
    N = n_rows if transposed else n_cols
    R = t.shape[1]
    out = torch.empty((M, N) if out_shape is None else out_shape, device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        out.view(M, N).copy_(torch.mm(t.to(u.dtype) * lora_scale, u).to(a.dtype))
        if bias is not None:
            out.view(M, N).add_(bias)
        return out
    stride_wk, stride_wn = (1, n_cols) if transposed else (n_cols, 1)
    seed_ptr, threshold, scale = triton_support._dropout_args(dropout_p, seed, out)

    def make():
        configs = triton_support._Configs(
            triton_support._smaller_configs(_qlinear_config(M, N, K), ("BLOCK_N", "BLOCK_M", "BLOCK_K"))
        )
        return configs, lambda cfg: (_cdiv(N, cfg["BLOCK_N"]), _cdiv(M, cfg["BLOCK_M"]))

    configs, grid_of = triton_support._plan(("qlinear", M, N, K, interpreting(), _qlinear_config), make)
    triton_support._launch(
        _qlora_linear_kernel,
        grid_of,
        configs,
        (
            a, w.packed, *_quant_args(w), t, u, bias if bias is not None else out, out,
            M, N, K, R,
            a.stride(0), a.stride(1), stride_wk, stride_wn,
            t.stride(0), t.stride(1), u.stride(0), u.stride(1),
            bias.stride(0) if bias is not None else 0, N, 1,
            w.blocksize, max(w.blocksize2, 1), lora_scale, seed_ptr, threshold, scale,
        ),
        dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, **_quant_constexprs(w),
             LORA_FP32=a.dtype == torch.float16, INPUT_PRECISION=triton_support._input_precision(a.dtype), BLOCK_R=triton_support._block_r(R)),
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# The in-kernel path (see lora_kernels/ops/qlora.py): the backend interface's two functions, with the
# 4-bit weight in place of the dense one.
# --------------------------------------------------------------------------------------------------


def lora_forward_4bit(
    x: torch.Tensor, w: Weight4bit, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    params: LoRAParams, out_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``y = x·Wᵀ + b + s·(t·Bᵀ)``, ``t = dropout(x)·Aᵀ`` (float32), ``W`` read 4-bit; ``x`` is 2-D."""
    with _launch_guard(), device_guard(x.device):
        t = _project(x, lora_A.t(), 1.0, params.dropout_p, params.seed)
        y = _qlinear_with_lora(x, w, True, t, lora_B.t(), bias, params.scaling, 0.0, params.seed, out_shape)
    return y, t


def lora_backward_4bit(
    grad_y: torch.Tensor, x: torch.Tensor, w: Weight4bit, lora_A: torch.Tensor, lora_B: torch.Tensor,
    t: torch.Tensor, params: LoRAParams, needs_grad: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """``(dX, dA, dB, db)`` of :func:`lora_forward_4bit` (``needs_grad`` for ``(x, weight, bias, A, B)``)."""
    need_x, _, need_bias, need_A, need_B = needs_grad
    scaling, dropout_p, seed = params.scaling, params.dropout_p, params.seed
    grad_x = grad_A = None
    with _launch_guard(), device_guard(grad_y.device):
        grad_t, grad_B, grad_bias, _ = _grad_y_pass(  # dB and db cast in the kernels' stores
            grad_y, lora_B if need_x or need_A else None, t, scaling, need_B or need_bias, need_bias,
            dtypes=(lora_B.dtype, grad_y.dtype),
        )  # fmt: skip
        if need_x:
            grad_x = _qlinear_with_lora(grad_y, w, False, grad_t, lora_A, None, 1.0, dropout_p, seed)
        if need_A:
            grad_A = _reduce_rows(
                x, grad_t, dropout_p, seed, with_colsum=False, out_dtype=lora_A.dtype, transposed=True
            )[0]
        grad_B = grad_B if need_B else None
        grad_bias = grad_bias if need_bias else None
    return grad_x, grad_A, grad_B, grad_bias
