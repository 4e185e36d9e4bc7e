"""SGMV-style Triton kernels for many LoRA adapters over one batch (:mod:`lora_kernels.ops.multi_lora`).

The adapters come stacked and zero-padded to one rank ``R`` (a power of two >= 16): ``A_stack (n, R, K)``,
``B_stack (n, N, R)``. The rows of the batch are grouped by adapter into segments of a position array
``rows`` (``(T,)`` int64 on the device): positions ``[seg_starts[a], seg_starts[a + 1])`` are adapter ``a``'s,
``rows[i]`` the batch row of position ``i``. Adapter ``a``'s dropout mask at position ``i``, column ``c`` is
``dropout_mask(seeds[a], (m_a, C), p_a)[i - seg_starts[a], c]``: the row of the mask is the position inside
the segment (the mask a call of that adapter alone on its rows draws).

Three kernels, each a grouped GEMM over the segments (Punica's shrink and expand, and the weight
gradients' reduction over each segment's rows), products in a compute dtype (the operands cast tile by tile
in registers, so fp32 adapters run with fp16/bf16 inputs) with float32 accumulation:

* :func:`segment_shrink` ``out[i] = s_a · drop_a(inp[rows[i]]) · W_aᵀ`` (``t = drop(x)·Aᵀ``, ``g = s·dY·B``);
* :func:`segment_expand` ``out[rows[i]] += s_a · drop_a(inp[i] · W_aᵀ)`` in place (``y += s·t·Bᵀ``,
  ``dX += mask ⊙ (g·A)``); with every adapter on every row (several active adapters) a tile of rows loops
  over the adapters, so each output element is read once, summed in fp32 and rounded once;
* :func:`segment_reduce` ``out[a] = s_a · Σ_{i in segment a} u_iᵀ ⊗ drop_a(v_i)`` (``dA``, ``dB``).

Tiles of rows never straddle two segments: the host makes a tile map (segment, first position) per call,
so a segment of any size, empty ones included, costs only its own tiles.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dispatch import interpreting
from . import device_guard, triton_support
from .triton_support import _cdiv, _Configs, _input_precision, _launch_guard, _pow2_clamp, _smaller_configs
from .triton_tiles import _dropout_keep_tile, _load_seed

__all__ = ["SegmentDropout", "segment_expand", "segment_reduce", "segment_shrink"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class SegmentDropout:
    """Per-adapter dropout: ``seeds`` (n,) int64, ``thresholds`` (n,) int32 (``dropout_threshold(p_a)``; 0
    keeps everything), ``keep_scales`` (n,) float32 (``1 / (1 − p_a)``), all on the device."""

    seeds: Tensor
    thresholds: Tensor
    keep_scales: Tensor


@triton.jit
def _keep_factor(seed_ptr, thr_ptr, keep_ptr, a, positions, col_start, BLOCK: tl.constexpr):
    """Adapter ``a``'s mask on the tile of segment ``positions`` × columns ``col_start + [0, BLOCK)``, as
    float32 factors ``0`` or ``1 / (1 − p_a)``."""
    seed_lo, seed_hi = _load_seed(seed_ptr + a)
    threshold = tl.load(thr_ptr + a)
    keep = _dropout_keep_tile(positions, col_start, BLOCK, seed_lo, seed_hi, threshold)
    return keep.to(tl.float32) * tl.load(keep_ptr + a)


@triton.jit
def _segment_shrink_kernel(
    inp_ptr, rows_ptr, w_ptr, out_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, tiles_ptr, starts_ptr,
    D, stride_im, stride_id, stride_wa, stride_wr, stride_wd, stride_om,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One tile of one segment: ``out[pos] = s_a · drop_a(inp[rows[pos]]) · W_aᵀ``, ``(BLOCK_M, R)`` fp32."""
    tile = tl.program_id(0)
    a = tl.load(tiles_ptr + 2 * tile)
    pos = tl.load(tiles_ptr + 2 * tile + 1) + tl.arange(0, BLOCK_M)
    begin = tl.load(starts_ptr + a)
    valid = pos < tl.load(starts_ptr + a + 1)
    rows = tl.load(rows_ptr + pos, mask=valid, other=0)
    offs_r = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for d in range(0, tl.cdiv(D, BLOCK_D)):
        offs_d = d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(
            inp_ptr + rows[:, None] * stride_im + offs_d[None, :].to(tl.int64) * stride_id,
            mask=valid[:, None] & mask_d[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            x = x.to(tl.float32) * _keep_factor(
                seed_ptr, thr_ptr, keep_ptr, a, pos - begin, d * BLOCK_D, BLOCK_D
            )
        w = tl.load(
            w_ptr + a.to(tl.int64) * stride_wa + offs_r[None, :] * stride_wr
            + offs_d[:, None].to(tl.int64) * stride_wd,
            mask=mask_d[:, None], other=0.0,
        )  # fmt: skip
        acc += tl.dot(x.to(COMPUTE), w.to(COMPUTE), input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + a)
    out = out_ptr + pos[:, None].to(tl.int64) * stride_om + offs_r[None, :]
    tl.store(out, acc, mask=valid[:, None])


@triton.jit
def _expand_term(
    inp_ptr, w_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, a, pos, positions, valid, offs_d, mask_d,
    stride_im, stride_ir, stride_wa, stride_wd, stride_wr, R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Adapter ``a``'s term ``s_a · drop_a(inp[pos] · W_aᵀ)`` on a ``(BLOCK_M, BLOCK_D)`` tile, fp32."""
    offs_r = tl.arange(0, R)
    t = tl.load(
        inp_ptr + pos[:, None].to(tl.int64) * stride_im + offs_r[None, :] * stride_ir,
        mask=valid[:, None],
        other=0.0,
    )
    w = tl.load(
        w_ptr + tl.cast(a, tl.int64) * stride_wa + offs_r[:, None] * stride_wr  # (a: a loop index or loaded)
        + offs_d[None, :].to(tl.int64) * stride_wd,
        mask=mask_d[None, :], other=0.0,
    )  # fmt: skip
    term = tl.dot(t.to(COMPUTE), w.to(COMPUTE), input_precision=PRECISION)
    if HAS_SCALE:
        term *= tl.load(scale_ptr + a)
    if HAS_DROPOUT:
        col_start = tl.program_id(1) * BLOCK_D
        term *= _keep_factor(seed_ptr, thr_ptr, keep_ptr, a, positions, col_start, BLOCK_D)
    return term


@triton.jit
def _segment_expand_kernel(
    inp_ptr, rows_ptr, w_ptr, out_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, tiles_ptr, starts_ptr,
    D, num_adapters, rows_each, stride_im, stride_ir, stride_wa, stride_wd, stride_wr, stride_om, stride_od,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALL_ACTIVE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[rows[pos]] += Σ terms`` on one tile of rows × ``BLOCK_D`` columns (read once, rounded once)."""
    tile = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    first = tl.load(tiles_ptr + 2 * tile + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if ALL_ACTIVE:  # every adapter on rows first + [0, BLOCK_M): its positions a·M + row
        out_rows = first + tl.arange(0, BLOCK_M)
        valid = out_rows < rows_each
        for a in range(0, num_adapters):
            acc += _expand_term(
                inp_ptr, w_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, a, a * rows_each + out_rows, out_rows,
                valid, offs_d, mask_d, stride_im, stride_ir, stride_wa, stride_wd, stride_wr, R, BLOCK_D,
                HAS_SCALE, HAS_DROPOUT, COMPUTE, PRECISION,
            )  # fmt: skip
        out_rows = out_rows.to(tl.int64)
    else:
        a = tl.load(tiles_ptr + 2 * tile)
        pos = first + tl.arange(0, BLOCK_M)
        begin = tl.load(starts_ptr + a)
        valid = pos < tl.load(starts_ptr + a + 1)
        out_rows = tl.load(rows_ptr + pos, mask=valid, other=0)
        acc += _expand_term(
            inp_ptr, w_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, a, pos, pos - begin, valid, offs_d, mask_d,
            stride_im, stride_ir, stride_wa, stride_wd, stride_wr, R, BLOCK_D, HAS_SCALE, HAS_DROPOUT, COMPUTE,
            PRECISION,
        )  # fmt: skip
    out = out_ptr + out_rows[:, None] * stride_om + offs_d[None, :].to(tl.int64) * stride_od
    mask = valid[:, None] & mask_d[None, :]
    current = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (current.to(tl.float32) + acc).to(current.dtype), mask=mask)


@triton.jit
def _segment_reduce_kernel(
    u_ptr, u_rows_ptr, v_ptr, v_rows_ptr, out_ptr, scale_ptr, seed_ptr, thr_ptr, keep_ptr, starts_ptr,
    P, Q, stride_um, stride_up, stride_vm, stride_vq, stride_oa, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, U_GATHER: tl.constexpr,
    V_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[a, P tile, Q tile] = s_a · Σ_{pos in segment a} u[pos]ᵀ ⊗ drop_a(v[pos])``, fp32."""
    a = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p, mask_q = offs_p < P, offs_q < Q
    begin = tl.load(starts_ptr + a)
    end = tl.load(starts_ptr + a + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m in range(0, tl.cdiv(end - begin, BLOCK_M)):
        pos = begin + m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < end
        u_rows = tl.load(u_rows_ptr + pos, mask=valid, other=0) if U_GATHER else pos.to(tl.int64)
        v_rows = tl.load(v_rows_ptr + pos, mask=valid, other=0) if V_GATHER else pos.to(tl.int64)
        u = tl.load(
            u_ptr + u_rows[:, None] * stride_um + offs_p[None, :].to(tl.int64) * stride_up,
            mask=valid[:, None] & mask_p[None, :], other=0.0,
        )  # fmt: skip
        v = tl.load(
            v_ptr + v_rows[:, None] * stride_vm + offs_q[None, :].to(tl.int64) * stride_vq,
            mask=valid[:, None] & mask_q[None, :], other=0.0,
        )  # fmt: skip
        if HAS_DROPOUT:
            col_start = tl.program_id(2) * BLOCK_Q
            v = v.to(tl.float32) * _keep_factor(
                seed_ptr, thr_ptr, keep_ptr, a, pos - begin, col_start, BLOCK_Q
            )
        acc += tl.dot(tl.trans(u.to(COMPUTE)), v.to(COMPUTE), input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + a)
    out = (
        out_ptr + a.to(tl.int64) * stride_oa + offs_p[:, None].to(tl.int64) * stride_op
        + offs_q[None, :] * stride_oq
    )  # fmt: skip
    tl.store(out, acc, mask=mask_p[:, None] & mask_q[None, :])


# --------------------------------------------------------------------------------------------------------
# Launchers: the tile maps (host side, cached per segment layout), the configs, then one launcher per kernel.
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _starts(seg_starts: tuple[int, ...], device: torch.device) -> Tensor:
    """``seg_starts`` as an int32 tensor on ``device`` (the kernels read each segment's bounds from it)."""
    return torch.tensor(seg_starts, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=256)
def _tiles(seg_starts: tuple[int, ...], block_m: int, all_active: bool, device: torch.device) -> Tensor:
    """``(tiles, 2)`` int32 on ``device``: each tile's segment and first position, the tiles of a segment
    never reaching into the next (``all_active``: the first row of each tile of the ``M`` rows every
    adapter shares, segment 0)."""
    if all_active:
        pairs = [(0, row) for row in range(0, seg_starts[1] - seg_starts[0], block_m)]
    else:
        pairs = [
            (a, p)
            for a in range(len(seg_starts) - 1)
            for p in range(seg_starts[a], seg_starts[a + 1], block_m)
        ]
    return torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)


def _block_m(seg_starts: list[int], all_active: bool) -> int:
    """Rows per tile: the longest segment's, a power of two in [16, 64] (short segments waste less)."""
    if all_active:
        return _pow2_clamp(seg_starts[1] - seg_starts[0], 16, 64)
    return _pow2_clamp(max(end - start for start, end in itertools.pairwise(seg_starts)), 16, 64)


@functools.lru_cache(maxsize=256)
def _configs(blocks: tuple[tuple[str, int], ...], interp: bool) -> _Configs:
    """The launch configs for ``blocks`` (name, size): one under the interpreter (the blocks large, one
    stage); on a GPU these sizes with 4 warps and 2 stages (not timed yet), then the smaller variants
    :func:`triton_support._launch` falls back to."""
    cfg = {**dict(blocks), "num_warps": 4, "num_stages": 1 if interp else 2}
    return _Configs(_smaller_configs(cfg, tuple(name for name, _ in blocks)))


def _width(n: int) -> int:
    """A column tile: large under the interpreter (its cost is per program and loop trip), 64 on a GPU."""
    return _pow2_clamp(n, 16, 128 if interpreting() else 64)


def _dropout_ptrs(dropout: SegmentDropout | None, dummy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if dropout is None:
        return dummy, dummy, dummy
    return dropout.seeds, dropout.thresholds, dropout.keep_scales


def _check_rows(rows: Tensor | None, seg_starts: list[int]) -> None:
    if rows is not None and (rows.dtype != torch.int64 or rows.shape[0] < seg_starts[-1]):
        raise ValueError(f"rows must be int64 with {seg_starts[-1]} positions, got {rows.dtype} "
                         f"{tuple(rows.shape)}")  # fmt: skip


def segment_shrink(
    inp: Tensor, rows: Tensor, seg_starts: list[int], weights: Tensor, scales: Tensor | None,
    dropout: SegmentDropout | None, compute_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``out[i] = scales[a] · (drop_a(inp[rows[i]]) @ weights[a].T)`` for ``i`` in segment ``a``: ``(T, R)``
    float32 from ``inp (M, D)`` and ``weights (n, R, D)`` (any strides), dropout on ``inp``'s columns,
    products in ``compute_dtype``."""
    _check_rows(rows, seg_starts)
    T, R, D = seg_starts[-1], weights.shape[1], inp.shape[1]
    out = torch.empty((T, R), device=inp.device, dtype=torch.float32)
    if T == 0:
        return out
    block_m = _block_m(seg_starts, False)
    tiles = _tiles(tuple(seg_starts), block_m, False, inp.device)
    seed, thr, keep = _dropout_ptrs(dropout, out)
    with _launch_guard(), device_guard(inp.device):
        triton_support._launch(
            _segment_shrink_kernel, lambda cfg: (tiles.shape[0],),
            _configs((("BLOCK_D", _width(D)),), interpreting()),
            (
                inp, rows, weights, out, out if scales is None else scales, seed, thr, keep, tiles,
                _starts(tuple(seg_starts), inp.device), D, inp.stride(0), inp.stride(1), weights.stride(0),
                weights.stride(1), weights.stride(2), out.stride(0),
            ),
            dict(
                R=R, BLOCK_M=block_m, HAS_SCALE=scales is not None, HAS_DROPOUT=dropout is not None,
                COMPUTE=_TL_DTYPES[compute_dtype], PRECISION=_input_precision(compute_dtype),
            ),
        )  # fmt: skip
    return out


def segment_expand(
    inp: Tensor, rows: Tensor, seg_starts: list[int], weights: Tensor, scales: Tensor | None, out: Tensor, *,
    all_active: bool, dropout: SegmentDropout | None,
) -> None:  # fmt: skip
    """``out[rows[i]] += scales[a] · drop_a(inp[i] @ weights[a].T)`` in place: ``inp (T, R)`` float32 (cast
    to ``out.dtype`` for the product), ``weights (n, D, R)`` (any strides), ``out (M, D)`` (any strides);
    dropout on the output columns. ``all_active``: every adapter on every row (``T = n·M``,
    ``seg_starts[a] = a·M``, ``rows[a·M + j] = j``); a tile of rows loops over the adapters. Each touched
    element is read once, its terms summed in fp32 and rounded once."""
    _check_rows(rows, seg_starts)
    n, D, R = len(seg_starts) - 1, out.shape[1], weights.shape[2]
    if seg_starts[-1] == 0 or D == 0:
        return
    block_m = _block_m(seg_starts, all_active)
    tiles = _tiles(tuple(seg_starts), block_m, all_active, inp.device)
    seed, thr, keep = _dropout_ptrs(dropout, inp)
    with _launch_guard(), device_guard(inp.device):
        triton_support._launch(
            _segment_expand_kernel, lambda cfg: (tiles.shape[0], _cdiv(D, cfg["BLOCK_D"])),
            _configs((("BLOCK_D", _width(D)),), interpreting()),
            (
                inp, rows, weights, out, inp if scales is None else scales, seed, thr, keep, tiles,
                _starts(tuple(seg_starts), inp.device), D, n, seg_starts[1] - seg_starts[0], inp.stride(0),
                inp.stride(1), weights.stride(0), weights.stride(1), weights.stride(2), out.stride(0),
                out.stride(1),
            ),
            dict(
                R=R, BLOCK_M=block_m, ALL_ACTIVE=all_active, HAS_SCALE=scales is not None,
                HAS_DROPOUT=dropout is not None, COMPUTE=_TL_DTYPES[out.dtype],
                PRECISION=_input_precision(out.dtype),
            ),
        )  # fmt: skip


def segment_reduce(
    u: Tensor, u_rows: Tensor | None, v: Tensor, v_rows: Tensor | None, seg_starts: list[int],
    scales: Tensor | None, dropout_v: SegmentDropout | None, compute_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``out[a] = scales[a] · Σ_{i in segment a} u[u_rows[i]]ᵀ ⊗ drop_a(v[v_rows[i]])``: ``(n, P, Q)`` float32
    (``u_rows``/``v_rows`` None: position ``i`` itself; ``u``, ``v`` of any strides); operands cast to
    ``compute_dtype``, dropout on ``v``'s columns; an empty segment gives zeros."""
    _check_rows(u_rows, seg_starts)
    _check_rows(v_rows, seg_starts)
    n, P, Q = len(seg_starts) - 1, u.shape[1], v.shape[1]
    out = torch.zeros((n, P, Q), device=u.device, dtype=torch.float32)
    if seg_starts[-1] == 0 or P == 0 or Q == 0:
        return out
    blocks = (("BLOCK_P", _width(P)), ("BLOCK_Q", _width(Q)), ("BLOCK_M", 64))
    seed, thr, keep = _dropout_ptrs(dropout_v, out)
    with _launch_guard(), device_guard(u.device):
        triton_support._launch(
            _segment_reduce_kernel, lambda cfg: (n, _cdiv(P, cfg["BLOCK_P"]), _cdiv(Q, cfg["BLOCK_Q"])),
            _configs(blocks, interpreting()),
            (
                u, out if u_rows is None else u_rows, v, out if v_rows is None else v_rows, out,
                out if scales is None else scales, seed, thr, keep, _starts(tuple(seg_starts), u.device), P, Q,
                u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                out.stride(2),
            ),
            dict(
                U_GATHER=u_rows is not None, V_GATHER=v_rows is not None, HAS_SCALE=scales is not None,
                HAS_DROPOUT=dropout_v is not None, COMPUTE=_TL_DTYPES[compute_dtype],
                PRECISION=_input_precision(compute_dtype),
            ),
        )  # fmt: skip
    return out
