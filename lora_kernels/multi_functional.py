"""Many LoRA adapters over one base layer in one fused call: :func:`multi_lora_linear`.

The grouped op of :mod:`lora_kernels.ops.multi_lora`: a mixed batch (each row takes one adapter or none,
PEFT's ``adapter_names=``, Punica's SGMV) or several adapters active on every row (PEFT's
``set_adapter([...])``), with one base GEMM for the whole batch and each adapter's own rank, scaling and
dropout. Training works too: each adapter's gradients come from its own rows only, and equal those of a
call of that adapter alone on those rows (:func:`lora_kernels.lora_linear`), dropout masks included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .dropout import check_seed_value
from .functional import _autocast_inputs, _backend_for, _check_real, _composite_needed, _describe
from .library import MultiLoRALinearFunction
from .ops.multi_lora import (
    AdapterGroups,
    MultiLoRAParams,
    composite_terms,
    groups_all_active,
    groups_from_ids,
    groups_from_names,
    groups_from_segments,
)

__all__ = ["AdapterTerm", "multi_lora_linear"]


class AdapterTerm(NamedTuple):
    """One adapter of :func:`multi_lora_linear`: ``lora_A`` (r, in), ``lora_B`` (out, r), its ``scaling``
    (``lora_alpha / r``) and the dropout rate on its input (applied in training only)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float = 0.0


def multi_lora_linear(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, adapters: Sequence[AdapterTerm | tuple], *,
    adapter_ids: Tensor | Sequence[int] | AdapterGroups | None = None, segments: Sequence[tuple[int, int]] | None = None,
    training: bool = False, dropout_seeds: int | Sequence[int] | Tensor | None = None,
    base_output: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``y = x·Wᵀ + b + Σ_a s_a·(drop_a(x_a)·A_aᵀ)·B_aᵀ``: one base GEMM, adapter ``a`` on its rows ``x_a``.

    Args:
        x: ``(..., in_features)``; rows are ``x.reshape(-1, in_features)``.
        weight, bias: the base layer (as :func:`lora_kernels.lora_linear`); both ``None`` with ``base_output``.
        adapters: :class:`AdapterTerm` ``(lora_A, lora_B, scaling[, dropout_p])`` each; ranks may differ.
        adapter_ids: which adapter each row takes, ``-1`` for none (the base output alone, PEFT's
            ``"__base__"``): an int tensor of ``x.shape[:-1]`` (per row) or ``(x.shape[0],)`` (per sample, as
            PEFT's ``adapter_names``), or a list of ints per sample or row (read on the host: no device sync),
            or :class:`~lora_kernels.ops.multi_lora.AdapterGroups` made once for many calls. A tensor's counts
            are read on the host (one sync on a GPU).
        segments: instead, ``(adapter, rows)`` runs of consecutive rows covering the batch in order
            (adapter ``-1``: base rows), e.g. ``[(0, 4096), (1, 2048), (-1, 2048)]``.
            Neither given: every adapter applies to every row, the terms summed (several active adapters).
        training: apply each adapter's dropout.
        dropout_seeds: the adapters' mask seeds: a sequence of ``n`` ints, an ``(n,)`` int64 tensor, or an
            int ``s`` (adapter ``a`` then takes ``s + a``); default drawn on the device (one ``randint``).
            Adapter ``a``'s mask is ``lora_kernels.dropout_mask(seeds[a], (m_a, in_features), p_a)`` over
            its ``m_a`` rows in batch order: the mask a single-adapter call on those rows would apply.
        base_output: the base layer's output ``(..., out_features)`` where the op does not compute it
            (a base that is another tuner layer, or has hooks): the terms are added to a copy of it (in
            ``x``'s dtype, autocast's under ``torch.autocast``), and the result has ``base_output``'s dtype.

    Returns:
        ``(..., out_features)`` in ``x.dtype``, a new tensor. Gradients flow to ``x``, every adapter's
        ``lora_A``/``lora_B`` (from its own rows only), ``weight``/``bias`` if they require them, and
        ``base_output``.

    Eager calls run the fused autograd on the backend :func:`lora_kernels.lora_linear` would pick
    (Triton: SGMV-style shrink/expand kernels; torch: per-adapter GEMMs on views of the rows); under
    ``torch.func`` transforms, forward-mode AD, ``torch.compile`` and on meta tensors the same math runs as
    plain torch ops. Reading a tensor's ``adapter_ids`` on the host is a graph break under ``torch.compile``.
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    terms = _check(x, weight, bias, adapters, base_output)
    rows = math.prod(x.shape[:-1])
    groups = _groups(x, rows, len(terms), adapter_ids, segments)
    ps = tuple(float(t.dropout_p) if training else 0.0 for t in terms)
    seeds = _seeds(dropout_seeds, len(terms), x.device) if any(p > 0.0 for p in ps) else None
    params = MultiLoRAParams(tuple(float(t.scaling) for t in terms), ps, seeds)
    pairs = [(t.lora_A, t.lora_B) for t in terms]
    flat = [tensor for pair in pairs for tensor in pair]
    if torch.compiler.is_compiling() or _composite_needed(x, weight, bias, base_output, *flat):
        x2d = x.reshape(rows, x.shape[-1])
        if base_output is None:
            base = torch.nn.functional.linear(x2d, weight, bias)
        else:
            base = base_output.reshape(rows, -1).to(x.dtype)
        y = (base + composite_terms(x2d, pairs, groups, params)).reshape(*x.shape[:-1], -1)
    else:
        backend = _backend_for(x.device, x.dtype, max(A.shape[0] for A, _ in pairs))
        y = MultiLoRALinearFunction.apply(x, weight, bias, base_output, groups, params, backend, *flat)
    if base_output is not None and base_output.dtype != y.dtype:  # the base layer's dtype, as PEFT returns
        y = y.to(base_output.dtype)
    return y


def _check(x, weight, bias, adapters, base_output) -> list[AdapterTerm]:
    """The adapters as :class:`AdapterTerm`, after checking every argument (errors name it)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor (..., in_features), got {type(x).__name__}")
    in_features = x.shape[-1]
    if base_output is None:
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != in_features:
            raise ValueError(f"weight must be (out_features, in_features={in_features}), got {weight!r:.80}")
        out_features = weight.shape[0]
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and (t.dtype != x.dtype or t.device != x.device):
                raise TypeError(f"{_describe(name, t)} must have the dtype and device of {_describe('x', x)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"{_describe('bias', bias)} must be (out_features={out_features},)")
    else:
        if weight is not None or bias is not None:
            raise ValueError("pass either weight/bias or base_output, not both")
        if not isinstance(base_output, Tensor) or tuple(base_output.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(
                f"base_output must be (..., out_features) with x's leading dims {tuple(x.shape[:-1])}"
            )
        out_features = base_output.shape[-1]
    if isinstance(adapters, (Tensor, AdapterTerm)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError("adapters must be a non-empty sequence of (lora_A, lora_B, scaling[, dropout_p])")
    terms = []
    for i, adapter in enumerate(adapters):
        term = AdapterTerm(*adapter)
        A, B = term.lora_A, term.lora_B
        if not (
            isinstance(A, Tensor)
            and isinstance(B, Tensor)
            and A.is_floating_point()
            and B.is_floating_point()
        ):
            raise TypeError(f"adapters[{i}]: lora_A and lora_B must be floating-point tensors")
        if A.dim() != 2 or A.shape[1] != in_features or A.shape[0] < 1:
            raise ValueError(
                f"adapters[{i}]: {_describe('lora_A', A)} must be (r, in_features={in_features})"
            )
        if tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(
                f"adapters[{i}]: {_describe('lora_B', B)} must be (out_features={out_features}, r={A.shape[0]})"
            )
        if A.device != x.device or B.device != x.device or A.dtype != B.dtype:
            raise ValueError(f"adapters[{i}]: lora_A and lora_B must share one dtype and x's device")
        _check_real(f"adapters[{i}].scaling", term.scaling)
        _check_real(f"adapters[{i}].dropout_p", term.dropout_p)
        if not -math.inf < term.scaling < math.inf:
            raise ValueError(f"adapters[{i}].scaling must be finite, got {term.scaling!r}")
        if not 0.0 <= term.dropout_p < 1.0:
            raise ValueError(f"adapters[{i}].dropout_p must be in [0, 1), got {term.dropout_p!r}")
        terms.append(term)
    return terms


def _groups(x: Tensor, rows: int, n: int, adapter_ids, segments) -> AdapterGroups:
    if adapter_ids is not None and segments is not None:
        raise ValueError("pass adapter_ids or segments, not both")
    if segments is not None:
        return groups_from_segments(segments, n, rows, x.device)
    if adapter_ids is None:
        return groups_all_active(n, rows, x.device)
    leading = tuple(x.shape[:-1])
    if isinstance(adapter_ids, AdapterGroups):  # made once for many layers (MultiLoRALinear)
        if adapter_ids.num_rows != rows or adapter_ids.num_adapters != n:
            raise ValueError(
                f"these AdapterGroups are for {adapter_ids.num_rows} rows and {adapter_ids.num_adapters} "
                f"adapters, not {rows} and {n}"
            )
        return adapter_ids
    if isinstance(adapter_ids, Tensor):
        if adapter_ids.is_floating_point() or adapter_ids.dtype == torch.bool or adapter_ids.is_complex():
            raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
        ids = adapter_ids.to(x.device)
        if tuple(ids.shape) == leading:
            return groups_from_ids(ids, n, rows)
        if x.dim() >= 2 and tuple(ids.shape) == leading[:1]:  # per sample
            return groups_from_ids(ids.repeat_interleave(rows // max(leading[0], 1)), n, rows)
        raise ValueError(
            f"adapter_ids must have the shape {leading} (per row) or ({leading[0] if leading else 1},) (per "
            f"sample), got {tuple(ids.shape)}"
        )
    ids = list(adapter_ids)
    if any(isinstance(a, bool) or not isinstance(a, int) or not -1 <= a < n for a in ids):
        raise ValueError(f"adapter_ids must be ints in [-1, {n}) (-1: the base layer alone), got {ids[:8]}")
    samples = leading[0] if x.dim() >= 2 else rows
    if len(ids) == samples:
        return groups_from_names(ids, rows // max(samples, 1), n, x.device)
    if len(ids) == rows:
        return groups_from_names(ids, 1, n, x.device)
    raise ValueError(f"adapter_ids has {len(ids)} entries; the input has {samples} samples and {rows} rows")


def _seeds(dropout_seeds, n: int, device: torch.device) -> Tensor:
    """The ``(n,)`` int64 seed tensor on ``device``: drawn, or from the caller's ints or tensor."""
    if dropout_seeds is None:
        return torch.randint(0, 2**63 - 1, (n,), dtype=torch.int64, device=device)
    if isinstance(dropout_seeds, Tensor):
        if dropout_seeds.dtype != torch.int64 or tuple(dropout_seeds.shape) != (n,):
            raise ValueError(f"a dropout_seeds tensor must be int64 of shape ({n},), got {dropout_seeds.dtype} "
                             f"{tuple(dropout_seeds.shape)}")  # fmt: skip
        check_seed_value(dropout_seeds.min())
        return dropout_seeds.to(device, copy=True)
    if isinstance(dropout_seeds, int) and not isinstance(dropout_seeds, bool):
        seeds = [(dropout_seeds + a) % 2**63 for a in range(n)]
    else:
        seeds = list(dropout_seeds)
    if len(seeds) != n or any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in seeds
    ):
        raise ValueError(f"dropout_seeds must be {n} ints in [0, 2**63), got {dropout_seeds!r:.80}")
    return torch.tensor(seeds, dtype=torch.int64).to(device)
