"""lora_kernels: fused LoRA linear layers for PyTorch (Triton kernels, a C++/CUDA fallback, torch composite)."""

from .dispatch import available_backends, use_backend
from .dropout import dropout_mask
from .functional import LoRALinearFunction, lora_linear
from .modules import FusedLoRALinear
from .reference import lora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "FusedLoRALinear",
    "LoRALinearFunction",
    "available_backends",
    "dropout_mask",
    "lora_linear",
    "lora_linear_reference",
    "use_backend",
]
