"""The Triton backend: three kernels cover the whole fused LoRA linear, forward and backward.

Read top to bottom: the Philox dropout helper, the three ``@triton.jit`` kernels, the tile configs, the
launchers, then :func:`lora_forward` / :func:`lora_backward` (the backend interface of
:mod:`lora_kernels.ops`).

==========================  ===============================================  ==============================
kernel                      computes                                         used for
==========================  ===============================================  ==============================
``_lora_linear_kernel``     ``out = a·b + [mask ⊙] (s·t·u) + bias``           ``y`` (forward), ``dX``
                            (GEMM; the LoRA term added to the fp32
                            accumulator in the epilogue, one store)
``_lora_project_kernel``    ``out = s·dropout(a)·b`` with ``b`` r columns    ``t`` (forward), ``s·dY·B``
                                                                             when dB is not needed or r > 16
``_lora_reduce_rows_kernel````out = dropout(a)ᵀ·c``, ``colsum = Σ_rows a``     ``dB`` + ``dbias`` (+ ``s·dY·B``:
                            (reduction over the M rows, split in fixed       one pass over dY), ``dA``
                            chunks and summed in a fixed order); optionally
                            ``s·a·b`` from the same tiles
==========================  ===============================================  ==============================

No M×N temporary is written: the LoRA term lives only in registers. The dropout mask is regenerated from
``(seed, row, col)`` wherever it is needed (forward projection, ``dA``, ``dX`` epilogue) and never stored;
the seed is read by each program from the int64 seed tensor (``seed_ptr``), never passed as a number, so
a CUDA graph replays with the seed drawn on the device at that replay.
All offsets are int64, so tensors over 2**31 elements do not wrap.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import dropout
from ..dispatch import interpreting
from ..dropout import dropout_threshold, seed_tensor
from . import _NO_GUARD, DoRANeedsGrad, LoRAParams, NeedsGrad, device_guard, seed_on
from .triton_interpreter import fix_interpreter

# Globals read inside @triton.jit functions must be constexpr.
_PHILOX_ROUNDS = tl.constexpr(dropout.PHILOX_ROUNDS)
_PHILOX_MUL_0 = tl.constexpr(dropout.PHILOX_MUL_0)
_PHILOX_MUL_1 = tl.constexpr(dropout.PHILOX_MUL_1)
_PHILOX_KEY_BUMP_0 = tl.constexpr(dropout.PHILOX_KEY_BUMP_0)
_PHILOX_KEY_BUMP_1 = tl.constexpr(dropout.PHILOX_KEY_BUMP_1)


@triton.jit
def _philox_words(rows, groups, seed_lo, seed_hi):
    """The four Philox-4x32-10 output words for counters ``(groups, rows_lo, rows_hi, 0)`` (broadcast).

    The seed words arrive as int64 holding the key's 32 bits (:func:`_load_seed`), so the key is the same
    as :func:`lora_kernels.dropout.split_seed`'s.
    """
    c0 = (groups + rows * 0).to(tl.uint32)
    c1 = (rows + groups * 0).to(tl.uint32)
    c2 = ((rows + groups * 0) >> 32).to(tl.uint32)
    c3 = c0 * 0
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(_PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, _PHILOX_MUL_0)
        lo0 = c0 * _PHILOX_MUL_0
        hi1 = tl.umulhi(c2, _PHILOX_MUL_1)
        lo1 = c2 * _PHILOX_MUL_1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_KEY_BUMP_0
        k1 = k1 + _PHILOX_KEY_BUMP_1
    return c0, c1, c2, c3


@triton.jit
def _load_seed(seed_ptr):
    """The two 32-bit key words (low, high) of the int64 seed at ``seed_ptr`` (a device tensor)."""
    seed = tl.load(seed_ptr)
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


@triton.jit
def _dropout_keep_tile(row_offs, col_start, BLOCK_COLS: tl.constexpr, seed_lo, seed_hi, threshold):
    """Boolean ``(rows, BLOCK_COLS)`` keep-mask of the shared scheme (lora_kernels/dropout.py) for the rows
    ``row_offs`` and the columns ``col_start + [0, BLOCK_COLS)``, from one Philox call per 8 columns.

    Philox runs on the ``(rows, BLOCK_COLS // 8)`` counters ``(col_start // 8 + g, row)``; its four words
    give eight 16-bit values, element ``j = col % 8`` taking word ``j // 2``, low half for even ``j``. The
    caller's tiles start at multiples of their width (a power of two >= 16), so a group of 8 columns never
    straddles two tiles and ``col_start // 8 + g`` is the group of columns ``col_start + 8g ..``.
    """
    tl.static_assert(BLOCK_COLS >= 8, "a dropout tile holds whole groups of 8 columns")
    tl.static_assert(BLOCK_COLS % 8 == 0, "a dropout tile holds whole groups of 8 columns")
    groups = col_start // 8 + tl.arange(0, BLOCK_COLS // 8)
    w0, w1, w2, w3 = _philox_words(row_offs[:, None], groups[None, :], seed_lo, seed_hi)
    # tl.join appends a last axis of 2, so the last join is the fastest index of the flattened group: join
    # word w with word w + 2 (q), then word 0 with word 1 (w), then the low half with the high one (h), and
    # (rows, G, q, w, h) read row-major is j = 4q + 2w + h = 2·word + half, the order of the spec.
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    values = tl.reshape(tl.join(lo, hi), (row_offs.shape[0], BLOCK_COLS))
    return values.to(tl.int32) >= threshold


@triton.jit
def _dropout_keep_tile_t(row_offs, col_start, BLOCK_COLS: tl.constexpr, seed_lo, seed_hi, threshold):
    """:func:`_dropout_keep_tile` transposed: the ``(BLOCK_COLS, rows)`` mask, for a tile read as xᵀ."""
    return tl.trans(_dropout_keep_tile(row_offs, col_start, BLOCK_COLS, seed_lo, seed_hi, threshold))


@triton.jit
def _seed_words(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """:func:`_load_seed` with dropout; without it ``(0, 0)`` and nothing read (``seed_ptr`` is a dummy)."""
    if HAS_DROPOUT:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo = 0
        seed_hi = 0
    return seed_lo, seed_hi


@triton.jit
def _masked_add(
    acc, lora, offs_m, col_start, WIDTH: tl.constexpr, seed_lo, seed_hi, dropout_threshold, dropout_scale
):
    """``acc + mask ⊙ lora / (1 − p)`` on the tile of rows ``offs_m`` and columns ``col_start + [0, WIDTH)``:
    a product, not a select, so that NaN·0 stays NaN (the seed's words from :func:`_seed_words`)."""
    keep = _dropout_keep_tile(offs_m, col_start, WIDTH, seed_lo, seed_hi, dropout_threshold)
    return acc + lora * (keep.to(tl.float32) * dropout_scale)


@triton.jit
def _add_lora(
    acc, t_op, u_op, offs_m, col_start, seed_lo, seed_hi, dropout_threshold, dropout_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """``acc + [mask ⊙] t_op·u_op`` for the ``WIDTH`` output columns from ``col_start``, fp32: the LoRA
    epilogue of every GEMM here (``t_op``, ``u_op`` from :func:`_epilogue_operands` or its equivalent)."""
    if HAS_DROPOUT:
        lora = tl.dot(t_op, u_op, input_precision=INPUT_PRECISION)
        acc = _masked_add(
            acc, lora, offs_m, col_start, WIDTH, seed_lo, seed_hi, dropout_threshold, dropout_scale
        )
    else:
        acc = tl.dot(t_op, u_op, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _store_with_bias(
    acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_bias, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Store the fp32 tile ``acc`` (+ the bias, of any stride, 0 included: an expanded scalar) in ``out``'s
    dtype: the one cast of a GEMM's epilogue."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile ``tile_id`` in grouped order (Triton tutorial 03), so that
    neighbouring programs share tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile(start, BLOCK: tl.constexpr, end):
    """The indices ``start + [0, BLOCK)`` of one tile along a dimension, and which of them are ``< end``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < end


@triton.jit
def _epilogue_operands(
    t, u_ptr, offs_r, mask_r, offs_n, mask_n, stride_ur, stride_un, lora_scale, in_dtype: tl.constexpr,
    LORA_FP32: tl.constexpr,
):  # fmt: skip
    """The operands of the epilogue's product ``(lora_scale·t)·u``: ``t`` the (M, R) fp32 tile, ``u`` loaded
    (R, N), both in ``in_dtype`` or, with ``LORA_FP32``, fp32 (see :func:`_lora_linear_kernel`)."""
    u = tl.load(
        u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    if LORA_FP32:  # (one return: the compiler wants one type per return, even in a dead branch)
        t_op = t * lora_scale
        u_op = u.to(tl.float32)
    else:
        t_op = (t * lora_scale).to(in_dtype)
        u_op = u.to(in_dtype)
    return t_op, u_op


@triton.jit(do_not_specialize=["dropout_threshold", "col_offset"])
def _lora_linear_kernel(
    a_ptr, b_ptr, t_ptr, u_ptr, p_ptr, bias_ptr, out_ptr, a2_ptr, a_scale_ptr, out_scale_ptr, z_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_tm, stride_tr, stride_ur, stride_un, stride_pk, stride_pr,
    stride_bias, stride_om, stride_on, stride_a2m, stride_a2k,
    project_scale, lora_scale, seed_ptr, dropout_threshold, dropout_scale, col_offset,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_PROJECT: tl.constexpr,
    LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SCALE_A: tl.constexpr, SECOND: tl.constexpr, DORA_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = a[M, K]·b[K, N] + mask ⊙ (lora_scale·t[M, R]·u[R, N]) + bias[N]``, fp32 accumulation,
    one store.

    Forward: ``a = x``, ``b = Wᵀ``, ``t = dropout(x)·Aᵀ``, ``u = Bᵀ``, ``lora_scale = s``, bias, no mask.
    dX:      ``a = dY``, ``b = W``, ``t = s·dY·B``, ``u = A``, ``lora_scale = 1``, no bias, the dropout mask
    of x.

    With ``FUSE_PROJECT`` the kernel computes ``t = project_scale · a·p`` itself in the main loop, from the
    ``a`` tiles it loads anyway (``p`` is ``Aᵀ`` or ``B``, K×R; no dropout on ``a``), and the programs of
    the first column of tiles store it to ``t_ptr`` for the backward: no separate pass over ``a``, at the
    price of R/BLOCK_N more MMA work.

    The epilogue product takes ``lora_scale·t`` (fp32) as its left operand. In bf16 (fp32's range) and fp32
    it is cast to the input dtype as the main loop's operands are; in fp16 (``LORA_FP32``) it would overflow
    where ``s·t`` exceeds 65504 (a large rsLoRA scaling; PEFT, which multiplies by ``s`` last, stays finite),
    so both operands stay fp32 and the product runs in TF32: fp16's 10-bit mantissa with fp32's range.

    DoRA (``v = a_scale``, a K-vector, fp32; ``c = out_scale``, an N-vector, fp32):

    * ``SCALE_A``: the main product takes ``a ⊙ v`` (columns of ``a`` scaled; dX: ``(dY ⊙ c)·W``).
    * ``SECOND``: a second accumulator on the same ``b`` tiles (``b`` read once for both):
      1: ``a2·b`` (forward with dropout: ``a2 = x̃``, the dropped input); 2: ``(a ⊙ v)·b`` (dX with
      dropout: ``v = c − 1``). With ``HAS_DROPOUT`` the masked LoRA term is ``mask ⊙ (acc2 + t·u)``.
    * ``DORA_OUT`` (forward): ``z = acc_z + lora_scale·t·u`` is stored to ``z_ptr`` (``acc_z`` is the second
      accumulator with ``SECOND == 1``, else the main one) and ``out = acc − acc_z + c ⊙ z + bias``.
    """
    # Grouped ordering of the output tiles (Triton tutorial 03) so neighbouring programs share L2 tiles.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m, mask_m = _tile(pid_m.to(tl.int64) * BLOCK_M, BLOCK_M, M)
    offs_n, mask_n = _tile(pid_n.to(tl.int64) * BLOCK_N, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    offs_r, mask_r = _tile(0, BLOCK_R, R)
    in_dtype = a_ptr.dtype.element_ty
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    p_ptrs = p_ptr + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr

    a2_ptrs = a2_ptr + offs_m[:, None] * stride_a2m + offs_k[None, :] * stride_a2k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if SCALE_A or SECOND == 2:
            v = tl.load(a_scale_ptr + k * BLOCK_K + offs_k, mask=offs_k < k_left, other=0.0)
            a_scaled = (a.to(tl.float32) * v[None, :]).to(in_dtype)
        if SECOND == 1:
            a2 = tl.load(a2_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            acc2 = tl.dot(a2, b, acc2, input_precision=INPUT_PRECISION)
            a2_ptrs += BLOCK_K * stride_a2k
        elif SECOND == 2:
            acc2 = tl.dot(a_scaled, b, acc2, input_precision=INPUT_PRECISION)
        if SCALE_A:
            acc = tl.dot(a_scaled, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if FUSE_PROJECT:
            p = tl.load(p_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            t_acc = tl.dot(a, p.to(in_dtype), t_acc, input_precision=INPUT_PRECISION)
            p_ptrs += BLOCK_K * stride_pk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue: the LoRA term, added while the accumulator is still fp32.
    if FUSE_PROJECT:
        # the rank's padded lanes hold a·0, NaN where a holds ±inf: zero them before t meets u
        t = tl.where(mask_r[None, :], t_acc * project_scale, 0.0)
        if pid_n == 0:
            tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])
    else:
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    t_op, u_op = _epilogue_operands(
        t, u_ptr, offs_r, mask_r, offs_n, mask_n, stride_ur, stride_un, lora_scale, in_dtype, LORA_FP32
    )
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if DORA_OUT:
        if SECOND == 1:  # z = x̃·Wᵀ + s·t·Bᵀ; out = x·Wᵀ − x̃·Wᵀ + c ⊙ z
            z = tl.dot(t_op, u_op, acc2, input_precision=INPUT_PRECISION)
            acc = acc - acc2
        else:  # z = x·Wᵀ + s·t·Bᵀ; out = c ⊙ z
            z = tl.dot(t_op, u_op, acc, input_precision=INPUT_PRECISION)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        z_ptrs = z_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask_mn)
        col_scale = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc += z * col_scale[None, :]
    else:
        seed_lo, seed_hi = _seed_words(seed_ptr, HAS_DROPOUT)
        col_start = pid_n.to(tl.int64) * BLOCK_N + col_offset  # the mask's columns: x's global ones
        if HAS_DROPOUT and SECOND == 2:  # the masked term is s·t·Bᵀ plus the second accumulator
            lora = tl.dot(t_op, u_op, acc2, input_precision=INPUT_PRECISION)
            acc = _masked_add(
                acc, lora, offs_m, col_start, BLOCK_N, seed_lo, seed_hi, dropout_threshold, dropout_scale
            )
        else:
            acc = _add_lora(acc, t_op, u_op, offs_m, col_start, seed_lo, seed_hi, dropout_threshold,
                            dropout_scale, HAS_DROPOUT, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    _store_with_bias(
        acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_bias, stride_om, stride_on, HAS_BIAS
    )


@triton.jit(do_not_specialize=["dropout_threshold", "col_offset"])
def _lora_project_kernel(
    a_ptr, b_ptr, out_ptr, dropped_ptr,
    M, K, R,
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    scale, seed_ptr, dropout_threshold, dropout_scale, col_offset,
    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``out[M, R] = scale · dropout(a)[M, K] · b[K, R]`` in fp32 (R ≤ 256: the skinny side of LoRA).

    Forward: ``a = x``, ``b = Aᵀ`` gives ``t``. Backward: ``a = dY``, ``b = B`` gives ``s·dY·B``.
    ``scale`` already holds the dropout's ``1 / (1 - p)``.

    DoRA's forward with dropout: ``STORE_DROPPED`` also stores ``dropped = dropout(a)`` (``a.dtype``,
    contiguous (M, K)), the second operand of its GEMM, freed after the forward.
    """
    pid_m = tl.program_id(0)
    offs_m, mask_m = _tile(pid_m.to(tl.int64) * BLOCK_M, BLOCK_M, M)
    offs_r, mask_r = _tile(0, BLOCK_R, R)
    in_dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:  # read once per program
        seed_lo, seed_hi = _load_seed(seed_ptr)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k, mask_k = _tile(k * BLOCK_K, BLOCK_K, K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(
                offs_m, col_offset + k * BLOCK_K, BLOCK_K, seed_lo, seed_hi, dropout_threshold
            )
            a = a * keep.to(a.dtype)  # multiply as x·mask does, so a dropped NaN still propagates
        if STORE_DROPPED:
            tl.store(
                dropped_ptr + offs_m[:, None] * K + offs_k[None, :],
                (a * dropout_scale).to(a.dtype),
                mask=mask_m[:, None] & mask_k[None, :],
            )
        b = tl.load(
            b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_r[None, :] * stride_br,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b.to(in_dtype), acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc * scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["dropout_threshold", "col_offset"])
def _lora_reduce_rows_kernel(
    a_ptr, c_ptr, out_ptr, colsum_ptr, z_ptr, prodsum_ptr, b_ptr, proj_ptr,
    M, P, R, rows_per_split,
    stride_am, stride_ap, stride_cm, stride_cr, stride_zm, stride_zp, stride_bp, stride_br,
    stride_op, stride_or,
    scale, seed_ptr, dropout_threshold, col_offset,
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, HAS_PRODSUM: tl.constexpr, PROJECT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial sums over one chunk of rows: ``out[split, P, R] = scale · dropout(a)ᵀ · c``, fp32.

    ``colsum[split, P] = Σ_rows a`` rides along on the same loads. The host sums the splits in a fixed
    order, so the result is deterministic (no atomics). With one split, ``out`` (strides ``stride_op``,
    ``stride_or``: e.g. dA stored straight as (R, P)) and ``colsum`` are the final results, stored in their
    own dtype (the cast to the adapters' / dY's dtype done in registers, not by a separate launch).
    dB + dbias: ``a = dY``, ``c = t``. dA (transposed): ``a = x`` with its dropout, ``c = s·dY·B``.
    DoRA's ``dm`` rides along too: ``HAS_PRODSUM`` stores ``prodsum[split, P] = Σ_rows a ⊙ z`` (``z`` (M, P)).

    ``PROJECT`` (the backward's single pass over dY, no dropout): ``s·dY·B`` rides along as well. Each tile
    of ``a`` also gives ``scale · a[rows, cols]·b[cols, R]``, this program's columns' share of the
    projection, stored to ``proj[pid_p, rows, R]`` (``b`` (P, R); ``proj`` contiguous (column blocks, M,
    R)); the host sums the column blocks in a fixed order.
    """
    pid_p = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_p, mask_p = _tile(pid_p.to(tl.int64) * BLOCK_P, BLOCK_P, P)
    offs_r, mask_r = _tile(0, BLOCK_R, R)
    in_dtype = a_ptr.dtype.element_ty
    row_start = pid_split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    if PROJECT:  # this program's rows of b, read once
        b = tl.load(
            b_ptr + offs_p[:, None] * stride_bp + offs_r[None, :] * stride_br,
            mask=mask_p[:, None] & mask_r[None, :],
            other=0.0,
        ).to(in_dtype)
        proj_ptr += pid_p.to(tl.int64) * M * R

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:  # read once per program
        seed_lo, seed_hi = _load_seed(seed_ptr)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    prodsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m in range(0, tl.cdiv(rows_per_split, BLOCK_M)):
        offs_m, mask_m = _tile(row_start + m * BLOCK_M, BLOCK_M, row_end)
        a_t = tl.load(  # the (P, M) transpose of a's tile, read straight from a's strides
            a_ptr + offs_p[:, None] * stride_ap + offs_m[None, :] * stride_am,
            mask=mask_p[:, None] & mask_m[None, :],
            other=0.0,
        )
        if HAS_COLSUM:
            colsum += tl.sum(a_t.to(tl.float32), axis=1)
        if HAS_PRODSUM:
            z_t = tl.load(
                z_ptr + offs_p[:, None] * stride_zp + offs_m[None, :] * stride_zm,
                mask=mask_p[:, None] & mask_m[None, :],
                other=0.0,
            )
            prodsum += tl.sum(a_t.to(tl.float32) * z_t.to(tl.float32), axis=1)
        if PROJECT:
            proj = tl.dot(tl.trans(a_t), b, input_precision=INPUT_PRECISION)
            tl.store(
                proj_ptr + offs_m[:, None] * R + offs_r[None, :],
                proj * scale,
                mask=mask_m[:, None] & mask_r[None, :],
            )
        if HAS_DROPOUT:
            col_start = col_offset + pid_p.to(tl.int64) * BLOCK_P  # the mask's columns: x's global ones
            keep = _dropout_keep_tile_t(offs_m, col_start, BLOCK_P, seed_lo, seed_hi, dropout_threshold)
            a_t = a_t * keep.to(a_t.dtype)
        c = tl.load(
            c_ptr + offs_m[:, None] * stride_cm + offs_r[None, :] * stride_cr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = tl.dot(a_t, c.to(in_dtype), acc, input_precision=INPUT_PRECISION)

    out_ptrs = (
        out_ptr + pid_split.to(tl.int64) * P * R + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
    )
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])
    if HAS_COLSUM:
        colsum_ptrs = colsum_ptr + pid_split.to(tl.int64) * P + offs_p
        tl.store(colsum_ptrs, colsum.to(colsum_ptr.dtype.element_ty), mask=mask_p)
    if HAS_PRODSUM:
        tl.store(prodsum_ptr + pid_split.to(tl.int64) * P + offs_p, prodsum, mask=mask_p)


@triton.jit
def _sum_parts_segment(src_ptr, dst_ptr, n, parts, block, BLOCK: tl.constexpr):
    """Elements ``block·BLOCK + [0, BLOCK)`` of one :func:`_sum_parts_kernel` segment: ``dst[i] = Σ_s
    src[s, i]``, the ``parts`` fp32 slices of ``n`` elements summed in order, cast to ``dst``'s dtype
    (both contiguous)."""
    offs, mask = _tile(block.to(tl.int64) * BLOCK, BLOCK, n)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    src = src_ptr + offs
    for _ in range(0, parts):
        acc += tl.load(src, mask=mask, other=0.0)
        src += n
    tl.store(dst_ptr + offs, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_parts_kernel(
    src0, dst0, n0, parts0, end0, src1, dst1, n1, parts1, end1,
    src2, dst2, n2, parts2, end2, src3, dst3, n3, parts3,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The finalize step of :func:`_lora_reduce_rows_kernel` (:func:`_sum_parts`): up to four partial-sum
    buffers summed over their first axis and cast into their results, in one launch. Segment ``k`` has the
    programs from ``end(k-1)`` to ``end(k)``; a segment without blocks is never entered."""
    pid = tl.program_id(0)
    if pid < end0:
        _sum_parts_segment(src0, dst0, n0, parts0, pid, BLOCK)
    elif pid < end1:
        _sum_parts_segment(src1, dst1, n1, parts1, pid - end0, BLOCK)
    elif pid < end2:
        _sum_parts_segment(src2, dst2, n2, parts2, pid - end1, BLOCK)
    else:
        _sum_parts_segment(src3, dst3, n3, parts3, pid - end2, BLOCK)


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """DoRA's norm: ``out[N] = ‖w + scale·b·a‖`` per row, ``w`` (N, K), ``a`` (R, K), ``b`` (N, R), fp32.

    Each program reads its rows of ``w`` once and forms ``w + scale·b·a`` tile by tile in registers (an
    IEEE fp32 product: the adapters' precision, as PEFT's ``B @ A``), so the norm is the direct one.
    """
    pid = tl.program_id(0)
    offs_n, mask_n = _tile(pid.to(tl.int64) * BLOCK_N, BLOCK_N, N)
    offs_r, mask_r = _tile(0, BLOCK_R, R)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_r[None, :],
        other=0.0,
    ).to(tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k, mask_k = _tile(k * BLOCK_K, BLOCK_K, K)
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        v = w + scale * tl.dot(b, a, input_precision="ieee")
        sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt(sq), mask=mask_n)


# --------------------------------------------------------------------------------------------------
# Tile configs: chosen by a function of the shape (no runtime autotuning), one config under the
# interpreter, where the cost grows with programs × loop trips and big blocks are cheapest.
# --------------------------------------------------------------------------------------------------


# Triton's interpreter patches triton.language globally while it runs a kernel, so two threads interpreting at
# once break each other; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch_guard() -> contextlib.AbstractContextManager:
    if interpreting():
        fix_interpreter()
        return _INTERPRETER_LOCK
    return _NO_GUARD


def _cdiv(a: int, b: int) -> int:
    # Plain Python: triton.cdiv / triton.next_power_of_2 are constexpr functions, ~1 µs a host call.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, _next_power_of_2(n)))


def _block_r(r: int) -> int:
    return max(16, _next_power_of_2(r))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The compiled configs below were chosen from the sweep of benchmarks/gpu_run.sh on an H200 (bf16, r = 16,
# benchmarks/results/h200/, benchmarks/NOTES.md); shapes and dtypes the sweep did not cover keep the
# Triton-tutorial defaults they had before.


def _linear_config(M: int, N: int, K: int, element_size: int, two_acc: bool = False) -> dict:
    """Preferred tile config for :func:`_lora_linear_kernel` (GEMM + LoRA epilogue); ``two_acc``: DoRA's
    variants with dropout, whose second accumulator (``SECOND``) doubles the fp32 tile in registers."""
    if interpreting():
        return dict(
            BLOCK_M=_pow2_clamp(M, 16, 128),
            BLOCK_N=_pow2_clamp(N, 16, 128),
            BLOCK_K=_pow2_clamp(K, 16, 128),
            GROUP_M=1,
            num_warps=4,
            num_stages=1,
        )
    half = element_size <= 2
    if M <= 64:  # decode-sized batches: the weight read dominates; narrow N tiles fill more SMs
        if half:  # H200, M = 16: 0.079 ms against 0.092 for 16x128x128 (both bound by the launch)
            return dict(
                BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3
            )
        return dict(
            BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=128, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=4
        )
    if half and two_acc:  # not timed yet; ptxas (sm_90, triton 3.6, tools/kernel_static_cost.py): at 128x256
        # these spill 2.3-4.2 KB a thread, at 128x128 at most 16 bytes (benchmarks/NOTES.md, "DoRA")
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if half:  # H200, 4096x4096, M = 8192: 0.415 ms against 0.499 for 128x128x64 (F.linear: 0.349)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def _skinny_config(rows: int, inner: int, r: int) -> dict:
    """Preferred tile config for the skinny projection :func:`_lora_project_kernel` (``r`` columns)."""
    block_r = _block_r(r)
    if interpreting():
        return dict(BLOCK_M=_pow2_clamp(rows, 16, 128), BLOCK_K=_pow2_clamp(inner, 16, 128),
                    BLOCK_R=block_r, num_warps=4, num_stages=1)  # fmt: skip
    if block_r <= 64:  # H200, x 8192x4096, r = 16: 0.028 ms (cuBLAS x·Aᵀ: 0.027) against 0.041 for 64x64
        return dict(BLOCK_M=32, BLOCK_K=128, BLOCK_R=block_r, num_warps=4, num_stages=4)
    return dict(BLOCK_M=32, BLOCK_K=64, BLOCK_R=block_r, num_warps=4, num_stages=3)


def _reduce_config(rows: int, cols: int, r: int, project: bool = False) -> dict:
    """Preferred tile config for the row reduction :func:`_lora_reduce_rows_kernel` (``cols`` = P); ``project``:
    its ``PROJECT`` variant, the backward's single pass over dY (r <= 16, :func:`_single_pass_over_dy`)."""
    block_r = _block_r(r)
    if interpreting():
        return dict(BLOCK_M=_pow2_clamp(rows, 16, 128), BLOCK_P=_pow2_clamp(cols, 16, 128),
                    BLOCK_R=block_r, num_warps=4, num_stages=1)  # fmt: skip
    if project and rows <= 64:  # decode-sized: the bytes are few, narrow column blocks give more programs
        return dict(BLOCK_M=_pow2_clamp(rows, 16, 64), BLOCK_P=64, BLOCK_R=block_r, num_warps=4, num_stages=3)
    if project:  # not timed yet. Wide column blocks: the projection's workspace has one (M, r) fp32 slice
        # per block of BLOCK_P columns (8192x4096, r = 16: 16 blocks, 8 MiB; see _reduce_rows)
        return dict(BLOCK_M=64, BLOCK_P=256, BLOCK_R=block_r, num_warps=8, num_stages=3)
    if block_r <= 64:  # H200, dB of dY 8192x4096, r = 16: 0.043 ms against 0.058 for 64x64
        return dict(BLOCK_M=128, BLOCK_P=64, BLOCK_R=block_r, num_warps=4, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_P=64, BLOCK_R=block_r, num_warps=4, num_stages=3)


def _smaller_configs(cfg: dict, shrinkable: tuple[str, ...]) -> list[dict]:
    """``cfg`` then ever smaller variants: fewer pipeline stages first, then halved tiles (down to 16).

    Large ranks (the epilogue holds r-wide tiles) and fp32 can exceed a GPU's shared memory with the
    preferred config, e.g. the 99 KiB of sm_86/sm_89; :func:`_launch` walks this list until one fits.
    """
    configs = [cfg]
    while True:
        last = dict(configs[-1])
        if last.get("num_stages", 1) > 2:
            last["num_stages"] -= 1
        else:
            name = max((k for k in shrinkable if last[k] > 16), key=lambda k: last[k], default=None)
            if name is None:
                return configs
            last[name] //= 2
        configs.append(last)


class _Configs(list):
    """A :func:`_smaller_configs` list that carries its preferred config as a hashable key, made once."""

    __slots__ = ("key",)

    def __init__(self, configs: list[dict]):
        super().__init__(configs)
        self.key = tuple(sorted(configs[0].items()))


# The first config that fitted, per kernel and compile-time signature, so the search runs once. Empty unless
# a preferred config did not fit (large ranks or fp32 on a GPU with little shared memory): only then does a
# launch build its key.
_FITTING_CONFIG: dict[tuple, int] = {}


def _fitting_key(kernel, configs: list[dict], args: tuple, constexprs: dict) -> tuple:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    preferred = configs.key if isinstance(configs, _Configs) else tuple(sorted(configs[0].items()))
    return (getattr(kernel, "__name__", None) or repr(kernel), tensors[0].device, *constexprs.items(),
            *(t.dtype for t in tensors), preferred)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Direct launch (issue 19): the first launch of a kernel with a given specialization goes through
# ``kernel[grid]`` (JITFunction.run: binding, specialization of every argument, knobs, cache lookup, global
# checks, launch metadata); it returns the compiled kernel, and later launches with that specialization
# call its launcher directly. The key holds everything Triton specializes on, at least as finely
# (tests/test_triton_launch.py checks it against Triton's own binder on 3.6 and 3.8). Under the interpreter,
# with launch hooks, pre-run hooks, a changed global, another backend than CUDA or anything the key does not
# model, launches take ``kernel[grid]``. ``LORA_KERNELS_DIRECT_LAUNCH=0`` turns it off (read when a key is
# first seen); so does any error of a first direct launch (with one warning).
# --------------------------------------------------------------------------------------------------

_DIRECT_LAUNCH_ENV = "LORA_KERNELS_DIRECT_LAUNCH"
_MISSING = object()
# Constexpr and option values whose str() (Triton's cache key) is fixed by their type and equality; floats
# are not (0.0 == -0.0), nor are other objects: a key with one never launches directly.
_PLAIN_TYPES = frozenset((int, bool, str, type(None)))


class _DirectState:
    """Module state: ``off`` (the direct path disabled for good), the driver's device and stream queries and
    Triton's knobs, looked up at the first compiled launch (never at import)."""

    off = False
    ready = False
    get_device = get_stream = runtime = compilation = hook_chain = None


def _init_direct() -> bool:
    """Look up what direct launches need; ``False`` (and off for good) where this Triton lacks any of it."""
    try:
        from triton import knobs
        from triton.runtime import driver

        active, runtime = driver.active, knobs.runtime
        get_device, get_stream = active.get_current_device, active.get_current_stream
        if not hasattr(runtime, "launch_enter_hook") or not hasattr(runtime, "launch_exit_hook"):
            raise AttributeError("launch hooks")
    except Exception:  # an older or other Triton: keep kernel[grid]
        _DirectState.off = True
        return False
    _DirectState.get_device, _DirectState.get_stream = get_device, get_stream
    _DirectState.runtime, _DirectState.compilation = runtime, knobs.compilation
    _DirectState.hook_chain = getattr(knobs, "HookChain", None)
    _DirectState.ready = True
    return True


def _arg_key(a) -> object:
    """What Triton's specialization reads of a positional argument (native_specialize_impl, 3.6 and 3.8): an
    int's ``== 1``, ``% 16 == 0`` and whether it fits int32 / int64 (2, True or False inside int32, a pair
    outside: never equal to one another); a tensor's dtype and whether its address is a multiple of 16; a
    float, bool or None's type. Raises TypeError for anything else."""
    cls = a.__class__
    if cls is int:
        if -0x80000000 <= a <= 0x7FFFFFFF:
            return 2 if a == 1 else not a & 15
        return (not a & 15, -(1 << 63) <= a < (1 << 63))
    if cls is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    if cls is float or cls is bool or a is None:
        return cls
    raise TypeError(f"no direct-launch key for a {cls.__name__}")


def _direct_key(kernel, device, args: tuple, constexprs: dict, cfg: dict) -> tuple:
    """The direct-launch key: the kernel, the device, the options JITFunction.run adds (debug, instrumentation
    mode), each positional argument's :func:`_arg_key`, and the constexprs and config values with their types
    (True == 1 == 1.0 as keys, not in Triton's). Raises TypeError where it cannot be formed."""
    return (
        id(kernel), device, getattr(kernel, "debug", None), _DirectState.runtime.debug,
        getattr(_DirectState.compilation, "instrumentation_mode", None), tuple(map(_arg_key, args)),
        tuple(constexprs.items()), tuple(map(type, constexprs.values())),
        tuple(cfg.items()), tuple(map(type, cfg.values())),
    )  # fmt: skip


class _Direct:
    """A compiled kernel launched directly: its launcher, function handle and packed metadata; ``tail``, the
    arguments JITFunction.run passes after the positional ones (constexprs and defaults, in the signature's
    order, from Triton's own binder); ``globals``, the global values it was compiled with; ``tried``, whether a
    direct launch already succeeded."""

    __slots__ = ("compiled", "function", "globals", "kernel", "packed", "run", "tail", "tried")

    def __init__(self, kernel, compiled, tail: tuple, pinned: tuple):
        self.kernel, self.compiled, self.tail, self.globals = kernel, compiled, tail, pinned
        self.tried = False
        self.run, self.function, self.packed = compiled.run, compiled.function, compiled.packed_metadata


# Per direct-launch key: a :class:`_Direct`, or None where that key always takes kernel[grid]. Bounded like
# the plans (cleared when full; a cleared key takes kernel[grid] once more).
_DIRECT: dict[tuple, _Direct | None] = {}
_MAX_DIRECT = 4096


def _make_direct(kernel, device, compiled, args: tuple, constexprs: dict, cfg: dict) -> _Direct | None:
    """The :class:`_Direct` for what ``kernel[grid](*args, **constexprs, **cfg)`` just compiled and launched
    (``compiled``, its return value), or None where a direct launch could differ from it in any way."""
    if os.environ.get(_DIRECT_LAUNCH_ENV, "1") == "0":
        _DirectState.off = True
        return None
    run, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
    packed = getattr(compiled, "packed_metadata", None)
    if run is None or function is None or packed is None:  # not a loaded CompiledKernel
        return None
    if any(type(v) not in _PLAIN_TYPES for v in (*constexprs.values(), *cfg.values())):
        return None
    params, caches = getattr(kernel, "params", None), getattr(kernel, "device_caches", None)
    if params is None or caches is None or device not in caches or len(args) > len(params):
        return None
    if not isinstance(getattr(kernel, "pre_run_hooks", None), list):
        return None
    if any(p.is_constexpr for p in params[: len(args)]):  # Triton keys those on their value, the key does not
        return None
    _, _, target, _, binder = caches[device]
    if getattr(target, "backend", None) != "cuda":  # other backends' specialization is not modelled
        return None
    bound = tuple(binder(*args, **constexprs, **cfg)[0].values())  # what run passes to the launcher
    if len(bound) < len(args) or any(b is not a for a, b in zip(args, bound[: len(args)], strict=True)):
        return None
    pinned = []
    for (name, _), (value, namespace) in getattr(kernel, "used_global_vals", {}).items():
        current = namespace.get(name, _MISSING)
        if current is _MISSING or current != value:  # run raises here: let it, on the slow path
            return None
        pinned.append((namespace, name, current))
    return _Direct(kernel, compiled, bound[len(args) :], tuple(pinned))


def _quiet(kernel, entry: _Direct) -> bool:
    """Whether JITFunction.run would launch ``entry`` as a direct launch does: no launch hook (an empty
    HookChain calls nothing), no pipeline-inspection or pre-run hook, the kernel's globals unchanged."""
    runtime, chain = _DirectState.runtime, _DirectState.hook_chain
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not (enter is None or (type(enter) is chain and not enter.calls)):
        return False
    if not (leave is None or (type(leave) is chain and not leave.calls)):
        return False
    if getattr(runtime, "add_stages_inspection_hook", None) is not None or kernel.pre_run_hooks:
        return False
    return all(namespace.get(name, _MISSING) is value for namespace, name, value in entry.globals)


def _disable_direct(err: Exception) -> None:
    _DirectState.off = True
    warnings.warn(
        f"lora_kernels: a direct launch of a compiled Triton kernel failed ({type(err).__name__}: {err}); "
        f"launching through kernel[grid] from now on (set {_DIRECT_LAUNCH_ENV}=0 to skip the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )


def _call_direct(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict) -> None:
    """:func:`_call_kernel` outside the interpreter: directly where :data:`_DIRECT` holds the key's compiled
    kernel, else through ``kernel[grid]`` (remembering its compiled kernel the first time a key is seen)."""
    if not _DirectState.ready and not _init_direct():
        kernel[grid](*args, **constexprs, **cfg)
        return
    device = _DirectState.get_device()  # per launch, as JITFunction.run does (and the stream below)
    try:
        key = _direct_key(kernel, device, args, constexprs, cfg)
        entry = _DIRECT.get(key, _MISSING)
    except TypeError:  # an argument the key does not model, or an unhashable value
        kernel[grid](*args, **constexprs, **cfg)
        return
    if entry is _MISSING:
        compiled = kernel[grid](*args, **constexprs, **cfg)  # raises OutOfResources before any entry exists
        if len(_DIRECT) >= _MAX_DIRECT:
            _DIRECT.clear()
        try:
            _DIRECT[key] = _make_direct(kernel, device, compiled, args, constexprs, cfg)
        except Exception:  # a Triton whose internals differ from 3.6 / 3.8's: this key keeps kernel[grid]
            _DIRECT[key] = None
        return
    if entry is None or type(grid) is not tuple or not _quiet(kernel, entry):
        kernel[grid](*args, **constexprs, **cfg)
        return
    n = len(grid)
    try:  # the launcher's arguments as JITFunction.run passes them, hooks and launch metadata None
        entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _DirectState.get_stream(device),
                  entry.function, entry.packed, None, None, None, *args, *entry.tail)  # fmt: skip
    except Exception as err:
        if entry.tried:  # it worked before: an error of this launch, as kernel[grid] would raise it
            raise
        # (a failed launch raises before the kernel runs; our kernels only store, so a retry is safe)
        _disable_direct(err)
        kernel[grid](*args, **constexprs, **cfg)
        return
    entry.tried = True


def _call_kernel(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict) -> None:
    """The one place where a launch reaches Triton (``tools/host_overhead.py`` stubs it out): through
    ``kernel[grid]``, or directly through the compiled kernel once a key has one (:func:`_call_direct`)."""
    if _DirectState.off or interpreting():
        kernel[grid](*args, **constexprs, **cfg)
    else:
        _call_direct(kernel, grid, args, constexprs, cfg)


def _launch(kernel, grid_of, configs: list[dict], args: tuple, constexprs: dict) -> dict:
    """Launch ``kernel`` with the first of ``configs`` that fits the GPU's resources; returns that config."""
    key = _fitting_key(kernel, configs, args, constexprs) if _FITTING_CONFIG else None
    start = _FITTING_CONFIG.get(key, 0) if key is not None else 0
    for index in range(start, len(configs)):
        cfg = configs[index]
        try:
            _call_kernel(kernel, grid_of(cfg), args, constexprs, cfg)
        except OutOfResources:  # raised when the kernel is loaded, before anything runs
            continue
        if index != start:
            _FITTING_CONFIG[key or _fitting_key(kernel, configs, args, constexprs)] = index
        return cfg
    name = getattr(kernel, "__name__", None) or repr(kernel)
    raise RuntimeError(f"no tile config of {name} fits this GPU's shared memory / registers: {configs}")


# Launch plans (config lists, grids, row splits) per shape, so a repeated shape costs a dict lookup. The key
# holds the config functions themselves, so replacing one (benchmarks and tests monkeypatch them) makes new
# plans; they must be pure functions of their arguments. Bounded (many distinct M with dynamic shapes): when
# full it starts over, which is atomic, so threads need no lock (at worst two build the same plan).
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


def _plan(key: tuple, make) -> tuple:
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _row_splits(M: int, num_blocks: int, block_m: int, device: torch.device) -> int:
    """How many chunks the row reduction splits M into, so that the grid fills the GPU (>= 4 row blocks each)."""
    if interpreting() or device.type != "cuda":
        return 1
    return max(1, min(_cdiv(M, block_m * 4), _cdiv(2 * _num_sms(device.index or 0), num_blocks)))


def _fuse_projection(M: int, N: int, K: int, r: int) -> bool:
    """Whether the forward GEMM computes ``t = x·Aᵀ`` in its own main loop instead of a separate kernel.

    Measured on an H200 (bf16, 4096x4096, r = 16; benchmarks/NOTES.md): the fused forward took 0.493 ms
    against 0.556 at M = 8192 and 0.054 against 0.095 at M = 16 (one launch less), so the forward fuses
    whenever it can (no dropout: the kernel's main loop reads ``x`` undropped). The same fusion in dX
    (``s·dY·B`` in the dX GEMM) was slower, 0.661 ms against 0.509, so the backward never fuses.
    """
    return True


def _single_pass_over_dy(r: int) -> bool:
    """Whether the backward takes ``s·dY·B`` from the pass over dY that gives dB and db (``PROJECT``)
    instead of a pass of its own. Not timed yet; predicted from the bytes (benchmarks/NOTES.md).

    The single pass saves one read of dY (64 MiB at 8192x4096 bf16) and writes its partial sums instead,
    read back once: 12.3 MiB at r = 16 (:func:`_reduce_rows`), twice that at r = 32 (48 MiB of traffic
    against 64), so only ranks up to 16 (BLOCK_R = 16) take it. With wider ranks, each pass reads dY once.
    """
    return r <= 16


# The C getter behind ``torch.backends.cuda.matmul.fp32_precision`` and ``torch.backends.fp32_precision``
# (torch >= 2.9): 0.1 µs a read where the attributes cost 0.8 µs (the Triton backend asks once per launch of
# an fp32 kernel). tests/test_host_path.py checks it answers as the attributes do.
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def _tf32_allowed() -> bool:
    """Whether torch's matmuls may use TF32 for float32, read as torch itself resolves it.

    torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee"; "none" inherits the global
    ``torch.backends.fp32_precision``, whose "none" means IEEE). Reading the legacy ``allow_tf32`` there
    raises once the new API has been used, so it is only the fallback for older torch.
    """
    if _fp32_precision is not None:
        precision = _fp32_precision("cuda", "matmul")
        return (_fp32_precision("generic", "all") if precision == "none" else precision) == "tf32"
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch itself would (:func:`_tf32_allowed`); fp16/bf16 ignore it."""
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _dropout_args(
    dropout_p: float, seed: torch.Tensor | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, int, float]:
    """``(seed_ptr, threshold, 1 / (1 - p))``: the int64 seed tensor on ``dummy``'s device (an int seed is
    made one); without dropout the pointer is ``dummy``, never read."""
    seed_ptr = dummy if dropout_p == 0.0 else seed_tensor(seed, dummy.device)
    return seed_ptr, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


# --------------------------------------------------------------------------------------------------
# Launchers: 2-D tensors in, freshly allocated results out. Operands are passed as strided views, so
# transposes (Wᵀ, Aᵀ, Bᵀ) cost nothing.
# --------------------------------------------------------------------------------------------------


def _linear_plan(M: int, N: int, K: int, element_size: int, two_acc: bool) -> tuple:
    def make():  # (the one-accumulator call keeps 4 arguments: tests and the sweep replace _linear_config)
        cfg = (
            _linear_config(M, N, K, element_size, True) if two_acc else _linear_config(M, N, K, element_size)
        )
        configs = _Configs(_smaller_configs(cfg, ("BLOCK_N", "BLOCK_M", "BLOCK_K")))
        return configs, lambda cfg: (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)

    return _plan(("linear", M, N, K, element_size, two_acc, interpreting(), _linear_config), make)


def _linear_with_lora(
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
    project: torch.Tensor | None = None,
    project_scale: float = 1.0,
    lora_scale: float = 1.0,
    out_shape: tuple[int, ...] | None = None,
    *,
    a_scale: torch.Tensor | None = None,
    second: int = 0,
    a2: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    lora_only: bool = False,
    col_offset: int = 0,
) -> torch.Tensor:
    """``a·b + [mask ⊙] lora_scale·t·u + bias`` with ``a`` (M, K), ``b`` (K, N), ``t`` (M, R), ``u`` (R, N).

    ``lora_only``: without the main product (K taken as 0, ``a`` and ``b`` give only M, N and the dtype).

    With ``project`` (K, R), ``t`` is an output: the kernel fills it with ``project_scale · a·project``.
    ``bias`` may have any stride (0 included). The result is a new contiguous tensor of ``out_shape``
    (default ``(M, N)``; any shape of M·N elements: the kernel writes it as (M, N) row-major).

    DoRA (see the kernel): ``a_scale`` (K, fp32) scales ``a``'s columns in the main product unless
    ``second == 2``, where it feeds the second accumulator; ``second == 1`` takes ``a2`` (M, K);
    ``out_scale`` (N, fp32) with ``z`` (M, N, contiguous, an output) is the forward's epilogue.
    ``col_offset``: the dropout mask's first column (``LoRAParams.column_offset``, a multiple of 8).
    """
    M, K = a.shape
    N = b.shape[1]
    R = t.shape[1]
    if lora_only:
        K = 0
    out = torch.empty((M, N) if out_shape is None else out_shape, device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        if project is not None and M > 0:  # N == 0: nothing to fuse into, t is still owed
            t.copy_(torch.mm(a, project.to(a.dtype)).float().mul_(project_scale))
        return out
    seed_ptr, threshold, scale = _dropout_args(dropout_p, seed, out)
    p = project if project is not None else t
    a2_arg = a2 if a2 is not None else a
    configs, grid_of = _linear_plan(M, N, K, a.element_size(), second != 0)
    _launch(
        _lora_linear_kernel,
        grid_of,
        configs,
        (
            a, b, t, u, p, bias if bias is not None else out, out, a2_arg,
            a_scale if a_scale is not None else out, out_scale if out_scale is not None else out,
            z if z is not None else out,
            M, N, K, R,
            *a.stride(), *b.stride(), *t.stride(), *u.stride(), *p.stride(),
            bias.stride(0) if bias is not None else 0, N, 1,  # out (and z): contiguous, viewed as (M, N)
            *a2_arg.stride(),
            project_scale, lora_scale, seed_ptr, threshold, scale, col_offset,
        ),
        dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, FUSE_PROJECT=project is not None,
             LORA_FP32=a.dtype == torch.float16, INPUT_PRECISION=_input_precision(a.dtype),
             SCALE_A=a_scale is not None and second != 2, SECOND=second, DORA_OUT=z is not None,
             BLOCK_R=_block_r(R)),
    )  # fmt: skip
    return out


def _project(
    a: torch.Tensor, b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None, *,
    dropped: torch.Tensor | None = None, col_offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """``scale · dropout(a)·b`` in fp32, ``a`` (M, K), ``b`` (K, R); also fills ``dropped`` (M, K contiguous,
    ``a.dtype``) with ``dropout(a)`` when it is given; the mask's columns start at ``col_offset``."""
    M, K = a.shape
    R = b.shape[1]
    out = torch.empty((M, R), device=a.device, dtype=torch.float32)
    if M == 0:
        return out
    seed_ptr, threshold, dropout_scale = _dropout_args(dropout_p, seed, out)
    mask_scale = dropout_scale
    if dropout_p > 0.0:
        scale = scale * dropout_scale

    def make():
        configs = _Configs(_smaller_configs(_skinny_config(M, K, R), ("BLOCK_M", "BLOCK_K")))
        return configs, lambda cfg: (_cdiv(M, cfg["BLOCK_M"]),)

    configs, grid_of = _plan(("project", M, K, R, interpreting(), _skinny_config), make)
    _launch(
        _lora_project_kernel,
        grid_of,
        configs,
        (
            a, b, out, dropped if dropped is not None else a,
            M, K, R,
            *a.stride(), *b.stride(), *out.stride(),
            scale, seed_ptr, threshold, mask_scale, col_offset,
        ),
        dict(HAS_DROPOUT=dropout_p > 0.0, STORE_DROPPED=dropped is not None,
             INPUT_PRECISION=_input_precision(a.dtype)),
    )  # fmt: skip
    return out


def _reduce_rows(
    a: torch.Tensor,
    c: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    with_colsum: bool,
    scale: float = 1.0,
    z: torch.Tensor | None = None,
    project: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    colsum_dtype: torch.dtype = torch.float32,
    col_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``scale·dropout(a)ᵀ·c`` (P, R), optionally ``a.sum(0)`` (P,), given ``z`` (M, P) ``(a ⊙ z).sum(0)``
    (P,) and, given ``project`` (P, R; no dropout), ``scale·a·project`` (M, R), all fp32, ``a`` (M, P),
    ``c`` (M, R); the ones not asked for are None. The first comes in ``out_dtype``, as (R, P) (contiguous)
    when ``transposed``, the column sums in ``colsum_dtype``: computed in fp32 and cast once, in the kernel
    when the rows are not split (no launch for the cast), else after the fixed-order sum of the splits.

    The kernel writes partial sums, which one launch of :func:`_sum_parts_kernel` sums over their first axis
    and casts (:func:`_sum_parts`; a fixed order: the result does not change from run to run): per row
    split, ``(splits, P, R)`` (``(splits, R, P)`` when ``transposed``) and ``(splits, P)``; per block of
    ``BLOCK_P`` columns, the projection's ``(P / BLOCK_P, M, R)``. At 8192x4096, r = 16
    (bf16 backward, ``project``: 16 splits of 512 rows × 16 blocks of 256 columns, 256 programs) that is
    4 MiB + 256 KiB (+ 256 KiB with ``z``) and 8 MiB, written once and read once by the sums.
    """
    M, P = a.shape
    R = c.shape[1]
    assert project is None or dropout_p == 0.0, "the projection reads a undropped"

    def make():
        cfg = _reduce_config(M, P, R, project is not None)
        splits = _row_splits(M, _cdiv(P, cfg["BLOCK_P"]), cfg["BLOCK_M"], a.device)
        rows_per_split = _cdiv(max(M, 1), splits * cfg["BLOCK_M"]) * cfg["BLOCK_M"]
        splits = _cdiv(max(M, 1), rows_per_split)
        # a smaller BLOCK_M only adds loop trips: the row splits stay as computed here; with project, BLOCK_P
        # stays too (the projection's workspace has a slice per column block)
        shrinkable = ("BLOCK_M",) if project is not None else ("BLOCK_P", "BLOCK_M")
        configs = _Configs(_smaller_configs(cfg, shrinkable))
        return configs, lambda cfg: (_cdiv(P, cfg["BLOCK_P"]), splits), splits, rows_per_split

    key = ("reduce", M, P, R, project is not None, a.device, interpreting(), _reduce_config, _row_splits)
    configs, grid_of, splits, rows_per_split = _plan(key, make)
    if splits == 1:  # the kernel stores the results themselves, in their dtype and layout
        shape = (R, P) if transposed else (P, R)
        partial = torch.empty(shape, device=a.device, dtype=out_dtype)
        out_strides = partial.stride()[::-1] if transposed else partial.stride()
        colsum = torch.empty((P,), device=a.device, dtype=colsum_dtype) if with_colsum else None
    else:  # partial sums, (R, P) per split when transposed: the finalize step sums them in that layout
        partial = torch.empty((splits, R, P) if transposed else (splits, P, R), device=a.device,
                              dtype=torch.float32)  # fmt: skip
        out_strides = (1, P) if transposed else (R, 1)
        colsum = torch.empty((splits, P), device=a.device, dtype=torch.float32) if with_colsum else None
    prodsum = torch.empty((splits, P), device=a.device, dtype=torch.float32) if z is not None else None
    projected = None
    if project is not None:
        projected = torch.empty((_cdiv(P, configs[0]["BLOCK_P"]), M, R), device=a.device, dtype=torch.float32)
    seed_ptr, threshold, dropout_scale = _dropout_args(dropout_p, seed, partial)
    if dropout_p > 0.0:
        scale = scale * dropout_scale
    if P > 0:
        _launch(
            _lora_reduce_rows_kernel,
            grid_of,
            configs,
            (
                a, c, partial, colsum if colsum is not None else partial, z if z is not None else a,
                prodsum if prodsum is not None else partial, project if project is not None else c,
                projected if projected is not None else partial,
                M, P, R, rows_per_split,
                a.stride(0), a.stride(1), c.stride(0), c.stride(1),
                *(z.stride() if z is not None else (0, 0)),
                *(project.stride() if project is not None else (0, 0)),
                *out_strides,
                scale, seed_ptr, threshold, col_offset,
            ),
            dict(HAS_DROPOUT=dropout_p > 0.0, HAS_COLSUM=with_colsum, HAS_PRODSUM=z is not None,
                 PROJECT=project is not None, INPUT_PRECISION=_input_precision(a.dtype)),
        )  # fmt: skip
    if splits == 1:
        projected, prodsum = _sum_parts((projected, torch.float32), (prodsum, torch.float32))
        return partial, colsum, prodsum, projected
    partial, colsum, prodsum, projected = _sum_parts(
        (partial, out_dtype), (colsum, colsum_dtype), (prodsum, torch.float32), (projected, torch.float32)
    )
    return partial, colsum, prodsum, projected


def _sum_parts(*buffers: tuple[torch.Tensor | None, torch.dtype]) -> list[torch.Tensor | None]:
    """Each ``(parts, dtype)``'s fp32 partial sums summed over their first axis in a fixed order and cast to
    ``dtype`` (None stays None, a single part of that dtype is a view): all of them in one launch of
    :func:`_sum_parts_kernel`, the casts in its stores, not a sum and a cast per buffer. No part: zeros."""
    results, segments = [], []
    for parts, dtype in buffers:
        if parts is None or (parts.shape[0] == 1 and dtype == parts.dtype):
            results.append(None if parts is None else parts[0])
            continue
        out = torch.empty(parts.shape[1:], device=parts.device, dtype=dtype)
        results.append(out)
        if out.numel() > 0:
            segments.append((parts, out))
    if segments:
        args, end = [], 0
        for parts, out in segments:
            end += _cdiv(out.numel(), _SUM_PARTS_CONFIGS[0]["BLOCK"])
            args += [parts, out, out.numel(), parts.shape[0], end]
        while len(args) < 20:  # unused segments: no blocks (their end repeats the last), never entered
            args += [*segments[0], 0, 0, end]
        _launch(_sum_parts_kernel, lambda cfg: (end,), _SUM_PARTS_CONFIGS, tuple(args[:19]), {})
    return results


# The finalize kernel's one config: a plain loop over the partial sums, memory-bound.
_SUM_PARTS_CONFIGS = _Configs([dict(BLOCK=1024, num_warps=4, num_stages=1)])


def _grad_y_pass(
    grad_y: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor, scale: float, reduce: bool,
    with_colsum: bool, z: torch.Tensor | None = None, *, dtypes: tuple[torch.dtype, torch.dtype] | None = None,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """What the backward takes from dY besides dX: ``(s·dY·b, s·dYᵀ·t, Σ_rows dY, Σ_rows dY ⊙ z)``, fp32,
    (M, r), (N, r), (N,), (N,). The first is skipped when ``b`` is None, the others unless ``reduce``
    (the third unless ``with_colsum``, the last without ``z``). ``dtypes``: the dtypes the second and
    third come in instead of fp32 (see :func:`_reduce_rows`).

    Both at once come from one pass over dY where :func:`_single_pass_over_dy` says so, else from two.
    """
    out_dtype, colsum_dtype = dtypes or (torch.float32, torch.float32)
    casts = dict(out_dtype=out_dtype, colsum_dtype=colsum_dtype)
    if b is not None and reduce and _single_pass_over_dy(b.shape[1]):
        grad_B, colsum, prodsum, grad_t = _reduce_rows(
            grad_y, t, 0.0, None, with_colsum, scale, z, project=b, **casts
        )
        return grad_t, grad_B, colsum, prodsum
    grad_t = _project(grad_y, b, scale, 0.0, None) if b is not None else None
    grad_B = colsum = prodsum = None
    if reduce:
        grad_B, colsum, prodsum, _ = _reduce_rows(grad_y, t, 0.0, None, with_colsum, scale, z, **casts)
    return grad_t, grad_B, colsum, prodsum


# --------------------------------------------------------------------------------------------------
# The backend interface (see lora_kernels/ops/__init__.py).
# --------------------------------------------------------------------------------------------------


def lora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, params: LoRAParams, out_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``y = x·Wᵀ + b + s·(t·Bᵀ)`` with ``t = dropout(x)·Aᵀ`` (float32, returned for backward)."""
    M, K = x.shape
    scaling, dropout_p, seed = params.scaling, params.dropout_p, seed_on(params, x.device)
    with _launch_guard(), device_guard(x.device):  # Triton launches on the current device
        # t = dropout(x)·Aᵀ: in the GEMM's main loop where it can (no dropout), else by its own pass
        fuse = dropout_p == 0.0 and _fuse_projection(M, weight.shape[0], K, lora_A.shape[0])
        if fuse:
            t = torch.empty((M, lora_A.shape[0]), device=x.device, dtype=torch.float32)
        else:
            t = _project(x, lora_A.t(), 1.0, dropout_p, seed, col_offset=params.column_offset)
        project = lora_A.t() if fuse else None
        y = _linear_with_lora(x, weight.t(), t, lora_B.t(), bias, 0.0, seed, project, 1.0, scaling, out_shape)
    return y, t


def lora_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, t: torch.Tensor, params: LoRAParams, needs_grad: NeedsGrad, *, split: bool = False,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """``(dX, dA, dB, db)`` for :func:`lora_forward`: ``db``, the column sums of dY, rides along the pass
    that gives dB and ``s·dY·B``. ``split``: dX as :func:`split_backward` computes it."""
    need_x, _, need_bias, need_A, need_B = needs_grad
    scaling, dropout_p, seed = params.scaling, params.dropout_p, seed_on(params, grad_y.device)
    grad_x = grad_A = None
    with _launch_guard(), device_guard(grad_y.device):
        # s·dY·B, (M, r) fp32, and dB = s·dYᵀ·t (t carries no s) with db: one pass over dY for both, apart
        # from the dX GEMM (fusing s·dY·B into the GEMM's main loop measured slower)
        # dB and db come in the adapters' and dY's dtypes, dA as (r, K) in the adapters' dtype: cast in the
        # kernels' stores (or once after the sum of the row splits), never by launches of their own
        grad_t, grad_B, grad_bias, _ = _grad_y_pass(
            grad_y, lora_B if need_x or need_A else None, t, scaling, need_B or need_bias, need_bias,
            dtypes=(lora_B.dtype, grad_y.dtype),
        )  # fmt: skip
        offset = params.column_offset
        if need_x and split:  # mask ⊙ (s·dY·B)·A into dX's storage, then dX += dY·W by cuBLAS
            grad_x = _lora_term(grad_y, grad_t, lora_A, None, 1.0, dropout_p, seed, col_offset=offset)
            grad_x.addmm_(grad_y, weight)
        elif need_x:
            grad_x = _linear_with_lora(
                grad_y, weight, grad_t, lora_A, None, dropout_p, seed, col_offset=offset
            )
        if need_A:
            grad_A = _reduce_rows(
                x, grad_t, dropout_p, seed, with_colsum=False, out_dtype=lora_A.dtype, transposed=True,
                col_offset=offset,
            )[0]  # fmt: skip
        grad_B = grad_B if need_B else None
        grad_bias = grad_bias if need_bias else None
    return grad_x, grad_A, grad_B, grad_bias


# --------------------------------------------------------------------------------------------------
# The split path (lora_kernels/ops/routing.py): the skinny kernels above for t and the gradients, the
# LoRA term written into the output's storage, and the base GEMM accumulated into it by cuBLAS
# (torch's addmm_ with beta = 1; on CPU tensors, under the interpreter, torch's CPU GEMM).
# --------------------------------------------------------------------------------------------------


def _lora_term(
    like: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, scale: float,
    dropout_p: float, seed: int, out_shape: tuple[int, ...] | None = None, col_offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """``bias + [mask ⊙] scale·t·u`` (M, N) in ``like.dtype``, ``t`` (M, R) fp32 or ``like.dtype``, ``u`` (R, N).

    :func:`_lora_linear_kernel` with an empty main product (K = 0: its loop runs no iteration), so the
    epilogue alone runs, with its precision (``scale`` applied to ``t`` in fp32; fp16 keeps both operands
    fp32) and its dropout mask (that of an (M, N) input: dX's). One write of the output, nothing read but
    ``t``, ``u`` and the bias.
    """
    return _linear_with_lora(
        like, u, t, u, bias, dropout_p, seed, None, 1.0, scale, out_shape, lora_only=True, col_offset=col_offset
    )  # fmt: skip


def split_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, params: LoRAParams, out_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The split path's ``(y, t)``: ``t = dropout(x)·Aᵀ`` by the skinny kernel, ``y = bias + s·t·Bᵀ``
    written into y's storage, then ``y += x·Wᵀ`` by cuBLAS (``addmm_``, beta = 1): no M×N temporary."""
    M, N = x.shape[0], weight.shape[0]
    scaling, dropout_p, seed = params.scaling, params.dropout_p, params.seed
    with _launch_guard(), device_guard(x.device):
        t = _project(x, lora_A.t(), 1.0, dropout_p, seed, col_offset=params.column_offset)
        y = _lora_term(x, t, lora_B.t(), bias, scaling, 0.0, seed, out_shape)
    (y if out_shape is None else y.view(M, N)).addmm_(x, weight.t())
    return y, t


def split_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, t: torch.Tensor, params: LoRAParams, needs_grad: NeedsGrad,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """``(dX, dA, dB, db)`` for :func:`split_forward`: dA, dB and db as :func:`lora_backward` (one pass over
    dY), ``dX = mask ⊙ s·(dY·B)·A`` written into dX's storage, then ``dX += dY·W`` by cuBLAS."""
    return lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, needs_grad, split=True)


# --------------------------------------------------------------------------------------------------
# DoRA (see lora_kernels/ops/__init__.py): the same three kernels, with their DoRA options.
# --------------------------------------------------------------------------------------------------


def dora_weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:  # fmt: skip
    """``‖W + s·B·A‖`` per row, fp32, by :func:`_dora_norm_kernel` (one read of ``W``)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    out = torch.empty(N, device=weight.device, dtype=torch.float32)
    if N == 0:
        return out
    if interpreting():
        cfg = dict(
            BLOCK_N=_pow2_clamp(N, 16, 128), BLOCK_K=_pow2_clamp(K, 16, 128), num_warps=4, num_stages=1
        )
    else:  # not timed yet: 64 rows a program (64 programs for N = 4096), an r-wide fp32 tile of B in registers
        cfg = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    configs = _Configs(_smaller_configs(dict(cfg, BLOCK_R=_block_r(R)), ("BLOCK_N", "BLOCK_K")))
    with _launch_guard(), device_guard(weight.device):
        _launch(
            _dora_norm_kernel,
            lambda cfg: (_cdiv(N, cfg["BLOCK_N"]),),
            configs,
            (
                weight, lora_A, lora_B, out,
                N, K, R,
                weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
                lora_B.stride(0), lora_B.stride(1),
                scaling,
            ),
            {},
        )  # fmt: skip
    return out


def dora_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, col_scale: torch.Tensor, params: LoRAParams, out_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(y, t, z)`` in one GEMM launch after ``t``'s: ``W`` is read once for ``x·Wᵀ`` and, with dropout,
    ``x̃·Wᵀ`` (two accumulators; ``x̃`` is written by ``t``'s kernel and freed on return)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    scaling, dropout_p, seed = params.scaling, params.dropout_p, seed_on(params, x.device)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype)
    with _launch_guard(), device_guard(x.device):
        if dropout_p == 0.0:
            t = torch.empty((M, r), device=x.device, dtype=torch.float32)
            y = _linear_with_lora(
                x, weight.t(), t, lora_B.t(), bias, 0.0, seed, lora_A.t(), 1.0, scaling, out_shape,
                out_scale=col_scale, z=z,
            )  # fmt: skip
        else:
            x_dropped = torch.empty((M, K), device=x.device, dtype=x.dtype)
            t = _project(
                x, lora_A.t(), 1.0, dropout_p, seed, dropped=x_dropped, col_offset=params.column_offset
            )
            y = _linear_with_lora(
                x, weight.t(), t, lora_B.t(), bias, 0.0, seed, None, 1.0, scaling, out_shape,
                second=1, a2=x_dropped, out_scale=col_scale, z=z,
            )  # fmt: skip
    return y, t, z


def dora_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    t: torch.Tensor, z: torch.Tensor, col_scale: torch.Tensor, params: LoRAParams, needs_grad: DoRANeedsGrad,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """``(dX, dA, dB, db, Σ_rows dY ⊙ z)``. ``dY ⊙ c`` is never formed: ``s·(dY ⊙ c)·B = s·dY·(c ⊙ B)``
    (``c ⊙ B`` is N×r), the dX GEMM scales its dY tiles in registers, and dB is ``c ⊙ (s·dYᵀ·t)``. One
    pass over dY gives ``s·dY·(c ⊙ B)``, dB, db and ``Σ dY ⊙ z``."""
    need_x, _, need_bias, need_A, need_B, need_m = needs_grad
    scaling, dropout_p, seed = params.scaling, params.dropout_p, seed_on(params, grad_y.device)
    grad_x = grad_A = None
    with _launch_guard(), device_guard(grad_y.device):
        grad_t, grad_B, grad_bias, grad_z_colsum = _grad_y_pass(  # db cast in the kernels' stores
            grad_y, lora_B * col_scale[:, None] if need_x or need_A else None, t, scaling,
            need_B or need_bias or need_m, need_bias, z if need_m else None,
            dtypes=(torch.float32, grad_y.dtype),
        )  # fmt: skip
        if need_x:
            if dropout_p == 0.0:  # (dY ⊙ c)·W + s·(dY ⊙ c)·B·A
                grad_x = _linear_with_lora(grad_y, weight, grad_t, lora_A, None, 0.0, seed, a_scale=col_scale)
            else:  # dY·W + mask ⊙ ((dY ⊙ (c − 1))·W + s·(dY ⊙ c)·B·A)
                grad_x = _linear_with_lora(
                    grad_y, weight, grad_t, lora_A, None, dropout_p, seed, a_scale=col_scale - 1.0, second=2,
                    col_offset=params.column_offset,
                )  # fmt: skip
        if need_A:
            grad_A = _reduce_rows(
                x, grad_t, dropout_p, seed, with_colsum=False, out_dtype=lora_A.dtype, transposed=True,
                col_offset=params.column_offset,
            )[0]  # fmt: skip
        grad_B = (grad_B * col_scale[:, None]).to(lora_B.dtype) if need_B else None
        grad_bias = grad_bias if need_bias else None
    return grad_x, grad_A, grad_B, grad_bias, grad_z_colsum
