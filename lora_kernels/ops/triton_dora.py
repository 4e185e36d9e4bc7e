"""DoRA's own Triton kernel, the norm ``‖W + s·B·A‖`` of each output row, and its launcher.

DoRA's forward and backward need no kernel of their own: they are the GEMM's and the row reductions' DoRA
options (``dora_forward`` / ``dora_backward`` in :mod:`.triton_lora`, which offers them with
:func:`dora_weight_norm` as the backend's DoRA functions, lora_kernels/ops/__init__.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from . import device_guard, triton_support
from .triton_support import _block_r, _cdiv, _Configs, _launch_guard, _pow2_clamp, _smaller_configs
from .triton_tiles import _tile


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
        triton_support._launch(
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
