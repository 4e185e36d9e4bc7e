"""The Triton backend's skinny products and row reductions: ``t``, ``s·dY·B``, dA, dB and db.

Read top to bottom: the three ``@triton.jit`` kernels, their tile configs, then the launchers
:func:`_project`, :func:`_reduce_rows` (with :func:`_sum_parts`, its finalize step) and
:func:`_grad_y_pass`, what the backward takes from dY besides dX. The GEMM backend (:mod:`.triton_lora`)
calls them, and so do :mod:`.triton_tma` and :mod:`.triton_nf4` for their LoRA side.

============================  ===============================================  ===============================
kernel                        computes                                         used for
============================  ===============================================  ===============================
``_lora_project_kernel``      ``out = s·dropout(a)·b`` with ``b`` r columns    ``t`` (forward), ``s·dY·B``
                                                                               when dB is not needed or
                                                                               r > 16
``_lora_reduce_rows_kernel``  ``out = dropout(a)ᵀ·c``, ``colsum = Σ_rows a``   ``dB`` + ``dbias`` (+
                              (reduction over the M rows, split in fixed       ``s·dY·B``: one pass over
                              chunks and summed in a fixed order);             dY), ``dA``
                              optionally ``s·a·b`` from the same tiles
``_sum_parts_kernel``         the partial sums of the row splits (and of       the finalize step of
                              the column blocks) summed in a fixed order       ``_lora_reduce_rows_kernel``
                              and cast, up to four buffers in one launch
============================  ===============================================  ===============================

The dropout mask is regenerated from ``(seed, row, col)`` in the tiles (:mod:`.triton_tiles`), never stored.
No atomics: the results do not change from run to run. All offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from . import triton_support
from .triton_support import (
    _block_r,
    _cdiv,
    _Configs,
    _dropout_args,
    _input_precision,
    _num_sms,
    _plan,
    _pow2_clamp,
    _smaller_configs,
)
from .triton_tiles import _dropout_keep_tile, _dropout_keep_tile_t, _load_seed, _tile


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


# --------------------------------------------------------------------------------------------------
# Tile configs (lora_kernels/ops/triton_support.py: chosen by a function of the shape, one config under the
# interpreter). The compiled ones were chosen from the sweep of benchmarks/gpu_run.sh on an H200 (bf16,
# r = 16, benchmarks/results/h200/, benchmarks/NOTES.md); shapes and dtypes the sweep did not cover keep the
# Triton-tutorial defaults they had before.
# --------------------------------------------------------------------------------------------------


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


def _row_splits(M: int, num_blocks: int, block_m: int, device: torch.device) -> int:
    """How many chunks the row reduction splits M into, so that the grid fills the GPU (>= 4 row blocks each)."""
    if interpreting() or device.type != "cuda":
        return 1
    return max(1, min(_cdiv(M, block_m * 4), _cdiv(2 * _num_sms(device.index or 0), num_blocks)))


def _single_pass_over_dy(r: int) -> bool:
    """Whether the backward takes ``s·dY·B`` from the pass over dY that gives dB and db (``PROJECT``)
    instead of a pass of its own. Not timed yet; predicted from the bytes (benchmarks/NOTES.md).

    The single pass saves one read of dY (64 MiB at 8192x4096 bf16) and writes its partial sums instead,
    read back once: 12.3 MiB at r = 16 (:func:`_reduce_rows`), twice that at r = 32 (48 MiB of traffic
    against 64), so only ranks up to 16 (BLOCK_R = 16) take it. With wider ranks, each pass reads dY once.
    """
    return r <= 16


# --------------------------------------------------------------------------------------------------
# Launchers: 2-D tensors in, freshly allocated results out; operands are strided views (Aᵀ costs nothing).
# --------------------------------------------------------------------------------------------------


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
    triton_support._launch(
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
        triton_support._launch(
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
        triton_support._launch(
            _sum_parts_kernel, lambda cfg: (end,), _SUM_PARTS_CONFIGS, tuple(args[:19]), {}
        )
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
