"""Pure-PyTorch LoRA linear: the oracle for every test and benchmark, and the specification of the op."""

from __future__ import annotations

import torch


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """``y = x·Wᵀ + b + s·((x ⊙ mask)·Aᵀ)·Bᵀ``, written op by op as PEFT computes it.

    Args:
        x: input of shape ``(..., in_features)``.
        weight: base weight ``(out_features, in_features)``.
        bias: base bias ``(out_features,)`` or ``None``.
        lora_A: adapter ``(r, in_features)``.
        lora_B: adapter ``(out_features, r)``.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_mask: same shape as ``x``, already scaled by ``1 / (1 - p)`` (see
            :func:`lora_kernels.dropout_mask`); ``None`` means no dropout.
        upcast: compute everything in float64 and return float64 (the test oracle).
    """
    if upcast:
        x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
        dropout_mask = dropout_mask.double() if dropout_mask is not None else None
    base = torch.nn.functional.linear(x, weight, bias)
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    x_lora = x_lora.to(lora_A.dtype)
    lora = (x_lora @ lora_A.t()) @ lora_B.t() * scaling
    return (base + lora).to(base.dtype)
