"""The Triton backend: three kernels cover the whole fused LoRA linear, forward and backward.

Read top to bottom: the Philox dropout helper, the three ``@triton.jit`` kernels, the tile configs, the
launchers, then :func:`lora_forward` / :func:`lora_backward` (the backend interface of
:mod:`lora_kernels.ops`).

==========================  ===============================================  ==============================
kernel                      computes                                         used for
==========================  ===============================================  ==============================
``_lora_linear_kernel``     ``out = a·b + [mask ⊙] (t·u) + bias``             ``y`` (forward), ``dX``
                            (GEMM; the LoRA term added to the fp32
                            accumulator in the epilogue, one store)
``_lora_project_kernel``    ``out = s·dropout(a)·b`` with ``b`` r columns    ``t`` (forward), ``s·dY·B``
``_lora_reduce_rows_kernel````out = dropout(a)ᵀ·c``, ``colsum = Σ_rows a``     ``dB`` + ``dbias``, ``dA``
                            (reduction over the M rows, split in fixed
                            chunks and summed in a fixed order)
==========================  ===============================================  ==============================

No M×N temporary is written: the LoRA term lives only in registers. The dropout mask is regenerated from
``(seed, row, col)`` wherever it is needed (forward projection, ``dA``, ``dX`` epilogue) and never stored.
All offsets are int64, so tensors over 2**31 elements do not wrap.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import dropout
from ..dispatch import interpreting
from ..dropout import dropout_threshold, split_seed

# Globals read inside @triton.jit functions must be constexpr.
_PHILOX_ROUNDS = tl.constexpr(dropout.PHILOX_ROUNDS)
_PHILOX_MUL_0 = tl.constexpr(dropout.PHILOX_MUL_0)
_PHILOX_MUL_1 = tl.constexpr(dropout.PHILOX_MUL_1)
_PHILOX_KEY_BUMP_0 = tl.constexpr(dropout.PHILOX_KEY_BUMP_0)
_PHILOX_KEY_BUMP_1 = tl.constexpr(dropout.PHILOX_KEY_BUMP_1)


@triton.jit
def _dropout_keep(rows, cols, seed_lo, seed_hi, threshold):
    """Boolean keep-mask of the shared Philox scheme (see lora_kernels/dropout.py) at ``(rows, cols)``."""
    c0 = (cols + rows * 0).to(tl.uint32)
    c1 = (rows + cols * 0).to(tl.uint32)
    c2 = ((rows + cols * 0) >> 32).to(tl.uint32)
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
    return (c0 >> 8).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_threshold"])
def _lora_linear_kernel(
    a_ptr, b_ptr, t_ptr, u_ptr, p_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_tm, stride_tr, stride_ur, stride_un, stride_pk, stride_pr,
    stride_om, stride_on,
    project_scale, seed_lo, seed_hi, dropout_threshold, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_PROJECT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = a[M, K]·b[K, N] + mask ⊙ (t[M, R]·u[R, N]) + bias[N]``, fp32 accumulation, one store.

    Forward: ``a = x``, ``b = Wᵀ``, ``t = s·dropout(x)·Aᵀ``, ``u = Bᵀ``, bias, no mask.
    dX:      ``a = dY``, ``b = W``, ``t = s·dY·B``, ``u = A``, no bias, the dropout mask of x.

    With ``FUSE_PROJECT`` the kernel computes ``t = project_scale · a·p`` itself in the main loop, from the
    ``a`` tiles it loads anyway (``p`` is ``Aᵀ`` or ``B``, K×R; no dropout on ``a``), and the programs of
    the first column of tiles store it to ``t_ptr`` for the backward: no separate pass over ``a``, at the
    price of R/BLOCK_N more MMA work.
    """
    # Grouped ordering of the output tiles (Triton tutorial 03) so neighbouring programs share L2 tiles.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    in_dtype = a_ptr.dtype.element_ty
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    p_ptrs = p_ptr + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if FUSE_PROJECT:
            p = tl.load(p_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            t_acc = tl.dot(a, p.to(in_dtype), t_acc, input_precision=INPUT_PRECISION)
            p_ptrs += BLOCK_K * stride_pk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue: the LoRA term, added while the accumulator is still fp32.
    if FUSE_PROJECT:
        t = t_acc * project_scale
        if pid_n == 0:
            tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])
    else:
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    u = tl.load(
        u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    if HAS_DROPOUT:
        lora = tl.dot(t.to(in_dtype), u.to(in_dtype), input_precision=INPUT_PRECISION)
        keep = _dropout_keep(offs_m[:, None], offs_n[None, :], seed_lo, seed_hi, dropout_threshold)
        acc += lora * (keep.to(tl.float32) * dropout_scale)  # a product, not a select: NaN·0 stays NaN
    else:
        acc = tl.dot(t.to(in_dtype), u.to(in_dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_threshold"])
def _lora_project_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, R,
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    scale, seed_lo, seed_hi, dropout_threshold,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``out[M, R] = scale · dropout(a)[M, K] · b[K, R]`` in fp32 (R ≤ 256: the skinny side of LoRA).

    Forward: ``a = x``, ``b = Aᵀ`` gives ``t``. Backward: ``a = dY``, ``b = B`` gives ``s·dY·B``.
    ``scale`` already holds the dropout's ``1 / (1 - p)``.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    in_dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            keep = _dropout_keep(offs_m[:, None], offs_k[None, :], seed_lo, seed_hi, dropout_threshold)
            a = a * keep.to(a.dtype)  # multiply as x·mask does, so a dropped NaN still propagates
        b = tl.load(
            b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_r[None, :] * stride_br,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b.to(in_dtype), acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc * scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_threshold"])
def _lora_reduce_rows_kernel(
    a_ptr, c_ptr, out_ptr, colsum_ptr,
    M, P, R, rows_per_split,
    stride_am, stride_ap, stride_cm, stride_cr,
    scale, seed_lo, seed_hi, dropout_threshold,
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial sums over one chunk of rows: ``out[split, P, R] = scale · dropout(a)ᵀ · c``, fp32.

    ``colsum[split, P] = Σ_rows a`` rides along on the same loads. The host sums the splits in a fixed
    order, so the result is deterministic (no atomics).
    dB + dbias: ``a = dY``, ``c = t``. dA (transposed): ``a = x`` with its dropout, ``c = s·dY·B``.
    """
    pid_p = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    in_dtype = a_ptr.dtype.element_ty
    row_start = pid_split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m in range(0, tl.cdiv(rows_per_split, BLOCK_M)):
        offs_m = row_start + m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        a_t = tl.load(  # the (P, M) transpose of a's tile, read straight from a's strides
            a_ptr + offs_p[:, None] * stride_ap + offs_m[None, :] * stride_am,
            mask=mask_p[:, None] & mask_m[None, :],
            other=0.0,
        )
        if HAS_COLSUM:
            colsum += tl.sum(a_t.to(tl.float32), axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(offs_m[None, :], offs_p[:, None], seed_lo, seed_hi, dropout_threshold)
            a_t = a_t * keep.to(a_t.dtype)
        c = tl.load(
            c_ptr + offs_m[:, None] * stride_cm + offs_r[None, :] * stride_cr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = tl.dot(a_t, c.to(in_dtype), acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + pid_split.to(tl.int64) * P * R + offs_p[:, None] * R + offs_r[None, :]
    tl.store(out_ptrs, acc * scale, mask=mask_p[:, None] & mask_r[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + pid_split.to(tl.int64) * P + offs_p, colsum, mask=mask_p)


# --------------------------------------------------------------------------------------------------
# Tile configs: chosen by a function of the shape (no runtime autotuning), one config under the
# interpreter, where the cost grows with programs × loop trips and big blocks are cheapest.
# --------------------------------------------------------------------------------------------------


# Triton's interpreter patches triton.language globally while it runs a kernel, so two threads interpreting at
# once break each other; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch_guard() -> contextlib.AbstractContextManager:
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _linear_config(M: int, N: int, K: int, element_size: int) -> dict:
    """Preferred tile config for :func:`_lora_linear_kernel` (GEMM + LoRA epilogue)."""
    if interpreting():
        return dict(
            BLOCK_M=_pow2_clamp(M, 16, 128),
            BLOCK_N=_pow2_clamp(N, 16, 128),
            BLOCK_K=_pow2_clamp(K, 16, 128),
            GROUP_M=1,
            num_warps=4,
            num_stages=1,
        )
    block_k = 64 if element_size <= 2 else 32
    if M <= 64:  # decode-sized batches: the weight read dominates, so narrow M tiles and wide N
        return dict(BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=128, BLOCK_K=block_k * 2 if element_size <= 2 else block_k,
                    GROUP_M=1, num_warps=4, num_stages=4)  # fmt: skip
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _skinny_config(rows: int, inner: int, r: int) -> dict:
    """Preferred tile config for the skinny projection / row-reduction kernels (``r`` columns)."""
    block_r = _block_r(r)
    if interpreting():
        return dict(BLOCK_M=_pow2_clamp(rows, 16, 128), BLOCK_K=_pow2_clamp(inner, 16, 128),
                    BLOCK_R=block_r, num_warps=4, num_stages=1)  # fmt: skip
    block_m = 64 if block_r <= 64 else 32
    return dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=block_r, num_warps=4, num_stages=3)


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


# The first config that fitted, per kernel and compile-time signature, so the search runs once.
_FITTING_CONFIG: dict[tuple, int] = {}


def _launch(kernel, grid_of, configs: list[dict], args: tuple, constexprs: dict) -> dict:
    """Launch ``kernel`` with the first of ``configs`` that fits the GPU's resources; returns that config."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    key = (getattr(kernel, "__name__", repr(kernel)), str(tensors[0].device), *sorted(constexprs.items()),
           *(str(t.dtype) for t in tensors), tuple(sorted(configs[0].items())))  # fmt: skip
    start = _FITTING_CONFIG.get(key, 0)
    for index in range(start, len(configs)):
        cfg = configs[index]
        try:
            kernel[grid_of(cfg)](*args, **constexprs, **cfg)
        except OutOfResources:  # raised when the kernel is loaded, before anything runs
            continue
        _FITTING_CONFIG[key] = index
        return cfg
    raise RuntimeError(f"no tile config of {key[0]} fits this GPU's shared memory / registers: {configs}")


def _row_splits(M: int, num_blocks: int, block_m: int, device: torch.device) -> int:
    """How many chunks the row reduction splits M into, so that the grid fills the GPU (>= 4 row blocks each)."""
    if interpreting() or device.type != "cuda":
        return 1
    return max(1, min(triton.cdiv(M, block_m * 4), triton.cdiv(2 * _num_sms(device.index or 0), num_blocks)))


def _fuse_projection(M: int, N: int, K: int, r: int) -> bool:
    """Whether the GEMM computes the skinny ``a·p`` in its own main loop instead of a separate kernel.

    Fusing saves a pass over ``a`` (and a launch) but costs R/BLOCK_N more MMA work in every tile. Off until
    GPU measurements pick the shapes where it wins (benchmarks/NOTES.md).
    """
    return False


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where torch itself would (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, int, float]:
    seed_lo, seed_hi = split_seed(seed)
    scale = 1.0 / (1.0 - dropout_p)
    return seed_lo, seed_hi, dropout_threshold(dropout_p), scale


# --------------------------------------------------------------------------------------------------
# Launchers: 2-D tensors in, freshly allocated results out. Operands are passed as strided views, so
# transposes (Wᵀ, Aᵀ, Bᵀ) cost nothing.
# --------------------------------------------------------------------------------------------------


def _linear_with_lora(
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    project: torch.Tensor | None = None,
    project_scale: float = 1.0,
) -> torch.Tensor:
    """``a·b + [mask ⊙] t·u + bias`` with ``a`` (M, K), ``b`` (K, N), ``t`` (M, R), ``u`` (R, N).

    With ``project`` (K, R), ``t`` is an output: the kernel fills it with ``project_scale · a·project``.
    """
    M, K = a.shape
    N = b.shape[1]
    R = t.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        if project is not None and M > 0:  # N == 0: nothing to fuse into, t is still owed
            t.copy_(torch.mm(a, project.to(a.dtype)).float().mul_(project_scale))
        return out
    seed_lo, seed_hi, threshold, scale = _dropout_args(dropout_p, seed)
    p = project if project is not None else t
    _launch(
        _lora_linear_kernel,
        lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),),
        _smaller_configs(_linear_config(M, N, K, a.element_size()), ("BLOCK_N", "BLOCK_M", "BLOCK_K")),
        (
            a, b, t, u, p, bias if bias is not None else out, out,
            M, N, K, R,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            t.stride(0), t.stride(1), u.stride(0), u.stride(1), p.stride(0), p.stride(1),
            out.stride(0), out.stride(1),
            project_scale, seed_lo, seed_hi, threshold, scale,
        ),
        dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, FUSE_PROJECT=project is not None,
             INPUT_PRECISION=_input_precision(a.dtype), BLOCK_R=_block_r(R)),
    )  # fmt: skip
    return out


def _project(a: torch.Tensor, b: torch.Tensor, scale: float, dropout_p: float, seed: int) -> torch.Tensor:
    """``scale · dropout(a)·b`` in fp32, ``a`` (M, K), ``b`` (K, R)."""
    M, K = a.shape
    R = b.shape[1]
    out = torch.empty((M, R), device=a.device, dtype=torch.float32)
    if M == 0:
        return out
    seed_lo, seed_hi, threshold, dropout_scale = _dropout_args(dropout_p, seed)
    if dropout_p > 0.0:
        scale = scale * dropout_scale
    _launch(
        _lora_project_kernel,
        lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]),),
        _smaller_configs(_skinny_config(M, K, R), ("BLOCK_M", "BLOCK_K")),
        (
            a, b, out,
            M, K, R,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            scale, seed_lo, seed_hi, threshold,
        ),
        dict(HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=_input_precision(a.dtype)),
    )  # fmt: skip
    return out


def _reduce_rows(
    a: torch.Tensor, c: torch.Tensor, dropout_p: float, seed: int, with_colsum: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dropout(a)ᵀ·c`` (P, R) and optionally ``a.sum(0)`` (P,), both fp32, ``a`` (M, P), ``c`` (M, R)."""
    M, P = a.shape
    R = c.shape[1]
    cfg = _skinny_config(M, P, R)
    cfg["BLOCK_P"] = cfg.pop("BLOCK_K")
    splits = _row_splits(M, triton.cdiv(P, cfg["BLOCK_P"]), cfg["BLOCK_M"], a.device)
    rows_per_split = triton.cdiv(max(M, 1), splits * cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(max(M, 1), rows_per_split)
    partial = torch.empty((splits, P, R), device=a.device, dtype=torch.float32)
    colsum = torch.empty((splits, P), device=a.device, dtype=torch.float32) if with_colsum else None
    seed_lo, seed_hi, threshold, scale = _dropout_args(dropout_p, seed)
    if dropout_p == 0.0:
        scale = 1.0
    if P > 0:  # a smaller BLOCK_M only adds loop trips: the row splits stay as computed here
        _launch(
            _lora_reduce_rows_kernel,
            lambda cfg: (triton.cdiv(P, cfg["BLOCK_P"]), splits),
            _smaller_configs(cfg, ("BLOCK_P", "BLOCK_M")),
            (
                a, c, partial, colsum if colsum is not None else partial,
                M, P, R, rows_per_split,
                a.stride(0), a.stride(1), c.stride(0), c.stride(1),
                scale, seed_lo, seed_hi, threshold,
            ),
            dict(HAS_DROPOUT=dropout_p > 0.0, HAS_COLSUM=with_colsum, INPUT_PRECISION=_input_precision(a.dtype)),
        )  # fmt: skip
    if splits == 1:
        return partial[0], None if colsum is None else colsum[0]
    return partial.sum(0), None if colsum is None else colsum.sum(0)


# --------------------------------------------------------------------------------------------------
# The backend interface (see lora_kernels/ops/__init__.py).
# --------------------------------------------------------------------------------------------------


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x·Wᵀ + b + t·Bᵀ`` with ``t = s·dropout(x)·Aᵀ`` (float32, returned for backward)."""
    M, K = x.shape
    with _launch_guard():
        if dropout_p == 0.0 and _fuse_projection(M, weight.shape[0], K, lora_A.shape[0]):
            t = torch.empty((M, lora_A.shape[0]), device=x.device, dtype=torch.float32)
            y = _linear_with_lora(x, weight.t(), t, lora_B.t(), bias, 0.0, seed, lora_A.t(), scaling)
        else:
            t = _project(x, lora_A.t(), scaling, dropout_p, seed)
            y = _linear_with_lora(x, weight.t(), t, lora_B.t(), bias, 0.0, seed)
    return y, t


def lora_backward(
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
    """Gradients of :func:`lora_forward` for ``(x, weight, bias, lora_A, lora_B)``."""
    need_x, need_weight, need_bias, need_A, need_B = needs_grad
    grad_x = grad_weight = grad_bias = grad_A = grad_B = None
    M, N = grad_y.shape
    K, R = x.shape[1], lora_A.shape[0]
    with _launch_guard():
        # s·dY·B, (M, r) fp32: computed inside the dX kernel when fused, else by its own pass over dY
        if need_x and _fuse_projection(M, K, N, R):
            grad_t = torch.empty((M, R), device=grad_y.device, dtype=torch.float32)
            grad_x = _linear_with_lora(grad_y, weight, grad_t, lora_A, None, dropout_p, seed, lora_B, scaling)
        elif need_x or need_A:
            grad_t = _project(grad_y, lora_B, scaling, 0.0, seed)
        if need_x and grad_x is None:
            grad_x = _linear_with_lora(grad_y, weight, grad_t, lora_A, None, dropout_p, seed)
        if need_A:
            grad_A_t, _ = _reduce_rows(x, grad_t, dropout_p, seed, with_colsum=False)
            grad_A = grad_A_t.t().to(lora_A.dtype)
        if need_B or need_bias:
            grad_B, grad_bias = _reduce_rows(grad_y, t, 0.0, seed, with_colsum=need_bias)
            grad_B = grad_B.to(lora_B.dtype) if need_B else None
            grad_bias = grad_bias.to(grad_y.dtype) if need_bias else None
    if need_weight:
        grad_weight = torch.mm(grad_y.t(), x)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B
