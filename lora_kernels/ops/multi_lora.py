"""Many LoRA adapters over one base layer: which rows take which adapter, and the grouped op's backends.

One call computes ``y = x·Wᵀ + b + Σ_a s_a·(drop_a(x_a)·A_aᵀ)·B_aᵀ`` where ``x_a`` are the rows adapter ``a``
takes. Two ways to assign rows (:class:`AdapterGroups`):

* **by row** (a mixed batch, PEFT's ``adapter_names=``; Punica's SGMV): each row takes one adapter or none
  (``-1``, PEFT's ``"__base__"``), given per row, per sample, or as segments of consecutive rows;
* **every row, every adapter** (several active adapters, PEFT's ``set_adapter([...])``): the terms summed.

The rows of an adapter, in batch order, are its *segment*; position ``j`` of segment ``a`` is the ``j``-th row
adapter ``a`` takes. Adapter ``a``'s dropout mask is ``dropout_mask(seeds[a], (m_a, K), p_a)`` of its
``m_a`` rows by position: exactly the mask a single-adapter call on those rows alone, with seed
``seeds[a]``, would draw. So each adapter's output and gradients equal a call of that adapter alone on its
own rows (:func:`lora_kernels.lora_linear` with ``dropout_seed=seeds[a]``), dropout included.

The base GEMM runs once for all rows (``F.linear``: cuBLAS/MKL), and the adapter terms are added into its
output in place; rows without an adapter keep the base output. Backends (chosen as for the single op):

* ``triton`` (:mod:`lora_kernels.ops.triton_multi`): the adapters stacked and zero-padded to one rank, one
  shrink kernel for every segment's ``t = drop(x)·Aᵀ``, one expand kernel adding ``s·t·Bᵀ`` into ``y``;
  backward: ``s·dY·B`` and ``dX += mask ⊙ (g·A)`` the same way, ``dA``/``dB`` by one grouped reduction
  over each segment's rows;
* ``torch`` (the CPU, and the CUDA extension, which has no grouped kernels): per adapter, views of
  contiguous segments (gathers otherwise) and in-place GEMMs, no M×N temporary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dropout import dropout_mask, dropout_threshold
from . import _no_autocast, t_dtype
from .torch_lora import _as, _projection, _scaled_mm, scaled_grad_B, scaled_grad_t

__all__ = [
    "AdapterGroups",
    "MultiLoRAParams",
    "groups_all_active",
    "groups_from_ids",
    "groups_from_names",
    "groups_from_segments",
    "multi_backward",
    "multi_forward",
]


@dataclass(frozen=True, eq=False)
class AdapterGroups:
    """The rows each of ``n`` adapters takes in an ``(M, K)`` input.

    ``seg_starts`` (``n + 1`` ints): segment ``a`` is positions ``[seg_starts[a], seg_starts[a + 1])`` of
    ``rows``, ``(T,)`` int64 on the input's device holding batch rows in segment order (``T =
    seg_starts[-1]``; each segment in batch order). ``slices[a]``: the segment as ``slice(start, stop)`` of
    batch rows where it is one run of consecutive rows (the torch path then takes views), else ``None``.
    ``all_active``: every adapter takes every row (``T = n·M``), the terms summed.
    """

    num_rows: int
    seg_starts: tuple[int, ...]
    rows: Tensor
    slices: tuple[slice | None, ...]
    all_active: bool = False

    @property
    def num_adapters(self) -> int:
        return len(self.seg_starts) - 1

    def count(self, a: int) -> int:
        """Rows adapter ``a`` takes."""
        return self.seg_starts[a + 1] - self.seg_starts[a]

    def rows_of(self, a: int) -> Tensor:
        """Batch rows of adapter ``a``, in order (a view of :attr:`rows`)."""
        return self.rows[self.seg_starts[a] : self.seg_starts[a + 1]]


def _starts(counts: Sequence[int]) -> tuple[int, ...]:
    return tuple(itertools.accumulate(counts, initial=0))


def groups_all_active(num_adapters: int, num_rows: int, device: torch.device) -> AdapterGroups:
    """Every adapter takes every row (several active adapters)."""
    rows = torch.arange(num_rows, device=device, dtype=torch.int64).repeat(num_adapters)
    whole = slice(0, num_rows)
    return AdapterGroups(
        num_rows, _starts([num_rows] * num_adapters), rows, (whole,) * num_adapters, all_active=True
    )


def _from_sorted(ids: Tensor, counts: list[int], num_adapters: int, num_rows: int) -> AdapterGroups:
    """Groups from per-row ids (``-1``: no adapter) and the rows per adapter: a stable sort by adapter."""
    order = torch.argsort(ids, stable=True)
    rows = order[counts[0] :]  # the base rows (id -1) sort first
    starts = _starts(counts[1:])
    return AdapterGroups(num_rows, starts, rows, (None,) * num_adapters)


def groups_from_ids(adapter_ids: Tensor, num_adapters: int, num_rows: int) -> AdapterGroups:
    """Groups from a per-row int tensor ``(M,)`` of adapter indices in ``[-1, n)`` (``-1``: none).

    Reads the rows per adapter on the host (one sync on a GPU, as PEFT's mixed batch does)."""
    ids = adapter_ids.reshape(-1).to(torch.int64)
    # one bincount for the check and the counts: 0 below -1, 1 base, 2.. adapters, n + 2 too large
    binned = torch.bincount((ids + 2).clamp_(0, num_adapters + 2), minlength=num_adapters + 3).tolist()
    if binned[0] or binned[-1]:
        raise ValueError(
            f"adapter_ids must be in [-1, {num_adapters}) (-1: the base layer alone), got "
            f"{binned[0]} below and {binned[-1]} at or above that range"
        )
    return _from_sorted(ids, binned[1:-1], num_adapters, num_rows)


def groups_from_names(
    names: Sequence[int], rows_per_name: int, num_adapters: int, device: torch.device
) -> AdapterGroups:
    """Groups from one adapter index per sample, known on the host (``-1``: none), each sample
    ``rows_per_name`` consecutive rows: no device sync; contiguous runs of one adapter become views."""
    per_adapter: list[list[int]] = [[] for _ in range(num_adapters)]
    for sample, a in enumerate(names):
        if a >= 0:
            per_adapter[a].append(sample)
    counts = [len(s) * rows_per_name for s in per_adapter]
    slices = []
    for samples in per_adapter:
        run = samples and samples[-1] - samples[0] + 1 == len(samples)
        slices.append(slice(samples[0] * rows_per_name, (samples[-1] + 1) * rows_per_name) if run else None)
    samples = torch.tensor([s for samples in per_adapter for s in samples], dtype=torch.int64)
    rows = (samples[:, None] * rows_per_name + torch.arange(rows_per_name)).reshape(-1)
    rows_t = rows.to(device, non_blocking=True)
    return AdapterGroups(len(names) * rows_per_name, _starts(counts), rows_t, tuple(slices))


def groups_from_segments(
    segments: Sequence[tuple[int, int]], num_adapters: int, num_rows: int, device: torch.device
) -> AdapterGroups:
    """Groups from ``(adapter, length)`` runs of consecutive rows covering all ``num_rows`` rows in order
    (adapter ``-1``: base rows). No device sync; an adapter with one run is a view."""
    total = 0
    per_adapter: list[list[tuple[int, int]]] = [[] for _ in range(num_adapters)]
    for i, segment in enumerate(segments):
        a, length = segment
        if not (isinstance(a, int) and isinstance(length, int)) or isinstance(a, bool):
            raise TypeError(f"segments[{i}] must be (adapter index, number of rows), got {segment!r}")
        if not -1 <= a < num_adapters or length < 0:
            raise ValueError(
                f"segments[{i}] = {segment!r}: the adapter must be in [-1, {num_adapters}) and the length >= 0"
            )
        if a >= 0 and length:
            per_adapter[a].append((total, total + length))
        total += length
    if total != num_rows:
        raise ValueError(f"the segments cover {total} rows, but the input has {num_rows}")
    counts = [sum(stop - start for start, stop in runs) for runs in per_adapter]
    slices = tuple(slice(*runs[0]) if len(runs) == 1 else None for runs in per_adapter)
    flat = [r for runs in per_adapter for start, stop in runs for r in range(start, stop)]
    rows = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    return AdapterGroups(num_rows, _starts(counts), rows, slices)


@dataclass(frozen=True, slots=True)
class MultiLoRAParams:
    """The per-adapter scalars of a grouped call: scalings ``s_a``, dropout rates ``p_a`` (0 in eval) and
    the ``(n,)`` int64 seed tensor on the device (``None`` when no adapter drops)."""

    scalings: tuple[float, ...]
    dropout_ps: tuple[float, ...]
    seeds: Tensor | None = None

    def drops(self, a: int) -> bool:
        return self.dropout_ps[a] > 0.0 and self.seeds is not None


# --------------------------------------------------------------------------------------------------------
# The torch backend
# --------------------------------------------------------------------------------------------------------


def _take(tensor: Tensor, groups: AdapterGroups, a: int) -> Tensor:
    """Adapter ``a``'s rows of ``tensor``: a view of a contiguous segment, else a gather."""
    whole = groups.slices[a]
    return tensor[whole] if whole is not None else tensor.index_select(0, groups.rows_of(a))


def _add_rows(out: Tensor, groups: AdapterGroups, a: int, value: Tensor) -> None:
    whole = groups.slices[a]
    if whole is not None:
        out[whole] += value
    else:
        out.index_add_(0, groups.rows_of(a), value)


def _mask(params: MultiLoRAParams, a: int, rows: int, x: Tensor) -> Tensor:
    """Adapter ``a``'s mask for its ``rows`` rows of ``x``'s width, by position in its segment."""
    return dropout_mask(params.seeds[a], (rows, x.shape[-1]), params.dropout_ps[a], x.device, x.dtype)


def _torch_forward(x, base, adapters, groups, params) -> tuple[Tensor, ...]:
    """Adds every adapter's term into ``base`` (in place); returns the ``t_a`` (float32) for backward."""
    ts = []
    for a, (lora_A, lora_B) in enumerate(adapters):
        if groups.count(a) == 0:
            ts.append(x.new_empty((0, lora_A.shape[0]), dtype=t_dtype(x.dtype)))
            continue
        xs = _take(x, groups, a)
        if params.drops(a):
            xs = xs * _mask(params, a, xs.shape[0], x)
        product, t = _projection(xs, lora_A)
        ts.append(t)
        B_t = _as(lora_B, x.dtype).t()
        whole = groups.slices[a]
        if whole is not None:  # one rounding of base + s·t·Bᵀ, in place
            base[whole].addmm_(product, B_t, alpha=params.scalings[a])
        else:
            base.index_add_(0, groups.rows_of(a), _scaled_mm(product, B_t, params.scalings[a]))
    return tuple(ts)


def _base_grad_x(grad_y: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
    """``dY·W``, the base GEMM's part of ``dX``, into which the terms' parts are added; zeros where the
    op did not compute the base (``base_output``: the base layer's own autograd gives its part)."""
    if weight is None:
        return grad_y.new_zeros((grad_y.shape[0], x.shape[1]))
    return torch.mm(grad_y, weight)


def _torch_backward(grad_y, x, weight, adapters, ts, groups, params, needs):
    need_x, need_A, need_B = needs
    grad_x = _base_grad_x(grad_y, x, weight) if need_x else None
    grads_A, grads_B = [], []
    for a, (lora_A, lora_B) in enumerate(adapters):
        if groups.count(a) == 0:
            grads_A.append(torch.zeros_like(lora_A) if need_A else None)
            grads_B.append(torch.zeros_like(lora_B) if need_B else None)
            continue
        gy = _take(grad_y, groups, a)
        g = scaled_grad_t(gy, lora_B, params.scalings[a]) if need_x or need_A else None
        mask = _mask(params, a, gy.shape[0], x) if params.drops(a) else None
        if need_x:
            lora_x = torch.mm(g, _as(lora_A, grad_y.dtype))
            _add_rows(grad_x, groups, a, lora_x if mask is None else lora_x * mask)
        if need_A:
            xs = _take(x, groups, a)
            grads_A.append(_as(torch.mm(g.t(), xs if mask is None else xs * mask), lora_A.dtype))
        else:
            grads_A.append(None)
        grads_B.append(scaled_grad_B(gy, ts[a], params.scalings[a], lora_B.dtype) if need_B else None)
    return grad_x, grads_A, grads_B


# --------------------------------------------------------------------------------------------------------
# The Triton backend (kernels in triton_multi)
# --------------------------------------------------------------------------------------------------------


def _stacks(adapters, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``A_stack (n, R, K)``, ``B_stack (n, N, R)``, zero-padded to ``R``, the kernels' rank tile."""
    from .triton_support import _block_r

    rank = _block_r(max(lora_A.shape[0] for lora_A, _ in adapters))
    n, (_, K), (N, _) = len(adapters), adapters[0][0].shape, adapters[0][1].shape
    A_stack = torch.zeros((n, rank, K), device=device, dtype=dtype)
    B_stack = torch.zeros((n, N, rank), device=device, dtype=dtype)
    for a, (lora_A, lora_B) in enumerate(adapters):
        A_stack[a, : lora_A.shape[0]] = lora_A
        B_stack[a, :, : lora_B.shape[1]] = lora_B
    return A_stack, B_stack


def _segment_dropout(params: MultiLoRAParams, device: torch.device):
    from .triton_multi import SegmentDropout

    if params.seeds is None or not any(p > 0.0 for p in params.dropout_ps):
        return None
    ps = params.dropout_ps
    thresholds = torch.tensor([dropout_threshold(p) for p in ps], dtype=torch.int32)
    keep_scales = torch.tensor([1.0 / (1.0 - p) for p in ps], dtype=torch.float32)
    return SegmentDropout(params.seeds, thresholds.to(device), keep_scales.to(device))


def _triton_forward(x, base, adapters, groups, params):
    from . import triton_multi

    dtype = adapters[0][0].dtype
    A_stack, B_stack = _stacks(adapters, dtype, x.device)
    scales = torch.tensor(params.scalings, dtype=torch.float32).to(x.device)
    dropout = _segment_dropout(params, x.device)
    starts = list(groups.seg_starts)
    t = triton_multi.segment_shrink(x, groups.rows, starts, A_stack, None, dropout, x.dtype)
    triton_multi.segment_expand(
        t, groups.rows, starts, B_stack, scales, base, all_active=groups.all_active, dropout=None
    )
    return t, A_stack, B_stack, scales


def _triton_backward(grad_y, x, weight, adapters, saved, groups, params, needs):
    from . import triton_multi

    need_x, need_A, need_B = needs
    t, A_stack, B_stack, scales = saved
    dropout = _segment_dropout(params, x.device)
    rows, starts, dtype = groups.rows, list(groups.seg_starts), grad_y.dtype
    grad_x = grads_A = grads_B = None
    if need_x or need_A:
        g = triton_multi.segment_shrink(grad_y, rows, starts, B_stack.transpose(1, 2), scales, None, dtype)
    if need_x:
        grad_x = _base_grad_x(grad_y, x, weight)
        triton_multi.segment_expand(
            g, rows, starts, A_stack.transpose(1, 2), None, grad_x, all_active=groups.all_active,
            dropout=dropout,
        )  # fmt: skip
    if need_A:
        dA = triton_multi.segment_reduce(g, None, x, rows, starts, None, dropout, dtype)
        grads_A = [dA[a, : A.shape[0]].to(A.dtype) for a, (A, _) in enumerate(adapters)]
    if need_B:
        dB = triton_multi.segment_reduce(grad_y, rows, t, None, starts, scales, None, dtype)
        grads_B = [dB[a, :, : B.shape[1]].to(B.dtype) for a, (_, B) in enumerate(adapters)]
    n = len(adapters)
    return grad_x, grads_A or [None] * n, grads_B or [None] * n


# --------------------------------------------------------------------------------------------------------
# Entry points (2-D inputs; autocast off; no autograd)
# --------------------------------------------------------------------------------------------------------


def multi_forward(
    backend: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, base_output: Tensor | None,
    adapters: Sequence[tuple[Tensor, Tensor]], groups: AdapterGroups, params: MultiLoRAParams,
) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """``(y, saved)`` for a 2-D ``x``: ``y = base + Σ_a terms`` with ``base = x·Wᵀ + b`` (one GEMM) or a copy
    of ``base_output`` (the output of a base layer the op does not compute, e.g. another tuner layer);
    ``saved`` is the tensors :func:`multi_backward` needs besides the inputs (the torch backend's ``t_a``,
    the Triton backend's ``t`` of every segment and the padded stacks), ``()`` when no row takes an adapter."""
    with _no_autocast(x.device.type):
        if base_output is None:
            y = F.linear(x, weight, bias)
        else:
            y = base_output.reshape(x.shape[0], -1).to(x.dtype, copy=True)
        if x.shape[0] == 0 or not adapters:
            return y, ()
        if backend == "triton":
            return y, _triton_forward(x, y, adapters, groups, params)
        return y, _torch_forward(x, y, adapters, groups, params)


def multi_backward(
    backend: str, grad_y: Tensor, x: Tensor, weight: Tensor | None, adapters: Sequence[tuple[Tensor, Tensor]],
    saved: tuple[Tensor, ...], groups: AdapterGroups, params: MultiLoRAParams, needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:  # fmt: skip
    """``(dX, [dA_a], [dB_a])`` of :func:`multi_forward` for ``needs = (x, adapters' A, adapters' B)``;
    ``dX`` holds only the LoRA terms' part when ``weight`` is None (the caller adds the base layer's)."""
    need_x, need_A, need_B = needs
    n = len(adapters)
    with _no_autocast(x.device.type):
        if not saved:
            grad_x = _base_grad_x(grad_y, x, weight) if need_x else None
            return (
                grad_x,
                [torch.zeros_like(A) if need_A else None for A, _ in adapters],
                [torch.zeros_like(B) if need_B else None for _, B in adapters],
            )
        if backend == "triton":
            result = _triton_backward(grad_y, x, weight, adapters, saved, groups, params, needs)
        else:
            result = _torch_backward(grad_y, x, weight, adapters, saved, groups, params, needs)
    grad_x, grads_A, grads_B = result
    assert len(grads_A) == n and len(grads_B) == n
    return grad_x, grads_A, grads_B


def composite_terms(x: Tensor, adapters, groups: AdapterGroups, params: MultiLoRAParams) -> Tensor:
    """``Σ_a terms`` as plain differentiable torch ops on a 2-D ``x`` (``(M, N)`` in ``x.dtype``): for
    ``torch.func`` transforms, forward-mode AD, meta tensors and ``torch.compile``."""
    N = adapters[0][1].shape[0]
    out = x.new_zeros((x.shape[0], N))
    for a, (lora_A, lora_B) in enumerate(adapters):
        if groups.count(a) == 0:
            continue
        xs = _take(x, groups, a)
        if params.drops(a):
            xs = xs * _mask(params, a, xs.shape[0], x)
        term = F.linear(F.linear(xs, _as(lora_A, x.dtype)), _as(lora_B, x.dtype)) * params.scalings[a]
        whole = groups.slices[a]
        if whole is not None:
            pad = (0, 0, whole.start, x.shape[0] - whole.stop)
            out = out + F.pad(term, pad)
        else:
            out = out.index_add(0, groups.rows_of(a), term)
    return out
