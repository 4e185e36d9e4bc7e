"""lora_kernels: fused LoRA linear layers for PyTorch (Triton kernels, a C++/CUDA fallback, torch composite)."""

from .dispatch import available_backends, use_backend
from .dropout import dropout_mask
from .functional import (
    LoRALinearFunction,
    dora_linear,
    dora_weight_norm,
    lora_linear,
    qdora_linear,
    qlora_linear,
)
from .inject import inject_lora, lora_state_dict, merge_lora, unmerge_lora
from .modules import FusedLoRALinear
from .multi_functional import AdapterTerm, multi_lora_linear
from .multi_modules import MultiLoRALinear, adapter_rows
from .ops.routing import use_path
from .reference import dora_linear_reference, lora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "AdapterTerm",
    "FusedLoRALinear",
    "LoRALinearFunction",
    "MultiLoRALinear",
    "adapter_rows",
    "available_backends",
    "dora_linear",
    "dora_linear_reference",
    "dora_weight_norm",
    "dropout_mask",
    "inject_lora",
    "lora_linear",
    "lora_linear_reference",
    "lora_state_dict",
    "merge_lora",
    "multi_lora_linear",
    "qdora_linear",
    "qlora_linear",
    "unmerge_lora",
    "use_backend",
    "use_path",
]


def __getattr__(name: str):
    # ``lora_kernels.peft`` imports PEFT's dependencies only when asked for.
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
