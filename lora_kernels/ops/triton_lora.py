"""The Triton backend: the GEMM with the LoRA term in its epilogue (forward and dX), and the split path.

Read top to bottom: the ``@triton.jit`` GEMM :func:`_lora_linear_kernel`, its tile config, its launcher,
then :func:`lora_forward` / :func:`lora_backward` (the backend interface of :mod:`lora_kernels.ops`), the
split path (:func:`split_forward` / :func:`split_backward`, lora_kernels/ops/routing.py) and the DoRA
functions of the interface. The backend's other kernels are :mod:`.triton_reduce`'s (the skinny projection
``t = dropout(x)·Aᵀ``, ``s·dY·B``, and the row reductions that give dA, dB and db) and :mod:`.triton_dora`'s
(DoRA's norm); the ``@triton.jit`` helpers they share are in :mod:`.triton_tiles`, the launch support in
:mod:`.triton_support`.

No M×N temporary is written: the LoRA term lives only in registers. The dropout mask is regenerated from
``(seed, row, col)`` wherever it is needed (forward projection, ``dA``, ``dX`` epilogue) and never stored;
the seed is read by each program from the int64 seed tensor (``seed_ptr``), never passed as a number, so
a CUDA graph replays with the seed drawn on the device at that replay.
All offsets are int64, so tensors over 2**31 elements do not wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from . import DoRANeedsGrad, LoRAParams, NeedsGrad, device_guard, seed_on, triton_support
from .triton_dora import dora_weight_norm as dora_weight_norm
from .triton_reduce import _grad_y_pass, _project, _reduce_rows
from .triton_support import (
    _block_r,
    _cdiv,
    _Configs,
    _dropout_args,
    _input_precision,
    _launch_guard,
    _plan,
    _pow2_clamp,
    _smaller_configs,
)
from .triton_tiles import (
    _add_lora,
    _epilogue_operands,
    _masked_add,
    _seed_words,
    _store_with_bias,
    _tile,
    _tile_coords,
)


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


# --------------------------------------------------------------------------------------------------
# Tile configs (lora_kernels/ops/triton_support.py: chosen by a function of the shape, one config under the
# interpreter). The compiled ones were chosen from the sweep of benchmarks/gpu_run.sh on an H200 (bf16,
# r = 16, benchmarks/results/h200/, benchmarks/NOTES.md); shapes and dtypes the sweep did not cover keep the
# Triton-tutorial defaults they had before.
# --------------------------------------------------------------------------------------------------


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


def _fuse_projection(M: int, N: int, K: int, r: int) -> bool:
    """Whether the forward GEMM computes ``t = x·Aᵀ`` in its own main loop instead of a separate kernel.

    Measured on an H200 (bf16, 4096x4096, r = 16; benchmarks/NOTES.md): the fused forward took 0.493 ms
    against 0.556 at M = 8192 and 0.054 against 0.095 at M = 16 (one launch less), so the forward fuses
    whenever it can (no dropout: the kernel's main loop reads ``x`` undropped). The same fusion in dX
    (``s·dY·B`` in the dX GEMM) was slower, 0.661 ms against 0.509, so the backward never fuses.
    """
    return True


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
    triton_support._launch(
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
# The split path (lora_kernels/ops/routing.py): the skinny kernels of triton_reduce.py for t and the
# gradients, the LoRA term written into the output's storage, and the base GEMM accumulated into it by
# cuBLAS (torch's addmm_ with beta = 1; on CPU tensors, under the interpreter, torch's CPU GEMM).
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
# DoRA (see lora_kernels/ops/__init__.py): the GEMM and the row reductions with their DoRA options, and the
# norm ‖W + s·B·A‖ of lora_kernels/ops/triton_dora.py.
# --------------------------------------------------------------------------------------------------


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
