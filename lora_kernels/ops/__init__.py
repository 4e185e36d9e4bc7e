"""Backend implementations of the fused LoRA linear, and the glue every backend shares.

A backend is a module (``triton_lora``, ``cuda_lora``, ``torch_lora``) with two functions on 2-D tensors,
the :class:`Backend` protocol below. They are called through :func:`run_forward` / :func:`run_backward`,
which flatten leading dims, turn autocast off and compute what no backend needs to fuse: the base weight's
gradient ``dW = dYᵀ·x`` and, unless the backend returns it, the bias gradient ``db = Σ_rows dY``.

``lora_forward(x, weight, bias, lora_A, lora_B, params, out_shape=None) -> (y, t)``
    ``x`` is ``(M, K)`` with any strides; ``y = x·Wᵀ + b + s·(t·Bᵀ)`` is a new tensor (never a view: the
    caller may modify it in place, as nn.Linear's output) of shape ``out_shape`` (default ``(M, N)``; any
    shape of ``M·N`` elements, e.g. ``(..., N)`` for an input that had leading dims) in ``x.dtype``.
    ``t = dropout(x)·Aᵀ`` is the ``(M, r)`` float32 intermediate kept for backward, *without* the scaling
    ``s``: it is PEFT's ``x·Aᵀ``. ``params`` is the :class:`LoRAParams` of the call.

``lora_backward(grad_y, x, weight, lora_A, lora_B, t, params, needs_grad) -> (grad_x, grad_A, grad_B, grad_bias)``
    ``needs_grad`` is autograd's five booleans for ``(x, weight, bias, lora_A, lora_B)``; a gradient not
    needed is ``None``. ``dB = s·dYᵀ·t``. ``grad_bias`` is the backend's own ``Σ_rows dY`` where it comes
    for free (the Triton backend sums the columns of dY in the pass that gives dB), else ``None``:
    :func:`run_backward` computes it then. ``weight`` is only read, for ``dX = dY·W + ...``.

DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a backend may also provide

``dora_weight_norm(weight, lora_A, lora_B, scaling) -> norm (N,)``
    ``‖W_j + s·B_j·A‖`` per output row in float32 (float64 for float64 weights), computed directly (the
    sum ``W + s·B·A`` first, then its square: no cancellation between expanded terms).
``dora_forward(x, weight, bias, lora_A, lora_B, col_scale, params, out_shape=None) -> (y, t, z)``
    with ``c = col_scale = m / ‖W + s·B·A‖`` (float32, N) and ``x̃ = dropout(x)``:
    ``z = x̃·Wᵀ + s·t·Bᵀ`` (``x.dtype``, M×N, kept for ``dm``) and ``y = x·Wᵀ − x̃·Wᵀ + c ⊙ z + b``, i.e.
    ``c ⊙ z + b`` without dropout (see :func:`lora_kernels.reference.dora_linear_reference`).
``dora_backward(grad_y, x, weight, lora_A, lora_B, t, z, col_scale, params, needs_grad) -> (grad_x, grad_A,
grad_B, grad_bias, grad_z_colsum)``
    ``needs_grad`` as ``lora_backward``'s; ``grad_z_colsum = Σ_rows dY ⊙ z`` (float32, N), from which
    :func:`run_dora_backward` makes ``dm = grad_z_colsum / n``.

A backend without them (the CUDA extension) runs DoRA on the torch backend's (:func:`dora_backend_module`).

Paths (:mod:`lora_kernels.ops.routing`): a backend may offer more than one implementation of
``lora_forward``/``lora_backward`` with the signatures above, e.g. the Triton backend's ``fused`` GEMM and
its ``split`` path; :func:`run_forward` and :func:`run_backward` run the one the routing chooses. DoRA is not
routed: it runs the backend's DoRA functions.

Precision contract (the same in every backend): the matmuls run in the input's dtype (adapters are cast
tile by tile, never x), accumulate in float32, and ``t`` stays float32; ``y`` and ``grad_x`` come out in
``x.dtype``, ``grad_A``/``grad_B`` in the adapters' dtype, as under ``torch.autocast``. The scaling ``s`` is
applied in float32 to the result of each product with ``t`` (the LoRA term of ``y``, ``dB``), never folded
into ``t`` before ``t`` is cast to the compute dtype: with float16 inputs a large ``s`` (rsLoRA, large
``lora_alpha``) would overflow ``s·t`` where PEFT, which computes ``((x·Aᵀ)·Bᵀ)·s``, stays finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..dispatch import backend_module
from ..dropout import Seed, draw_seed, dropout_mask, extension_has, seed_tensor
from .routing import path_functions, select_path

#: Autograd's ``needs_input_grad`` for ``(x, weight, bias, lora_A, lora_B)``.
NeedsGrad = tuple[bool, bool, bool, bool, bool]
#: The same for DoRA, with the magnitude last: ``(x, weight, bias, lora_A, lora_B, magnitude)``.
DoRANeedsGrad = tuple[bool, bool, bool, bool, bool, bool]


@dataclass(frozen=True, slots=True)
class LoRAParams:
    """The scalars of one fused LoRA linear call, passed as one value from the autograd layer down to the
    kernels: the scaling ``s`` of the LoRA term and the dropout on its input, ``p`` and the Philox seed of
    the mask (:mod:`lora_kernels.dropout`; ignored when ``p`` is 0).

    ``seed`` is an int64 tensor of one element on the input's device, as :func:`lora_kernels.lora_linear`
    passes it (the kernels read it through its pointer: nothing is baked into a launch or a graph); an int
    is accepted too and becomes such a tensor where a kernel needs it (:func:`seed_on`); ``None`` only on
    the way into :func:`with_kept_mask`, which draws it. ``keep_bits`` is the mask packed at one bit per
    element, made once in the forward where the backend keeps it for the backward (:func:`with_kept_mask`),
    else None; ``x_dropped`` is ``dropout(x)`` as 2-D ``(M, K)``, made in the same pass, for the forward
    only (never kept for the backward). ``column_offset`` is the global column of ``x``'s first column when
    ``x`` holds a shard of the input dimension (a row-parallel layer, :mod:`lora_kernels.parallel`): the
    mask is that of the columns ``column_offset + [0, K)``, so the shards of N ranks are one mask."""

    scaling: float
    dropout_p: float = 0.0
    seed: Seed | None = 0
    keep_bits: Tensor | None = None
    x_dropped: Tensor | None = None
    column_offset: int = 0


def seed_on(params: LoRAParams, device: torch.device) -> Tensor | None:
    """The seed of ``params`` as the int64 tensor on ``device`` the kernels read; None without dropout."""
    return seed_tensor(params.seed, device) if params.dropout_p > 0.0 else None


@functools.cache
def _extension_loaded() -> bool:
    """Load the optional compiled extension (its CPU ops too); whether it is there."""
    try:
        importlib.import_module("lora_kernels._C")
    except (ImportError, OSError):
        return False
    return True


def with_kept_mask(backend: str, x: Tensor, params: LoRAParams) -> LoRAParams:
    """``params`` with ``keep_bits``, the mask packed at one bit per element (``(M, ⌈K/8⌉)`` uint8, byte
    ``(row, g)`` bit ``j`` for column ``8g + j``: one Philox call a byte), and ``x_dropped``, where the
    backend keeps the mask from the forward for the backward rather than making it again
    (:func:`keeps_mask`): one call of the extension's ``lora_dropout_keep``, which also draws the seed when
    ``params.seed`` is None (as :func:`lora_kernels.dropout.draw_seed` would). Elsewhere ``params``
    unchanged: the Triton and CUDA kernels regenerate the mask inside their tiles."""
    if (
        params.dropout_p == 0.0 or torch.compiler.is_compiling() or params.column_offset
        or not keeps_mask(backend, x)
    ):  # fmt: skip
        if params.seed is None and params.dropout_p > 0.0:  # the caller left the draw to the backend
            return dataclasses.replace(params, seed=draw_seed(x.device))
        return params
    x2d = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    seed = None if params.seed is None else seed_tensor(params.seed, x.device)
    x_dropped, bits, seed = torch.ops.lora_kernels.lora_dropout_keep.default(x2d, params.dropout_p, seed)
    return LoRAParams(params.scaling, params.dropout_p, seed, bits, x_dropped)


# keeps_mask's answers per (backend, device type, dtype): none of its conditions changes while a program runs
_KEEPS_MASK: dict[tuple[str, str, torch.dtype], bool] = {}


def keeps_mask(backend: str, x: Tensor) -> bool:
    """Whether ``backend`` keeps the dropout mask of inputs like ``x`` packed from the forward for the
    backward: the torch backend on the CPU with the compiled extension (its ops take fp16, bf16 and fp32),
    where that measured faster than making the mask again (benchmarks/NOTES.md)."""
    key = (backend, x.device.type, x.dtype)
    keeps = _KEEPS_MASK.get(key)
    if keeps is None:
        keeps = _KEEPS_MASK[key] = (
            backend == "torch" and x.device.type == "cpu" and x.dtype != torch.float64
            and _extension_loaded() and extension_has("lora_dropout_keep", x.device)
            and extension_has("lora_dropout_apply", x.device)
        )  # fmt: skip
    return keeps


class Backend(Protocol):
    """What a backend module provides (see the module docstring for the contract)."""

    def lora_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
        params: LoRAParams, out_shape: tuple[int, ...] | None = None,
    ) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def lora_backward(
        self, grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
        params: LoRAParams, needs_grad: NeedsGrad,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...  # fmt: skip


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current inside (kernels launch on the current device, not on their tensors').

    A no-op, at the cost of one query, for CPU tensors and when ``device`` is already the current device.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device.index)


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` exists for ``device_type`` (not for ``meta``, where asking whether it is
    enabled raises). About 0.2 µs, the decorator adding nothing in eager code; not cached, as a cache would be
    a guard under torch.compile. Dynamo takes the answer as a constant of the traced device type (torch 2.11
    cannot trace the C query, ``torch._C._is_autocast_available``; later releases can)."""
    return torch.amp.is_autocast_available(device_type)


# One C call that says whether autocast is on for any device type (torch >= 2.4); None where torch lacks it.
any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside; entering ``torch.autocast`` costs several µs, so only when it is on."""
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_GUARD


def _no_autocast_for(tensor: Tensor) -> contextlib.AbstractContextManager:
    """:func:`_no_autocast` for ``tensor``'s device, after one cheap query whether autocast is on at all
    (eager code and op bodies only: torch.compile does not trace the query)."""
    if any_autocast_enabled is not None and not any_autocast_enabled():
        return _NO_GUARD
    return _no_autocast(tensor.device.type)


_T_DTYPES = {dtype: torch.promote_types(dtype, torch.float32) for dtype in (torch.float16, torch.bfloat16)}
_T_DTYPES.update({torch.float32: torch.float32, torch.float64: torch.float64})


def t_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the intermediate ``t`` for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    t = _T_DTYPES.get(dtype)
    return torch.promote_types(dtype, torch.float32) if t is None else t


def _no_view_reshape(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` (contiguous, freshly allocated, not referenced elsewhere) in ``shape``, as a tensor that
    autograd does not see as a view, so that an in-place op on it is allowed (ATen's ``linear`` returns its
    N-D outputs the same way). No copy."""
    return torch.ops.aten._unsafe_view.default(tensor, shape)


def as_output(y: torch.Tensor, out_shape: tuple[int, ...] | None) -> torch.Tensor:
    """A backend's fresh 2-D ``y`` in ``out_shape`` (see ``lora_forward``), without a copy or a view."""
    if out_shape is None or tuple(y.shape) == tuple(out_shape):
        return y
    return _no_view_reshape(y, out_shape)


def _flat_input(x: Tensor, out_features: int) -> tuple[Tensor, tuple[int, ...] | None]:
    """``x`` as ``(M, in_features)`` and the output shape ``(..., out_features)`` (``None`` for a 2-D x)."""
    if x.dim() == 2:  # (the reshapes cost µs a call: skipped where x is 2-D already)
        return x, None
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), (*x.shape[:-1], out_features)


def _flat_grad(x: Tensor, grad_y: Tensor, out_features: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``grad_y`` as 2-D ``(M, in)`` / ``(M, out)``, ``grad_y`` in ``x.dtype``."""
    if x.dim() != 2:
        rows = math.prod(x.shape[:-1])
        grad_y, x = grad_y.reshape(rows, out_features), x.reshape(rows, x.shape[-1])
    if grad_y.dtype != x.dtype:
        grad_y = grad_y.to(x.dtype)
    return x, grad_y


def records_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors``, so that a backward may follow: grad mode is on (not
    ``no_grad``, not ``inference_mode``) and one of them requires a gradient. The routing keys such a call
    ``fwd_bwd``, any other ``fwd``. (Inside an autograd Function's ``forward`` grad mode is off: ask before.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: The paths whose kernels take a column offset for the dropout mask (``LoRAParams.column_offset``), with
#: the offsets they take: the Triton kernels draw the mask 8 columns a Philox call, from tiles that start at
#: multiples of 8, so their offset must be one too; the torch composite takes any.
_OFFSET_PATHS = {("triton", "fused"): 8, ("triton", "split"): 8, ("torch", "split"): 1}


def offset_route(backend: str, path: str, params: LoRAParams) -> tuple[str, str]:
    """``(backend, path)`` to run a call whose dropout mask starts at a column offset: unchanged where that
    path takes the offset, else the Triton backend's ``fused`` path (the Hopper TMA variants) or the torch
    backend (the CUDA extension; an offset that is not a multiple of 8 on Triton), which run the same math
    on the same device. Calls without dropout or offset are unchanged."""
    offset = params.column_offset
    if not offset or params.dropout_p == 0.0:
        return backend, path
    if backend == "triton" and offset % 8 == 0 and (backend, path) not in _OFFSET_PATHS:
        return backend, "fused"
    step = _OFFSET_PATHS.get((backend, path))
    if step is not None and offset % step == 0:
        return backend, path
    return "torch", "split"


def run_forward(
    backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    params: LoRAParams, path: str | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``backend``'s forward on path ``path`` (None: :func:`~lora_kernels.ops.routing.select_path` chooses)
    on an ``(..., in_features)`` input: ``(y (..., out), t (M, r))``.

    ``y`` is not a view (the backend allocates it in the ``(..., out)`` shape), so the caller may modify
    it in place as it may nn.Linear's output.
    """
    if path is None:
        training = records_backward(x, weight, bias, lora_A, lora_B)
        path = select_path(backend, x, weight, lora_A, params.dropout_p, training)
    backend, path = offset_route(backend, path, params)
    forward, _ = path_functions(backend, path)
    x2d, out_shape = _flat_input(x, weight.shape[0])
    guard = _no_autocast_for(x)  # the caller applied autocast's casts already
    if guard is _NO_GUARD:  # (entering a nullcontext is a µs we need not spend)
        return forward(x2d, weight, bias, lora_A, lora_B, params, out_shape)
    with guard:
        return forward(x2d, weight, bias, lora_A, lora_B, params, out_shape)


def run_backward(
    backend: str, grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
    params: LoRAParams, needs_grad: NeedsGrad, path: str | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients for ``(x, weight, bias, lora_A, lora_B)`` of an ``(..., in_features)`` input (``grad_x`` in
    x's shape): the backward of ``backend``'s path ``path`` (None: chosen as for a training forward), plus
    ``dW = dYᵀ·x`` and, where the backend leaves it, ``db = Σ_rows dY``."""
    if path is None:
        path = select_path(backend, x, weight, lora_A, params.dropout_p, True)
    backend, path = offset_route(backend, path, params)
    _, backward = path_functions(backend, path)
    x2d, grad_y = _flat_grad(x, grad_y, weight.shape[0])
    guard = _no_autocast_for(x)
    if guard is _NO_GUARD:
        grads = _backward_2d(backward, grad_y, x2d, weight, lora_A, lora_B, t, params, needs_grad)
    else:
        with guard:
            grads = _backward_2d(backward, grad_y, x2d, weight, lora_A, lora_B, t, params, needs_grad)
    grad_x = grads[0]
    if grad_x is not None and x2d is not x:
        grad_x = grad_x.reshape(x.shape)
    return grad_x, *grads[1:]


def _backward_2d(backward, grad_y, x, weight, lora_A, lora_B, t, params, needs_grad) -> tuple:
    """:func:`run_backward` on 2-D ``grad_y``/``x`` with a path's ``backward``, autocast off."""
    _, need_weight, need_bias, _, _ = needs_grad
    grad_x, grad_A, grad_B, grad_bias = backward(grad_y, x, weight, lora_A, lora_B, t, params, needs_grad)
    if need_bias and grad_bias is None:
        grad_bias = grad_y.sum(0)
    grad_weight = torch.mm(grad_y.t(), x) if need_weight else None
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


# --------------------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------------------


def dora_backend_module(backend: str):
    """The module that runs DoRA for ``backend``: its own where it has the DoRA functions, else torch's."""
    module = backend_module(backend)
    return module if hasattr(module, "dora_forward") else backend_module("torch")


def dora_weight_norm(
    backend: str, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:  # fmt: skip
    """``‖W + s·B·A‖`` per output row (float32; float64 for float64 weights), without autograd, on
    ``backend`` (the Triton kernel reads ``W`` once and never forms ``W + s·B·A`` in memory)."""
    with torch.no_grad(), _no_autocast(weight.device.type):
        return dora_backend_module(backend).dora_weight_norm(weight, lora_A, lora_B, scaling)


def _dora_offset_route(backend: str, params: LoRAParams) -> str:
    """The backend whose DoRA functions take ``params``' column offset (see :func:`offset_route`)."""
    return offset_route(backend, "fused" if backend == "triton" else "split", params)[0]


def run_dora_forward(
    backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    magnitude: Tensor, params: LoRAParams, norm: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """DoRA's forward on an ``(..., in_features)`` input: ``(y, t, z, col_scale, norm)``.

    ``norm = ‖W + s·B·A‖`` (detached; computed here unless given: a row-parallel layer gives the norm of
    the whole row, reduced over the ranks' shards), ``col_scale = m / norm`` (float32), ``t`` and ``z`` as
    the backends' ``dora_forward`` gives them; all five are what :func:`run_dora_backward` needs besides
    the inputs.
    """
    x2d, out_shape = _flat_input(x, weight.shape[0])
    backend = _dora_offset_route(backend, params)
    module = dora_backend_module(backend)
    with _no_autocast(x.device.type):
        if norm is None:
            norm = dora_weight_norm(backend, weight, lora_A, lora_B, params.scaling)
        norm = backend_module("torch").norm_as_magnitude(norm, magnitude)
        col_scale = magnitude.detach().to(norm.dtype) / norm
        y, t, z = module.dora_forward(x2d, weight, bias, lora_A, lora_B, col_scale, params, out_shape)
    return y, t, z, col_scale, norm


def run_dora_backward(
    backend: str, grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
    z: Tensor, col_scale: Tensor, norm: Tensor, magnitude_dtype: torch.dtype, params: LoRAParams,
    needs_grad: DoRANeedsGrad,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients for ``(x, weight, bias, lora_A, lora_B, magnitude)`` of :func:`run_dora_forward`.

    ``dm = Σ_rows (dY ⊙ z) / n``; ``dW`` (a trained base weight; the norm is detached, so only the GEMMs
    count) is ``(dY ⊙ c)ᵀ·x`` without dropout, ``dYᵀ·x + (dY ⊙ (c − 1))ᵀ·x̃`` with it.
    """
    x2d, grad_y = _flat_grad(x, grad_y, weight.shape[0])
    _, need_weight, need_bias, _, _, need_m = needs_grad
    module = dora_backend_module(_dora_offset_route(backend, params))
    with _no_autocast(x.device.type):
        grad_x, grad_A, grad_B, grad_bias, grad_z_colsum = module.dora_backward(
            grad_y, x2d, weight, lora_A, lora_B, t, z, col_scale, params, needs_grad
        )
        if need_bias and grad_bias is None:
            grad_bias = grad_y.sum(0)
        grad_weight = _dora_weight_grad(grad_y, x2d, col_scale, params) if need_weight else None
    grad_m = (grad_z_colsum / norm).to(magnitude_dtype) if need_m else None
    if grad_x is not None and grad_x.shape != x.shape:
        grad_x = grad_x.reshape(x.shape)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B, grad_m


def _dora_weight_grad(grad_y: Tensor, x: Tensor, col_scale: Tensor, params: LoRAParams) -> Tensor:
    """``dW`` of DoRA (rarely needed: the base weight is frozen in LoRA training), with torch ops."""
    dtype = grad_y.dtype  # the column scales multiply in float32 (c is close to 1: bf16 would round it)
    if params.dropout_p == 0.0:
        return torch.mm((grad_y * col_scale).to(dtype).t(), x)
    mask = dropout_mask(params.seed, x.shape, params.dropout_p, x.device, x.dtype, params.column_offset)
    return torch.mm(grad_y.t(), x).addmm_((grad_y * (col_scale - 1)).to(dtype).t(), x * mask)
