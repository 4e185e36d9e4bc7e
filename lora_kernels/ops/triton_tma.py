"""Hopper (sm_90+) variants of the fused GEMM: tensor-descriptor (TMA) loads, a persistent tile loop.

One kernel, :func:`_lora_linear_tma_kernel`, computes what :func:`triton_lora._lora_linear_kernel` computes
for LoRA (``out = a·b + [mask ⊙] lora_scale·t·u + bias``, fp32 accumulation, one store), so it serves the
forward ``y = x·Wᵀ + b + s·t·Bᵀ`` and ``dX = dY·W + mask ⊙ (s·dY·B)·A``. What differs is how it feeds the
tensor cores: operand tiles come through TMA descriptors (``a``, ``b``, the projection operand and the
output), and ``NUM_SMS`` programs walk the output tiles in grouped order, so one program's prologue and
epilogue overlap its neighbours' main loops instead of being exposed once per wave. The epilogue (the LoRA
term, dropout mask, bias) is ``triton_lora``'s (the helpers of :mod:`.triton_tiles`), applied per half tile
when the store is subtiled, which halves the shared memory the output staging buffer takes.

Variants (:data:`VARIANTS`, all measured by ``benchmarks/tma_sweep.py``; none routed to automatically yet):

==================  ====================================================================================
``tma``             host-side descriptors (:class:`triton.tools.tensor_descriptor.TensorDescriptor`),
                    128×256×64, 8 warps, 3 stages, subtiled store; ``t`` (``s·dY·B`` for dX) read from
                    the projection kernel
``tma_t_fused``     the same, with ``t`` computed in the main loop from the ``a`` tiles (forward without
                    dropout; dX: ``s·dY·B``), stored by the programs of the first column of tiles
``tma_ws``          device-side descriptors (``tl.make_tensor_descriptor``, which needs
                    ``triton.set_allocator``), a warp-specialized tile loop: 128×128×64, 4 warps,
                    2 stages, the only build in which triton 3.6 specializes on sm_90
``tma_ws_t_fused``  ``tma_ws`` with ``t`` in the main loop
==================  ====================================================================================

TMA needs row-major operands with 16-byte aligned rows: ``x``/``dY`` with unit column stride, ``K·size``
and ``N·size`` multiples of 16 bytes (the output is allocated contiguous), ``W`` contiguous along either
axis; the fused dX variant also needs ``B``'s rows (``r·size``) 16-byte aligned; fp32 inputs only where
TF32 is allowed (IEEE fp32 is no tensor-core work). Where a call does not meet them,
or :func:`tma_available` is false (no GPU of compute capability 9 or newer, a triton without descriptors),
the launchers run ``triton_lora``'s kernels instead, so they are safe to call anywhere. Under the
interpreter (CPU) they run when the installed triton's interpreter has descriptors (3.6 and 3.8 do), with a
small ``NUM_SMS`` so that each program walks several tiles.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from . import LoRAParams, device_guard, triton_support
from . import triton_lora as _base
from .triton_reduce import _grad_y_pass, _project, _reduce_rows
from .triton_support import _cdiv, _input_precision, _launch_guard, _pow2_clamp
from .triton_tiles import _add_lora, _seed_words, _tile, _tile_coords

try:  # triton >= 3.4: host-side descriptors; make_tensor_descriptor in the language
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old triton: the launchers fall back
    TensorDescriptor = None

_HAS_DESCRIPTORS = TensorDescriptor is not None and hasattr(tl, "make_tensor_descriptor")
# triton 3.6's sm_90 warp specialization rejects the dropout mask's ops in the loop ("Unexpected op" in
# WSDataPartition); 3.8's takes them. Before 3.8, the ``tma_ws*`` dX with dropout runs as ``tma*`` (the same
# loop unspecialized at 4 warps spills 1.2-1.5 KB a thread).
_WS_TAKES_MASK = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)


@triton.jit
def _descriptor(
    ptr, rows, cols, row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TRANSPOSED: tl.constexpr
):  # fmt: skip
    """A device-side descriptor of the (rows, cols) operand at ``ptr``: of the row-major tensor itself, or,
    ``TRANSPOSED``, of the row-major (cols, rows) tensor it is a transposed view of (its tiles load as
    (BLOCK_COLS, BLOCK_ROWS) and are transposed by the caller)."""
    if TRANSPOSED:  # (one return: triton checks that every return has one type, constexpr branches too)
        desc = tl.make_tensor_descriptor(
            ptr, shape=[cols, rows], strides=[row_stride, 1], block_shape=[BLOCK_COLS, BLOCK_ROWS]
        )
    else:
        desc = tl.make_tensor_descriptor(
            ptr, shape=[rows, cols], strides=[row_stride, 1], block_shape=[BLOCK_ROWS, BLOCK_COLS]
        )
    return desc


@triton.jit
def _lora_epilogue_ptr(
    acc, t_op, u_ptr, bias_ptr, offs_m, col_start, N, R,
    stride_ur, stride_un, stride_bias,
    seed_lo, seed_hi, dropout_threshold, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """:func:`_add_lora` and the bias, ``u`` and the bias read through pointers (any strides)."""
    offs_n, mask_n = _tile(col_start, WIDTH, N)
    offs_r, mask_r = _tile(0, BLOCK_R, R)
    u = tl.load(
        u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    acc = _add_lora(acc, t_op, u.to(t_op.dtype), offs_m, col_start, seed_lo, seed_hi, dropout_threshold,
                    dropout_scale, HAS_DROPOUT, INPUT_PRECISION, WIDTH)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["dropout_threshold"])
def _lora_linear_tma_kernel(
    a, b, p, out, t_ptr, u_ptr, bias_ptr,
    M, N, K, R,
    stride_am, stride_b, stride_p, stride_tm, stride_tr, stride_ur, stride_un, stride_bias,
    project_scale, lora_scale, seed_ptr, dropout_threshold, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_PROJECT: tl.constexpr,
    LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    B_T: tl.constexpr, P_T: tl.constexpr, U_T: tl.constexpr, DEVICE_DESC: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = a[M, K]·b[K, N] + [mask ⊙] (lora_scale·t[M, R]·u[R, N]) + bias[N]``, persistent, TMA.

    ``a``, ``b``, ``p`` and ``out`` are host-side tensor descriptors, and ``t``, ``u`` and the bias are read
    through pointers in the epilogue (any strides) as in ``_lora_linear_kernel``; or, with ``DEVICE_DESC``,
    all seven are pointers, described here (``stride_*`` their row strides, every last stride 1, the bias
    contiguous), and the epilogue reads through TMA too: triton's warp specialization on sm_90 lowers only
    descriptor loads in the loop (a pointer load aborts its pass, "unsupported load type for producer
    commit"), and only an unflattened loop (``flatten=True`` leaves it unspecialized).

    ``b`` is stored ``(N, K)`` with ``B_T`` (the forward's ``W``: ``b = Wᵀ``), else ``(K, N)`` (dX's ``W``);
    ``u`` ``(N, R)`` with ``U_T`` (``Bᵀ``), else ``(R, N)`` (dX's ``A``); ``p``, the main-loop projection
    operand of ``FUSE_PROJECT`` (``t = project_scale·a·p``, p K×R, stored by the programs of the first
    column of tiles), ``(R, K)`` with ``P_T`` (the forward's ``A``), else ``(K, R)`` (dX's ``B``). See
    ``_lora_linear_kernel`` for the precision contract (``LORA_FP32``).
    """
    # the seed's two words, read once before the tile loop (the loop's loads are TMA's)
    seed_lo, seed_hi = _seed_words(seed_ptr, HAS_DROPOUT)
    if DEVICE_DESC:
        a_desc = _descriptor(a, M, K, stride_am, BLOCK_M, BLOCK_K, False)
        b_desc = _descriptor(b, K, N, stride_b, BLOCK_K, BLOCK_N, B_T)
        if FUSE_PROJECT:
            p_desc = _descriptor(p, K, R, stride_p, BLOCK_K, BLOCK_R, P_T)
        out_desc = _descriptor(out, M, N, N, BLOCK_M, BLOCK_N, False)  # whole tiles: see the epilogue
        t_desc = _descriptor(t_ptr, M, R, stride_tm, BLOCK_M, BLOCK_R, False)
        u_desc = _descriptor(u_ptr, R, N, stride_un if U_T else stride_ur, BLOCK_R, BLOCK_N, U_T)
        if HAS_BIAS:
            bias_desc = tl.make_tensor_descriptor(bias_ptr, shape=[N], strides=[1], block_shape=[BLOCK_N])
    else:
        a_desc = a
        b_desc = b
        p_desc = p
        out_desc = out
    in_dtype = a_desc.dtype
    out_dtype = out_desc.dtype

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    offs_r, mask_r = _tile(0, BLOCK_R, R)

    for tile_id in tl.range(
        tl.program_id(0), num_tiles, NUM_SMS, flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE
    ):  # fmt: skip
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        start_m = pid_m * BLOCK_M
        start_n = pid_n * BLOCK_N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for ki in range(k_tiles):
            start_k = ki * BLOCK_K
            a_tile = a_desc.load([start_m, start_k])  # out-of-bounds rows / columns come in as zeros
            if B_T:
                acc = tl.dot(a_tile, b_desc.load([start_n, start_k]).T, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a_tile, b_desc.load([start_k, start_n]), acc, input_precision=INPUT_PRECISION)
            if FUSE_PROJECT:
                p_tile = p_desc.load([0, start_k]).T if P_T else p_desc.load([start_k, 0])
                t_acc = tl.dot(a_tile, p_tile.to(in_dtype), t_acc, input_precision=INPUT_PRECISION)

        # Epilogue: the LoRA term while the accumulator is fp32, then one store (per half tile if subtiled).
        offs_m, mask_m = _tile(start_m.to(tl.int64), BLOCK_M, M)
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        if FUSE_PROJECT:
            t = t_acc * project_scale
            if pid_n == 0:
                if DEVICE_DESC:
                    t_desc.store([start_m, 0], t)
                else:
                    tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])
        elif DEVICE_DESC:
            t = t_desc.load([start_m, 0])
        else:
            t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        t_op = t * lora_scale if LORA_FP32 else (t * lora_scale).to(in_dtype)
        col_start = start_n.to(tl.int64)
        if DEVICE_DESC:  # no subtiling here: triton 3.6's warp specialization rejects the split
            u = u_desc.load([start_n, 0]).T if U_T else u_desc.load([0, start_n])
            acc = _add_lora(acc, t_op, u.to(t_op.dtype), offs_m, col_start, seed_lo, seed_hi,
                            dropout_threshold, dropout_scale, HAS_DROPOUT, INPUT_PRECISION, BLOCK_N)  # fmt: skip
            if HAS_BIAS:
                acc += bias_desc.load([start_n]).to(tl.float32)[None, :]
            out_desc.store([start_m, start_n], acc.to(out_dtype))
        elif EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            acc0 = _lora_epilogue_ptr(
                acc0, t_op, u_ptr, bias_ptr, offs_m, col_start, N, R, stride_ur, stride_un, stride_bias,
                seed_lo, seed_hi, dropout_threshold, dropout_scale,
                HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION, BLOCK_R, BLOCK_N // 2,
            )  # fmt: skip
            out_desc.store([start_m, start_n], acc0.to(out_dtype))
            acc1 = _lora_epilogue_ptr(
                acc1, t_op, u_ptr, bias_ptr, offs_m, col_start + BLOCK_N // 2, N, R, stride_ur, stride_un,
                stride_bias, seed_lo, seed_hi, dropout_threshold, dropout_scale,
                HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION, BLOCK_R, BLOCK_N // 2,
            )  # fmt: skip
            out_desc.store([start_m, start_n + BLOCK_N // 2], acc1.to(out_dtype))
        else:
            acc = _lora_epilogue_ptr(
                acc, t_op, u_ptr, bias_ptr, offs_m, col_start, N, R, stride_ur, stride_un, stride_bias,
                seed_lo, seed_hi, dropout_threshold, dropout_scale,
                HAS_BIAS, HAS_DROPOUT, INPUT_PRECISION, BLOCK_R, BLOCK_N,
            )  # fmt: skip
            out_desc.store([start_m, start_n], acc.to(out_dtype))


# --------------------------------------------------------------------------------------------------
# Availability, tile configs and the descriptor plan.
# --------------------------------------------------------------------------------------------------

#: The variants, for a routing table: name -> (warp-specialized with device-side descriptors, t in the main
#: loop). ``functools.partial(lora_forward_tma, variant=name)`` is a backend-style forward.
VARIANTS: dict[str, tuple[bool, bool]] = {
    "tma": (False, False),
    "tma_t_fused": (False, True),
    "tma_ws": (True, False),
    "tma_ws_t_fused": (True, True),
}

# Programs of the persistent loop under the interpreter: a few, so that each walks several tiles.
_INTERPRETER_SMS = 3


@functools.cache
def _interpreter_has_descriptors() -> bool:
    from triton.runtime import interpreter

    return hasattr(interpreter.InterpreterBuilder, "create_make_tensor_descriptor")


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def tma_available(device: torch.device | str) -> bool:
    """Whether the TMA kernels can run on ``device``: a CUDA GPU of compute capability 9.0 or newer (Hopper,
    Blackwell) with a triton that has tensor descriptors, or, under the interpreter, a CPU tensor and an
    interpreter that has them (triton 3.6's and 3.8's do)."""
    device = torch.device(device)
    if not _HAS_DESCRIPTORS:
        return False
    if interpreting():
        return device.type == "cpu" and _interpreter_has_descriptors()
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability_ok(device.index if device.index is not None else torch.cuda.current_device())


def tma_gpu_available(device: torch.device) -> bool:
    """The routing's check of the ``tma`` paths (:data:`lora_kernels.ops.routing.PATHS`): a Hopper-class GPU,
    never under the interpreter (``tests/test_triton_tma.py`` runs the kernels there directly)."""
    return device.type == "cuda" and tma_available(device)


def _tma_config(M: int, N: int, K: int, element_size: int, ws: bool, masked: bool = False) -> dict:
    """Preferred tile config of :func:`_lora_linear_tma_kernel`; ``masked``: dX with dropout (the mask in
    the epilogue). Not timed yet: the sweep decides (benchmarks/tma_sweep.py); the sm_90 registers, spills
    and shared memory of each are in benchmarks/NOTES.md ("TMA persistent kernels")."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=_pow2_clamp(K, 16, 64), GROUP_M=2,
                    EPILOGUE_SUBTILE=not ws, num_warps=4, num_stages=1)  # fmt: skip
    half = element_size <= 2
    if ws:  # the sm_90 warp specialization of triton 3.6 takes 4 warps (ignores 8), no subtiled store
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if half else 32, GROUP_M=8, EPILOGUE_SUBTILE=False,
                    num_warps=4, num_stages=2)  # fmt: skip
    if M <= 64:  # decode-sized: one warpgroup's 64 rows, narrow N tiles to spread the weight read over SMs
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128 if half else 64, GROUP_M=1, EPILOGUE_SUBTILE=False,
                    num_warps=4, num_stages=4)  # fmt: skip
    if half and masked:  # ptxas, sm_90: 128x256 with the mask spills (255 registers) and needs 240 KiB of
        # shared memory (the mask's layout conversions), more than an SM's 227 KiB; 128x128: no spills
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPILOGUE_SUBTILE=True,
                    num_warps=8, num_stages=4)  # fmt: skip
    if half:  # LoRAFusion's H100 config; the store subtiled (184 KiB of shared memory instead of 220)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPILOGUE_SUBTILE=True,
                    num_warps=8, num_stages=3)  # fmt: skip
    return dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, EPILOGUE_SUBTILE=True, num_warps=8, num_stages=3
    )


def _row_major(view: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``view`` (rows, cols) as the row-major tensor TMA reads, ``(stored, transposed)``: ``view`` itself if
    its columns are contiguous, ``view.t()`` if its rows are; ``None`` if neither, or if the rows or the
    base are not 16-byte aligned."""
    if view.stride(1) == 1:
        stored, transposed = view, False
    elif view.stride(0) == 1:
        stored, transposed = view.t(), True
    else:
        return None
    aligned = (stored.stride(0) * stored.element_size()) % 16 == 0 and stored.data_ptr() % 16 == 0
    return (stored, transposed) if aligned and stored.numel() > 0 else None


def _descriptor_operands(
    a: torch.Tensor, b: torch.Tensor, project: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, bool], ...] | None:  # fmt: skip
    """The row-major tensors behind ``a`` (M, K), ``b`` (K, N) and ``project`` (K, R), or ``None`` where
    TMA cannot read them (then the caller runs ``triton_lora``'s kernel)."""
    M, K = a.shape
    N = b.shape[1]
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or min(M, N, K) == 0:
        return None
    if a.dtype == torch.float32 and _input_precision(a.dtype) == "ieee" and not interpreting():
        return None  # IEEE fp32 runs on FMA units, not wgmma: 255 registers and KBs of spills at these tiles
    if (N * a.element_size()) % 16:  # the output's rows (allocated contiguous) are stored through TMA
        return None
    views = (a, b) if project is None else (a, b, project)
    stored = tuple(_row_major(v) for v in views)
    if any(s is None for s in stored) or stored[0][1]:  # a (x or dY) must be row-major itself
        return None
    return stored


@contextlib.contextmanager
def _descriptor_allocator(device: torch.device):
    """Device-side descriptors (``tl.make_tensor_descriptor``) need scratch memory from
    ``triton.set_allocator``: a torch allocation on ``device`` for the launches inside, unless the caller
    set an allocator of their own (left in place)."""
    from triton.runtime import _allocation

    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8)
    )
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


# --------------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------------


def _linear_tma(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
    dropout_p: float, seed: int, ws: bool, stored: tuple, *, project_scale: float = 1.0,
    lora_scale: float = 1.0, out_shape: tuple[int, ...] | None = None, num_sms: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`triton_lora._linear_with_lora` (LoRA only) on :func:`_lora_linear_tma_kernel`, ``stored`` from
    :func:`_descriptor_operands`: with a third operand ``project`` (K, R), ``t`` is an output filled with
    ``project_scale · a·project``. ``num_sms``: the persistent programs (default: the GPU's SMs)."""
    M, K = a.shape
    N = b.shape[1]
    R = t.shape[1]
    out = torch.empty((M, N) if out_shape is None else out_shape, device=a.device, dtype=a.dtype)
    out2d = out.view(M, N)
    (a_st, _), (b_st, b_t), *rest = stored
    p_st, p_t = rest[0] if rest else (a_st, False)
    fuse = bool(rest)
    if num_sms is None:
        num_sms = _INTERPRETER_SMS if interpreting() else triton_support._num_sms(a.device.index or 0)
    seed_ptr, threshold, scale = triton_support._dropout_args(dropout_p, seed, out)
    block_r = triton_support._block_r(R)
    u_rows = _row_major(u)
    u_t = u_rows is not None and u_rows[1]
    # the warp-specialized build (fp16/bf16) reads t, u and the bias through TMA too: where they are not
    # aligned for it, the same kernel runs unspecialized on host descriptors
    t_rows = _row_major(t)
    ws = ws and u_rows is not None and t_rows is not None and not t_rows[1]
    ws = ws and a.element_size() == 2  # fp32 (TF32) in the specialized loop: "WGMMA type or shape is not
    # supported" (triton 3.8, sm_90)
    ws = ws and (dropout_p == 0.0 or _WS_TAKES_MASK)
    ws = ws and (bias is None or (bias.stride(0) == 1 and bias.data_ptr() % 16 == 0))
    if ws:  # device-side descriptors: pointers in, described by the kernel
        descs = (a_st, b_st, p_st, out2d)
    else:
        descs = tuple(
            TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16]) for x in (a_st, b_st, p_st, out2d)
        )

    def grid_of(cfg):
        if not ws:  # the host descriptors' boxes follow the config being launched
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            descs[0].block_shape = [bm, bk]
            descs[1].block_shape = [bn, bk] if b_t else [bk, bn]
            descs[2].block_shape = ([block_r, bk] if p_t else [bk, block_r]) if fuse else [bm, bk]
            descs[3].block_shape = [bm, bn // 2 if cfg["EPILOGUE_SUBTILE"] else bn]
        return (min(num_sms, _cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"])),)

    def make():
        cfg = _tma_config(M, N, K, a.element_size(), ws, dropout_p > 0.0)
        return (
            triton_support._Configs(triton_support._smaller_configs(cfg, ("BLOCK_N", "BLOCK_M", "BLOCK_K"))),
        )

    key = ("tma", M, N, K, a.element_size(), ws, dropout_p > 0.0, interpreting(), _tma_config)
    (configs,) = triton_support._plan(key, make)
    allocator = _descriptor_allocator(a.device) if ws else contextlib.nullcontext()
    with allocator:
        triton_support._launch(
            _lora_linear_tma_kernel,
            grid_of,
            configs,
            (
                *descs, t, u, bias if bias is not None else out,
                M, N, K, R,
                a_st.stride(0), b_st.stride(0), p_st.stride(0), t.stride(0), t.stride(1),
                u.stride(0), u.stride(1), bias.stride(0) if bias is not None else 0,
                project_scale, lora_scale, seed_ptr, threshold, scale,
            ),
            dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, FUSE_PROJECT=fuse,
                 LORA_FP32=a.dtype == torch.float16, INPUT_PRECISION=_input_precision(a.dtype),
                 B_T=b_t, P_T=p_t, U_T=u_t, DEVICE_DESC=ws, WARP_SPECIALIZE=ws, NUM_SMS=num_sms,
                 BLOCK_R=block_r),
        )  # fmt: skip
    return out


def _check_variant(variant: str) -> tuple[bool, bool]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown TMA variant {variant!r}; expected one of {list(VARIANTS)}")
    return VARIANTS[variant]


def lora_forward_tma(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, params: LoRAParams, out_shape: tuple[int, ...] | None = None, *,
    variant: str = "tma", num_sms: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``triton_lora.lora_forward`` (same contract: ``(y, t)``) on the TMA persistent kernel ``variant``;
    ``triton_lora``'s kernels where TMA is not available or cannot read the operands."""
    ws, fused = _check_variant(variant)
    fuse = fused and params.dropout_p == 0.0
    stored = (
        _descriptor_operands(x, weight.t(), lora_A.t() if fuse else None) if tma_available(x.device) else None
    )
    if stored is None:
        return _base.lora_forward(x, weight, bias, lora_A, lora_B, params, out_shape)
    M = x.shape[0]
    with _launch_guard(), device_guard(x.device):
        if fuse:
            t = torch.empty((M, lora_A.shape[0]), device=x.device, dtype=torch.float32)
        else:
            t = _project(x, lora_A.t(), 1.0, params.dropout_p, params.seed)
        y = _linear_tma(x, weight.t(), t, lora_B.t(), bias, 0.0, params.seed, ws, stored,
                        lora_scale=params.scaling, out_shape=out_shape, num_sms=num_sms)  # fmt: skip
    return y, t


def lora_grad_x_tma(
    grad_y: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    params: LoRAParams, *, grad_t: torch.Tensor | None = None, variant: str = "tma",
    num_sms: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``dX = dY·W + mask ⊙ (s·dY·B)·A`` (``mask`` x's dropout mask, ``x.dtype`` = ``grad_y.dtype``), the dX of
    ``triton_lora.lora_backward``, and ``grad_t = s·dY·B`` (M, r, fp32), which dA needs.

    ``grad_t`` given (e.g. from the pass over dY that gives dB) is used as is; else the ``*_t_fused``
    variants compute it in the GEMM's main loop and the others by ``triton_reduce``'s projection kernel.
    """
    ws, fused = _check_variant(variant)
    fuse = fused and grad_t is None
    scaling, dropout_p, seed = params.scaling, params.dropout_p, params.seed
    stored = (
        _descriptor_operands(grad_y, weight, lora_B if fuse else None)
        if tma_available(grad_y.device)
        else None
    )
    with _launch_guard(), device_guard(grad_y.device):
        if fuse and stored is not None:
            grad_t = torch.empty(
                (grad_y.shape[0], lora_B.shape[1]), device=grad_y.device, dtype=torch.float32
            )
        elif grad_t is None:
            grad_t = _project(grad_y, lora_B, scaling, 0.0, 0)
            if fuse:  # B's rows were what TMA could not read: the unfused variant may still run
                stored = _descriptor_operands(grad_y, weight, None) if tma_available(grad_y.device) else None
                fuse = False
        if stored is None:
            return _base._linear_with_lora(grad_y, weight, grad_t, lora_A, None, dropout_p, seed), grad_t
        grad_x = _linear_tma(grad_y, weight, grad_t, lora_A, None, dropout_p, seed, ws, stored,
                             project_scale=scaling, num_sms=num_sms)  # fmt: skip
    return grad_x, grad_t


def lora_backward_tma(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    t: torch.Tensor, params: LoRAParams, needs_grad, *, variant: str = "tma",
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """``triton_lora.lora_backward`` (same contract) with dX on the TMA kernel ``variant``: dB and db from
    the same pass over dY (with ``s·dY·B`` unless the variant computes it in the dX GEMM), dA from it."""
    need_x, _, need_bias, need_A, need_B = needs_grad
    fused = _check_variant(variant)[1]
    if not need_x or not tma_available(grad_y.device):
        return _base.lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, needs_grad)
    with _launch_guard(), device_guard(grad_y.device):
        grad_t, grad_B, grad_bias, _ = _grad_y_pass(  # dB and db cast in the kernels' stores
            grad_y, None if fused else lora_B, t, params.scaling, need_B or need_bias, need_bias,
            dtypes=(lora_B.dtype, grad_y.dtype),
        )  # fmt: skip
    grad_x, grad_t = lora_grad_x_tma(grad_y, weight, lora_A, lora_B, params, grad_t=grad_t, variant=variant)
    grad_A = None
    with _launch_guard(), device_guard(grad_y.device):
        if need_A:
            grad_A = _reduce_rows(
                x, grad_t, params.dropout_p, params.seed, with_colsum=False, out_dtype=lora_A.dtype,
                transposed=True,
            )[0]  # fmt: skip
    grad_B = grad_B if need_B else None
    grad_bias = grad_bias if need_bias else None
    return grad_x, grad_A, grad_B, grad_bias


def tma_unavailable(device: torch.device) -> str | None:
    """Why the TMA variants cannot run on ``device`` (for a routing table's ``unavailable``), or ``None``."""
    return None if tma_available(device) else "needs a GPU of compute capability >= 9.0 and triton with TMA"


#: ``{variant: (forward, backward)}`` with the backend interface's signatures (lora_kernels/ops/__init__.py):
#: a routing registry entry per variant, e.g. ``Path("tma_ws", "triton", "triton_tma", "forward_tma_ws",
#: "backward_tma_ws", tma_unavailable)``.
PATH_FUNCTIONS = {
    name: (
        functools.partial(lora_forward_tma, variant=name),
        functools.partial(lora_backward_tma, variant=name),
    )
    for name in VARIANTS
}
forward_tma, backward_tma = PATH_FUNCTIONS["tma"]
forward_tma_t_fused, backward_tma_t_fused = PATH_FUNCTIONS["tma_t_fused"]
forward_tma_ws, backward_tma_ws = PATH_FUNCTIONS["tma_ws"]
forward_tma_ws_t_fused, backward_tma_ws_t_fused = PATH_FUNCTIONS["tma_ws_t_fused"]
