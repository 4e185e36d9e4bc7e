"""Tensor parallelism for LoRA layers: styles for ``torch.distributed.tensor.parallel.parallelize_module``.

:class:`ColwiseParallel` and :class:`RowwiseParallel` take the place of torch's styles of the same names in
a plan, on :class:`~lora_kernels.FusedLoRALinear` (LoRA and DoRA), on PEFT's LoRA ``Linear`` layers and on
plain ``nn.Linear`` alike (:mod:`lora_kernels.parallel.styles`); the fused op then runs on each rank's
local shards (:mod:`lora_kernels.parallel.sharded`). torch's ``SequenceParallel``, ``PrepareModuleInput``
and ``PrepareModuleOutput`` are re-exported for the rest of a plan::

    from torch.distributed.device_mesh import init_device_mesh
    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cuda", (tp,))
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    PrepareModuleOutput,
    SequenceParallel,
    parallelize_module,
)

from .sharded import sharded_linear
from .styles import ColwiseParallel, RowwiseParallel

__all__ = [
    "ColwiseParallel",
    "PrepareModuleInput",
    "PrepareModuleOutput",
    "RowwiseParallel",
    "SequenceParallel",
    "parallelize_module",
    "sharded_linear",
]
