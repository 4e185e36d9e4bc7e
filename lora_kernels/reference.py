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


def dora_weight_norm_reference(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W + s·B·A‖`` per output row, in float64, detached: DoRA's column norm (the paper's ``‖V + ΔV‖_c``;
    PEFT's weight is ``(out, in)``, so its "columns" are our rows)."""
    with torch.no_grad():
        merged = weight.double() + scaling * (lora_B.double() @ lora_A.double())
        return torch.linalg.vector_norm(merged, dim=1)


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's linear in float64, op by op, from PEFT's semantics (``DoraLinearVariant`` / ``DoraLinearLayer``).

    With ``n = ‖W + s·B·A‖`` per output row, *detached* (DoRA paper §4.3: no gradient flows through the
    norm), and ``c = m / n``:

    * without dropout: ``y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``;
    * with dropout, ``x̃ = x ⊙ mask``: ``y = x·Wᵀ + b + (c − 1) ⊙ (x̃·Wᵀ) + c ⊙ s·(x̃·Aᵀ)·Bᵀ`` (PEFT applies
      the magnitude to the base product of the *dropped* input; the undropped base output stays as is).

    Differentiable in ``x``, ``weight``, ``bias``, ``lora_A``, ``lora_B`` and ``magnitude`` (the gradient
    oracle of the tests). Returns float64.
    """
    x, weight, lora_A, lora_B, magnitude = (t.double() for t in (x, weight, lora_A, lora_B, magnitude))
    bias = bias.double() if bias is not None else None
    col_scale = magnitude / dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    if dropout_mask is None:
        dora = torch.nn.functional.linear(x, weight) + ((x @ lora_A.t()) @ lora_B.t()) * scaling
        return dora * col_scale + (bias if bias is not None else 0.0)
    x_dropped = x * dropout_mask.double()
    base = torch.nn.functional.linear(x, weight, bias)
    lora = ((x_dropped @ lora_A.t()) @ lora_B.t()) * scaling
    return base + (col_scale - 1) * torch.nn.functional.linear(x_dropped, weight) + col_scale * lora
