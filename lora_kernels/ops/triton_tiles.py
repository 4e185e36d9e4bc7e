"""The ``@triton.jit`` helpers that the Triton kernels of :mod:`lora_kernels.ops` share.

They run inside the kernels of :mod:`.triton_lora` (the GEMM with the LoRA epilogue), :mod:`.triton_reduce`
(the skinny projection and the row reductions), :mod:`.triton_dora`, :mod:`.triton_tma` and
:mod:`.triton_nf4`. Read top to bottom: the dropout mask of the shared scheme (lora_kernels/dropout.py),
regenerated tile by tile from Philox and the seed tensor; the LoRA epilogue (the term added to the fp32
accumulator, the bias and the one cast at the store); the tile indexing. Nothing here launches: the host
side is :mod:`.triton_support`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import dropout

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
    epilogue of every Triton GEMM (``t_op``, ``u_op`` from :func:`_epilogue_operands` or its equivalent)."""
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
    (R, N), both in ``in_dtype`` or, with ``LORA_FP32``, fp32 (see ``triton_lora._lora_linear_kernel``)."""
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
