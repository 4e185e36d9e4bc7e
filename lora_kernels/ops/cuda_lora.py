"""The C++/CUDA extension backend: ``lora_kernels._C``'s ops behind the backend interface of :mod:`.`.

The extension registers its ops under ``torch.ops.lora_kernels`` (schemas in ``csrc/lora_ops.cpp``); they
take CPU tensors (an ATen composite with the same Philox mask) and CUDA tensors (the kernels of
``csrc/lora_fwd.cu`` / ``csrc/lora_bwd.cu``). This module only sequences them. Importing it never fails:
without the extension, :func:`has_extension` and :func:`is_available` are False.

This backend is the split path (:mod:`lora_kernels.ops.routing`): ``lora_linear_fwd`` writes the LoRA term
``b + s·t·Bᵀ`` into y's storage and accumulates ``x·Wᵀ`` into it with cuBLAS (``at::addmm_``, beta = 1);
``lora_grad_x`` writes ``mask ⊙ (s·dY·B)·A`` into dX's storage (a cuBLAS GEMM without dropout) and
accumulates ``dY·W`` into it the same way. The hand-written kernels are used only where they fuse the
dropout mask. With dropout 0 there is nothing to
fuse: the skinny products ``t = x·Aᵀ``, ``s·dY·B`` and ``dB = s·dYᵀ·t`` are plain torch matmuls (cuBLAS on
CUDA tensors, tensor cores included) in the input dtype with fp32 accumulation, their results widened to
float32 and ``s`` applied in float32, as the torch backend and the extension's CPU ops compute them; ``dA``
and ``dX`` already go to cuBLAS inside ``lora_grad_A`` / ``lora_grad_x`` when ``p`` is 0.

Layouts: ``x`` and ``grad_y`` may have any strides (the kernels index them logically); the small operands
(``t``, adapters cast to the compute dtype) are made contiguous inside the ops; ``bias`` may have any stride,
0 included (it goes to ``at::addmm``, which broadcasts it); ``y`` and ``grad_x`` come out contiguous.

Devices: every CUDA op sets its tensors' device itself (a ``CUDAGuard`` in csrc/lora_fwd.cu and
csrc/lora_bwd.cu); the calls below also run under :func:`~lora_kernels.ops.device_guard`, so the torch ops
beside them and any future op without a guard launch on the tensors' device too.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import LoRAParams, NeedsGrad, as_output, device_guard, seed_on
from .torch_lora import project_t, scaled_grad_B, scaled_grad_t

try:
    _C = importlib.import_module("lora_kernels._C")
    _IMPORT_ERROR: BaseException | None = None
except (
    ImportError,
    OSError,
) as err:  # not built (LORA_KERNELS_SKIP_EXT=1, a failed build), or for another torch
    _C, _IMPORT_ERROR = None, err

_PROJECT_OP = "lora_kernels::lora_project"


def has_extension() -> bool:
    """Whether ``lora_kernels._C`` imported (a CPU-only build counts)."""
    return _C is not None


def is_available() -> bool:
    """Whether the extension imported and carries CUDA kernels for its ops."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_PROJECT_OP, "CUDA")


def missing_reason() -> str:
    """Why this backend cannot run here, in words for an error message; ``""`` when it can."""
    rebuild = "reinstall with `pip install --no-build-isolation -e .` (see csrc/README.md)"
    if isinstance(_IMPORT_ERROR, ModuleNotFoundError):
        return f"the lora_kernels._C extension is not built; {rebuild}"
    if _IMPORT_ERROR is not None:  # an undefined symbol: built against another torch than the one running
        return (
            f"the lora_kernels._C extension does not import ({_IMPORT_ERROR}); it was built for another "
            f"torch than {torch.__version__} or its build is broken: {rebuild}"
        )
    if not is_available():
        return f"the lora_kernels._C extension was built without CUDA kernels; {rebuild} with a CUDA toolkit"
    return ""


def _ops():
    if _C is None:
        raise RuntimeError(missing_reason())
    return torch.ops.lora_kernels


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, params: LoRAParams,
    out_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``y = x·Wᵀ + b + s·(t·Bᵀ)`` with ``t = dropout(x)·Aᵀ`` (float32, returned for backward)."""
    ops = _ops()
    dropout_p, seed = float(params.dropout_p), seed_on(params, x.device)
    with device_guard(x.device):
        # no mask to fuse without dropout: cuBLAS (t unscaled: s goes to lora_linear_fwd's alpha)
        t = project_t(x, lora_A) if dropout_p == 0.0 else ops.lora_project(x, lora_A, 1.0, dropout_p, seed)
        y = ops.lora_linear_fwd(x, weight, bias, t, lora_B, float(params.scaling))
    return as_output(y, out_shape), t


def lora_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor, params: LoRAParams,
    needs_grad: NeedsGrad,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # fmt: skip
    """``(dX, dA, dB, None)`` for :func:`lora_forward` from the ops ``lora_grad_t_and_B`` (torch matmuls
    instead with dropout 0), ``lora_grad_x`` and ``lora_grad_A``; the bias gradient is left to
    ``run_backward``."""
    need_x, _, _, need_A, need_B = needs_grad
    ops = _ops()
    scaling, dropout_p, seed = float(params.scaling), float(params.dropout_p), seed_on(params, x.device)
    grad_x = grad_A = grad_B = None
    if not (need_x or need_A or need_B):
        return grad_x, grad_A, grad_B, None
    with device_guard(grad_y.device):
        if dropout_p == 0.0:  # no mask anywhere: the skinny products are cuBLAS GEMMs (module docstring)
            if need_x or need_A:  # in dY's dtype, as the op gives it
                grad_t = scaled_grad_t(grad_y, lora_B, scaling)
            if need_B:
                grad_B = scaled_grad_B(grad_y, t, scaling, lora_B.dtype)
        else:
            # One read of dY gives both s·(dY·B) (for dX and dA) and dB = dYᵀ·t.
            grad_t, grad_B_f32 = ops.lora_grad_t_and_B(grad_y, lora_B, t, scaling)
            if need_B:  # the op gives dYᵀ·t; t carries no s (see lora_forward)
                grad_B = grad_B_f32.mul_(scaling).to(lora_B.dtype)
        if need_x:
            grad_x = ops.lora_grad_x(grad_y, weight, grad_t, lora_A, dropout_p, seed)
        if need_A:
            grad_A = ops.lora_grad_A(grad_t, x, dropout_p, seed).to(lora_A.dtype)
    return grad_x, grad_A, grad_B, None
