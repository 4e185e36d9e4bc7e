"""``ColwiseParallel`` and ``RowwiseParallel`` for ``parallelize_module`` plans, with LoRA's split.

Drop-in for torch's styles of the same names (the same arguments: ``input_layouts``, ``output_layouts``,
``use_local_output``; subclasses of them): on a plain ``nn.Linear`` or ``nn.Embedding`` they do exactly
what torch's do; on a :class:`~lora_kernels.FusedLoRALinear` (LoRA or DoRA) or on a PEFT LoRA ``Linear``
(what :func:`peft.get_peft_model` puts in place of an ``nn.Linear``) they place the adapter as torchtitan
and PEFT split it:

================  ===================  ==========================
tensor            column-parallel      row-parallel
================  ===================  ==========================
``weight``        ``Shard(0)``         ``Shard(1)``
``bias``          ``Shard(0)``         ``Replicate()``
``lora_A``        ``Replicate()``      ``Shard(1)`` (input dim)
``lora_B``        ``Shard(0)``         ``Replicate()``
magnitude (DoRA)  ``Shard(0)``         ``Replicate()``
================  ===================  ==========================

and give the layer a forward that runs the fused op on the local shards
(:func:`lora_kernels.parallel.sharded.sharded_linear`). The layer's own code is unchanged: its forward is
replaced on the instance, as :func:`lora_kernels.peft.fuse` replaces PEFT's (no module hooks, so nothing
else falls back). A PEFT layer parallelized this way runs fused whatever ``fuse`` was called or not;
``fuse`` leaves it so and ``unfuse`` does not take it back (PEFT's forward cannot run on the shards).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor import parallel as torch_tp
from torch.distributed.tensor.placement_types import Placement

from .. import peft as peft_bridge
from ..modules import FusedLoRALinear
from .sharded import Adapter, Layout, sharded_linear

__all__ = ["ColwiseParallel", "RowwiseParallel"]

# (column-parallel, row-parallel) placements of each tensor of a LoRA layer
_WEIGHT = (Shard(0), Shard(1))
_BIAS = (Shard(0), Replicate())
_LORA_A = (Replicate(), Shard(1))
_LORA_B = (Shard(0), Replicate())
_MAGNITUDE = (Shard(0), Replicate())


def _distribute(
    module: nn.Module, name: str, placement: Placement, mesh: DeviceMesh, src: int | None
) -> None:
    """Replace ``module``'s parameter ``name`` (if any) by a DTensor parameter in ``placement``."""
    param = module._parameters.get(name)
    if param is None:
        return
    dist_param = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src)
    module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))


def _peft_layer_class() -> type | None:
    """PEFT's LoRA ``Linear`` class where PEFT is installed."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


class _LoRAStyle:
    """What :class:`ColwiseParallel` and :class:`RowwiseParallel` share: the partition of a LoRA layer
    and its sharded forward. ``_ROW`` selects the split (index into the placement tables)."""

    _ROW: int

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(
                f"{type(self).__name__} takes a 1-D (tensor-parallel) mesh, got {device_mesh.ndim}-D"
            )
        peft_cls = _peft_layer_class()
        if isinstance(module, FusedLoRALinear):
            self._partition_fused(module, device_mesh)
            forward = _ShardedForward(module, self._layout(device_mesh))
        elif peft_cls is not None and isinstance(module, peft_cls):
            self._partition_peft(module, device_mesh)
            forward = _ShardedPeftForward(module, self._layout(device_mesh))
        else:  # nn.Linear, nn.Embedding: torch's own style; anything else: torch's error
            return super()._apply(module, device_mesh)
        module.forward = forward
        return module

    def _layout(self, mesh: DeviceMesh) -> Layout:
        return Layout(bool(self._ROW), mesh, self.input_layouts, self.output_layouts, self.use_local_output)

    def _partition_fused(self, module: FusedLoRALinear, mesh: DeviceMesh) -> None:
        if module.is_4bit:
            raise NotImplementedError(
                "tensor parallelism of a 4-bit (bitsandbytes) base is not supported: its packed weight and "
                "quant state cannot be sharded as a DTensor; shard a bf16 base, or use FSDP2"
            )
        row, src = self._ROW, self.src_data_rank
        for name, placements in (("weight", _WEIGHT), ("bias", _BIAS), ("lora_A", _LORA_A),
                                 ("lora_B", _LORA_B), ("lora_magnitude", _MAGNITUDE)):  # fmt: skip
            _distribute(module, name, placements[row], mesh, src)

    def _partition_peft(self, layer: nn.Module, mesh: DeviceMesh) -> None:
        base = layer.base_layer
        if type(base) is not nn.Linear:
            raise NotImplementedError(
                f"{type(self).__name__} shards PEFT LoRA layers over an nn.Linear base, got {type(base).__name__}"
            )
        row, src = self._ROW, self.src_data_rank
        _distribute(base, "weight", _WEIGHT[row], mesh, src)
        _distribute(base, "bias", _BIAS[row], mesh, src)
        for adapter in layer.lora_A:
            _distribute(layer.lora_A[adapter], "weight", _LORA_A[row], mesh, src)
            _distribute(layer.lora_B[adapter], "weight", _LORA_B[row], mesh, src)
        for adapter in getattr(layer, "lora_magnitude_vector", {}):
            _distribute(layer.lora_magnitude_vector[adapter], "weight", _MAGNITUDE[row], mesh, src)


class ColwiseParallel(_LoRAStyle, torch_tp.ColwiseParallel):
    """torch's ``ColwiseParallel`` that also takes LoRA layers: ``A`` replicated, ``B`` sharded like ``W``
    (see the module docstring). Arguments as torch's: the input comes in ``input_layouts`` (default
    replicated; ``Shard(1)`` for a sequence-parallel input, all-gathered), the output leaves sharded on its
    last dim unless ``output_layouts`` says otherwise."""

    _ROW = 0


class RowwiseParallel(_LoRAStyle, torch_tp.RowwiseParallel):
    """torch's ``RowwiseParallel`` that also takes LoRA layers: ``A`` sharded on the input dim, ``B``
    replicated (see the module docstring). The partial outputs are reduced as torch's style reduces them
    (all-reduce to ``Replicate()``, the default, or reduce-scatter to ``Shard(1)`` for sequence
    parallelism); the dropout mask is that of the global input columns; DoRA's row norms are reduced over
    the ranks."""

    _ROW = 1


class _ShardedForward:
    """The forward of a tensor-parallel :class:`~lora_kernels.FusedLoRALinear`: its tensors, read at each
    call (FSDP2 swaps in its unsharded views), through :func:`sharded_linear`."""

    def __init__(self, layer: nn.Module, layout: Layout) -> None:
        self.layer, self.layout = layer, layout

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        if layer.merged:
            return sharded_linear(x, layer.weight, layer.bias, None, self.layout)
        magnitude = layer.lora_magnitude if layer.use_dora else None
        adapter = Adapter(
            layer.lora_A, layer.lora_B, layer.scaling, layer.lora_dropout, layer.training, magnitude
        )
        return sharded_linear(x, layer.weight, layer.bias, adapter, self.layout)

    def __repr__(self) -> str:
        split = "row" if self.layout.rowwise else "column"
        return (
            f"<lora_kernels {split}-parallel forward of {type(self.layer).__name__} at {id(self.layer):#x}>"
        )


def _unsharded_reason(layer: nn.Module, plan) -> str | None:
    """Why a PEFT layer that :func:`lora_kernels.peft.fuse` runs fused cannot run tensor-parallel: the
    sharded forward takes one adapter on a plain ``nn.Linear`` base without ``lora_bias``."""
    if len(plan.adapters) != 1:
        return f"{len(plan.adapters)} active adapters ({', '.join(plan.adapters)}); a sharded layer runs one"
    if plan.kind != "linear":
        return f"its base is not a plain nn.Linear (a {plan.kind} base)"
    if layer.lora_B[plan.adapters[0]].bias is not None:
        return "lora_bias=True"
    return None


class _ShardedPeftForward(peft_bridge._FusedForward):
    """The forward of a tensor-parallel PEFT LoRA ``Linear``: its active adapter through
    :func:`sharded_linear`, the base layer alone where PEFT's forward is the base layer (adapters disabled
    or merged, none active), and a clear error where only PEFT's forward could run (the reasons
    :func:`lora_kernels.peft.fuse` falls back for)."""

    def __init__(self, layer: nn.Module, layout: Layout) -> None:
        super().__init__(layer)
        self.layout = layout

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = self.layer
        base = layer.base_layer
        if args or kwargs:
            raise NotImplementedError(
                "a tensor-parallel PEFT layer (lora_kernels.parallel) takes the input alone, not "
                f"{', '.join(kwargs) or 'extra arguments'}"
            )
        plan, why, warn = peft_bridge._plan_call(layer, None)
        if plan is not None:  # what fuse runs fused but a sharded layer does not
            why = _unsharded_reason(layer, plan)
            warn = why is not None
        if why is not None and warn:
            raise NotImplementedError(
                f"this PEFT LoRA layer cannot run tensor-parallel (lora_kernels.parallel): {why}"
            )
        if why is not None:  # PEFT's forward is the base layer's
            return sharded_linear(x, base.weight, base.bias, None, self.layout)
        (name,) = [a for a in layer.active_adapters if a in layer.lora_A]
        dropout = layer.lora_dropout[name]
        magnitude = layer.lora_magnitude_vector[name].weight if layer.use_dora.get(name, False) else None
        adapter = Adapter(
            layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]),
            dropout.p if isinstance(dropout, nn.Dropout) else 0.0, dropout.training, magnitude,
        )  # fmt: skip
        return sharded_linear(x, base.weight, base.bias, adapter, self.layout)

    def __reduce__(self):
        return (_ShardedPeftForward, (self.layer, self.layout))
