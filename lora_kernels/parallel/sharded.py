"""The fused LoRA (and DoRA) linear on the local shards of a tensor-parallel layer.

:func:`sharded_linear` takes a layer's parameters as DTensors placed by :mod:`lora_kernels.parallel.styles`
and runs :func:`lora_kernels.lora_linear` / :func:`lora_kernels.dora_linear` on their local shards, never
gathering ``W``. What the split needs besides the op, all read from the placements:

* column-parallel (``W``, ``b``, ``B``, ``m`` sharded on the output dim, ``A`` replicated, ``x``
  replicated): the op gives this rank's output columns exactly; ``dX`` and ``dA`` are sums over the ranks
  (each holds a slice of ``dY``): ``dX`` through DTensor's own reduction of a partial gradient (an
  all-reduce, or a reduce-scatter back to a sequence-sharded input), ``dA`` by :class:`_SumGrad`.
* row-parallel (``W``, ``A`` sharded on the input dim, ``b``, ``B``, ``m`` replicated, ``x`` sharded on
  its last dim): the op gives a partial sum of the output, reduced as torch's ``RowwiseParallel`` reduces
  it (an all-reduce, or a reduce-scatter for a sequence-sharded output); the bias is added once, after the
  reduction; ``dB``, ``dm`` (and ``db`` of a sharded output) are sums over the ranks; the dropout mask is
  that of the global columns (``dropout_column_offset``); DoRA's norm ``‖W + s·B·A‖`` is the root of the
  sum of the ranks' squared shard norms.

The dropout seed is drawn on each rank and broadcast from the mesh's first rank, so every rank applies one
mask, the one a single process with that rank's generator state applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from ..dropout import draw_seed
from ..functional import dora_linear, dora_weight_norm, lora_linear

__all__ = ["Adapter", "Layout", "sharded_linear"]


@dataclass(frozen=True)
class Layout:
    """How one layer is split: ``rowwise`` (else column-wise), on ``mesh`` (1-D), with the input and
    output placements of torch's ``ColwiseParallel``/``RowwiseParallel`` (``input_layouts`` the input comes
    in, ``output_layouts`` the output leaves in, ``use_local_output``: a plain tensor rather than a
    DTensor)."""

    rowwise: bool
    mesh: DeviceMesh
    input_layouts: tuple[Placement, ...]
    output_layouts: tuple[Placement, ...]
    use_local_output: bool = True


@dataclass(frozen=True)
class Adapter:
    """A layer's adapter: DTensors ``lora_A``, ``lora_B`` (and DoRA's ``magnitude``), the scaling and the
    dropout on the LoRA branch (``dropout_p``, applied when ``training``)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float = 0.0
    training: bool = False
    magnitude: Tensor | None = None


def _normalized(placement: Placement, ndim: int) -> Placement:
    """``Shard(-1)`` as ``Shard(ndim - 1)``: placements compare by their dim."""
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim + ndim)
    return placement


class _SumGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the mesh (an all-reduce): a replicated tensor
    whose ranks each see a part of its gradient (``dA`` column-wise; ``dB``, ``dm`` row-wise)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, mesh: DeviceMesh) -> Tensor:
        ctx.mesh = mesh
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = DTensor.from_local(grad, ctx.mesh, [Partial()], run_check=False)
        return _wait(summed.redistribute(ctx.mesh, [Replicate()]).to_local()), None


class _ReducePartial(torch.autograd.Function):
    """A partial sum of the output (row-wise) reduced to ``placement``, as ``RowwiseParallel`` reduces
    it: ``Replicate`` is an all-reduce, ``Shard(d)`` a reduce-scatter. The backward gives each rank the
    whole gradient (an all-gather from ``Shard(d)``; nothing to do from ``Replicate``)."""

    @staticmethod
    def forward(ctx, partial: Tensor, mesh: DeviceMesh, placement: Placement) -> Tensor:
        ctx.mesh, ctx.placement, ctx.shape = mesh, placement, partial.shape
        reduced = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
        return _wait(reduced.redistribute(mesh, [placement]).to_local())

    @staticmethod
    def backward(ctx, grad: Tensor):
        if isinstance(ctx.placement, Replicate):
            return grad, None, None
        grad = DTensor.from_local(grad.contiguous(), ctx.mesh, [ctx.placement], run_check=False, shape=ctx.shape,
                                  stride=torch.empty(ctx.shape, device="meta").stride())  # fmt: skip
        return _wait(grad.redistribute(ctx.mesh, [Replicate()]).to_local()), None, None


def _wait(tensor: Tensor) -> Tensor:
    """A functional collective's result as a plain tensor (waited for)."""
    wait = getattr(tensor, "wait", None)
    return wait() if callable(wait) else tensor


def _local(tensor: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (its gradient in the same placement); a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _summed_grad(tensor: Tensor | None, mesh: DeviceMesh) -> Tensor | None:
    """The local copy of a replicated DTensor whose gradient is summed over the ranks (:class:`_SumGrad`)."""
    if tensor is None:
        return None
    local = _local(tensor)
    return _SumGrad.apply(local, mesh) if local.requires_grad else local


def _prepare_input(x: Tensor, layout: Layout) -> DTensor:
    """``x`` as a DTensor in ``input_layouts``, redistributed to what the split computes on (replicated
    column-wise, sharded on the last dim row-wise), as torch's styles prepare their input."""
    mesh = layout.mesh
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, layout.input_layouts, run_check=False)
    desired = (Shard(x.dim() - 1),) if layout.rowwise else (Replicate(),)
    current = tuple(_normalized(p, x.dim()) for p in x.placements)
    return x if current == desired else x.redistribute(mesh, desired)


def _finish_output(y: Tensor, placement: Placement, layout: Layout) -> Tensor:
    """The local output ``y`` (of a DTensor in ``placement``) redistributed to ``output_layouts``, and a
    plain tensor if ``use_local_output``."""
    wanted = _normalized(layout.output_layouts[0], y.dim())
    placement = _normalized(placement, y.dim())
    if placement == wanted and layout.use_local_output:
        return y
    out = DTensor.from_local(y, layout.mesh, [placement], run_check=False)
    if placement != wanted:
        out = out.redistribute(layout.mesh, [wanted])
    return out.to_local() if layout.use_local_output else out


def _shard_offset(weight: Tensor, mesh: DeviceMesh) -> int:
    """The global index of this rank's first input column of a row-parallel weight (``Shard(1)``, torch's
    chunking: ``ceil(K / n)`` columns a rank, the last ranks fewer or none)."""
    columns, ranks = weight.shape[1], mesh.size()
    chunk = -(-columns // ranks)
    return min(mesh.get_local_rank() * chunk, columns)


def _shared_seed(device: torch.device, mesh: DeviceMesh) -> Tensor:
    """A dropout seed drawn here and broadcast from the mesh's first rank: one mask on every rank."""
    seed = draw_seed(device)
    group = mesh.get_group()
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return seed


def _row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, mesh: DeviceMesh) -> Tensor:
    """DoRA's ``‖W + s·B·A‖`` per output row of a row-parallel layer: each rank's norm over its columns,
    squared, summed over the ranks, then the root (float32, detached)."""
    with torch.no_grad():
        squared = dora_weight_norm(weight, lora_A, lora_B, scaling).square()
        summed = DTensor.from_local(squared, mesh, [Partial()], run_check=False)
        return _wait(summed.redistribute(mesh, [Replicate()]).to_local()).sqrt()


def sharded_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, adapter: Adapter | None, layout: Layout
) -> Tensor:
    """One tensor-parallel layer's forward: the fused LoRA (DoRA with ``adapter.magnitude``) linear on the
    local shards, or the base linear alone without ``adapter``; see the module docstring for the split.

    ``weight``, ``bias`` and the adapter's tensors are DTensors on ``layout.mesh`` (placed by
    :mod:`lora_kernels.parallel.styles`, or FSDP2's unsharded view of them); ``x`` a tensor or DTensor in
    ``layout.input_layouts``. Returns the output in ``layout.output_layouts``.
    """
    mesh, rowwise = layout.mesh, layout.rowwise
    x_dt = _prepare_input(x, layout)
    # column-wise every rank's dX is a part of the whole: DTensor sums the parts back to the input's layout
    x_local = x_dt.to_local() if rowwise else x_dt.to_local(grad_placements=(Partial(),))
    w_local = _local(weight)
    b_local = None if rowwise else _local(bias)  # row-wise the bias is added after the reduction
    if adapter is None:
        y = F.linear(x_local, w_local, b_local)
    else:
        y = _adapted(x_local, w_local, b_local, adapter, weight, mesh, rowwise)
    if not rowwise:
        return _finish_output(y, Shard(y.dim() - 1), layout)
    placement = _normalized(layout.output_layouts[0], y.dim())
    y = _ReducePartial.apply(y, mesh, placement)
    if bias is not None:  # a sequence-sharded output sees a part of the rows: its db is a part of the sum
        b_local = _summed_grad(bias, mesh) if isinstance(placement, Shard) else _local(bias)
        y = y + b_local
    return _finish_output(y, placement, layout)


def _adapted(
    x: Tensor, weight: Tensor, bias: Tensor | None, adapter: Adapter, global_weight: Tensor, mesh: DeviceMesh,
    rowwise: bool,
) -> Tensor:  # fmt: skip
    """The fused op on local shards (``bias`` None row-wise): the column offset, the summed gradients of
    the replicated adapter tensors and DoRA's reduced norm as the split needs them."""
    if rowwise:
        lora_A, lora_B = _local(adapter.lora_A), _summed_grad(adapter.lora_B, mesh)
        magnitude = _summed_grad(adapter.magnitude, mesh)
        offset = _shard_offset(global_weight, mesh)
    else:
        lora_A, lora_B = _summed_grad(adapter.lora_A, mesh), _local(adapter.lora_B)
        magnitude, offset = _local(adapter.magnitude), 0
    dropout = adapter.training and adapter.dropout_p > 0.0
    seed = _shared_seed(x.device, mesh) if dropout else None
    args = (x, weight, bias, lora_A, lora_B)
    options = dict(dropout_seed=seed, dropout_column_offset=offset)
    if magnitude is None:
        return lora_linear(*args, adapter.scaling, adapter.dropout_p, adapter.training, **options)
    if rowwise:
        options["weight_norm"] = _row_norm(weight, lora_A, lora_B, adapter.scaling, mesh)
    return dora_linear(*args, magnitude, adapter.scaling, adapter.dropout_p, adapter.training, **options)
