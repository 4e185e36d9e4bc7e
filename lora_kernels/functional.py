"""The fused LoRA linear as a functional call.

``lora_linear`` applies autocast's casts, validates its inputs, picks the backend
(:mod:`lora_kernels.dispatch`) and runs the fused op: :class:`~lora_kernels.library.LoRALinearFunction` in
eager mode, the registered custom op ``lora_kernels::lora_linear`` under ``torch.compile``. Both are the one
autograd of :mod:`lora_kernels.library` (same saved tensors, same backward). The output is a fresh tensor,
never a view, so in-place ops on it (``y += ...``, as PEFT's AdaLoRA does on nn.Linear's output) work and
keep every gradient right.

Where the fused path cannot run, :func:`lora_linear` computes the same math with plain differentiable torch
ops (:func:`lora_kernels.ops.torch_lora.lora_linear_composite`), whatever backend was asked for:

* inside ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ``jacrev``, ``functional_call`` +
  ``vmap(grad(...))`` per-sample gradients), which do not take this module's autograd Function;
* under forward-mode AD (``torch.autograd.forward_ad``) when an input carries a tangent;
* on ``meta`` tensors (shapes only, as nn.Linear on the meta device).

Under ``vmap`` the dropout mask is that of each sample's own shape (the same mask for every sample, as
``randomness="same"``), and ``dropout_seed`` should be given: drawing a fresh seed is a random op, which
``vmap``'s default ``randomness="error"`` refuses.

The dropout seed is an int64 tensor on the input's device from the start (:func:`_call_seed`): drawn there
by ``torch.randint`` (:func:`lora_kernels.dropout.draw_seed`), or made from the caller's ``dropout_seed``
by ``torch.full``. Eager and compiled calls take the same path, so a compiled graph holds the draw (no
graph break, no guard on a seed's value: a new ``dropout_seed`` each step does not recompile) and a CUDA
graph replays the draw, with a fresh seed each replay.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .dispatch import MAX_KERNEL_RANK, select_backend
from .dropout import check_seed_value, draw_seed, seed_tensor
from .library import DoRALinearFunction, LoRALinearFunction, lora_linear_op
from .ops import LoRAParams, any_autocast_enabled, autocast_available, keeps_mask, records_backward
from .ops.routing import select_path, settings_key
from .ops.torch_lora import dora_linear_composite, lora_linear_composite

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(name: str, tensor: torch.Tensor) -> str:
    return f"{name} (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device})"


def _symbolic(value) -> bool:
    """True for a number ``torch.compile(dynamic=True)`` traces as a symbol (SymInt/SymFloat)."""
    return isinstance(value, torch.SymInt | torch.SymFloat)


def _check_real(name: str, value) -> None:
    """``value`` must be a real number (int or float, numpy scalars included), not a bool, str or tensor."""
    if _symbolic(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (a Python float), got {type(value).__name__} {value!r}"
        )


def check_dropout_seed(dropout_seed) -> int | Tensor | None:
    """``dropout_seed`` as an int in ``[0, 2**63)``, an int64 tensor of one element (its value is read only
    on the CPU, where that costs no host sync: :func:`~lora_kernels.dropout.check_seed_value`), or ``None``;
    else a ``TypeError``/``ValueError``. A traced int (a symbol under
    ``torch.compile``) is passed through unchecked: a check would be a guard on its value."""
    if dropout_seed is None or isinstance(dropout_seed, torch.SymInt):
        return dropout_seed
    if torch.compiler.is_compiling() and not isinstance(dropout_seed, torch.Tensor):
        return dropout_seed  # Dynamo may trace an int as a symbol, which any check here would specialise
    if isinstance(dropout_seed, torch.Tensor):
        if dropout_seed.is_floating_point() or dropout_seed.is_complex() or dropout_seed.dtype == torch.bool:
            raise TypeError(f"a dropout_seed tensor must hold an integer, got {dropout_seed.dtype}")
        if dropout_seed.numel() != 1:
            raise ValueError(
                f"a dropout_seed tensor must have one element, got shape {tuple(dropout_seed.shape)}"
            )
        seed = dropout_seed.to(torch.int64)
        check_seed_value(seed)  # on the CPU, where reading it costs no sync
        return seed
    if isinstance(dropout_seed, bool):
        raise TypeError(f"dropout_seed must be an int in [0, 2**63), got bool {dropout_seed!r}")
    try:
        seed = operator.index(dropout_seed)  # ints, numpy ints, integer 0-d tensors; not 1.5 or "3"
    except TypeError:
        raise TypeError(
            f"dropout_seed must be an int in [0, 2**63), got {type(dropout_seed).__name__} {dropout_seed!r}"
        ) from None
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout_seed must be an int in [0, 2**63), got {seed}")
    return seed


def check_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float,
) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the bad argument before any kernel is launched."""
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{_describe(name, tensor)} must be a floating-point tensor (fp16, bf16, fp32, fp64)"
            )
    if x.dim() < 1:
        raise ValueError(f"{_describe('x', x)} needs at least one dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"{_describe('weight', weight)} must be 2-D (out_features, in_features)")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"last dim of {_describe('x', x)} must equal in_features={in_features} of "
            f"{_describe('weight', weight)}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"{_describe('lora_A', lora_A)} must be (r, in_features={in_features})")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"the LoRA rank r must be >= 1, got {_describe('lora_A', lora_A)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(
            f"{_describe('lora_B', lora_B)} must be (out_features={out_features}, r={r}) to match "
            f"{_describe('weight', weight)} and {_describe('lora_A', lora_A)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{_describe('bias', bias)} must be (out_features={out_features},)")
    for name, tensor in named[1:]:
        if tensor.device != x.device:
            raise ValueError(f"{_describe(name, tensor)} is not on the device of {_describe('x', x)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"{_describe('x', x)} and the base layer ({_describe('weight', weight)}"
            f"{', ' + _describe('bias', bias) if bias is not None else ''}) must share one dtype, "
            "as nn.Linear requires; cast the input or the layer"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(
            f"{_describe('lora_A', lora_A)} and {_describe('lora_B', lora_B)} must share one dtype"
        )
    # Comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace on a float
    # argument; NaN fails both.
    _check_real("scaling", scaling)
    if not -math.inf < scaling < math.inf:
        raise ValueError(f"scaling must be a finite Python float, got {scaling!r}")
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What one call signature of :func:`lora_linear` decides, computed once (:func:`call_plan`).

    ``backend``: :func:`~lora_kernels.dispatch.select_backend`'s choice for the inputs' device, dtype and
    rank and the backend asked for; ``dropout``: whether the LoRA branch drops (``dropout_p > 0`` in
    training); ``path``: :func:`~lora_kernels.ops.routing.select_path`'s choice on that backend (a backward
    follows when autograd records the call: grad mode on and an input requiring a gradient,
    :func:`~lora_kernels.ops.records_backward`; under ``no_grad``/``inference_mode`` the call is a ``fwd``);
    ``draws_seed``: the backend draws the dropout seed itself, with the mask, in one op
    (:func:`~lora_kernels.ops.with_kept_mask`), where the caller gives none.
    """

    backend: str | None  # None: the backend asked for cannot run here (its error is raised on use)
    dropout: bool
    path: str | None  # None: no backend, or the path asked for is invalid (its error is raised on use)
    draws_seed: bool = False


# Call plans per signature: the inputs' shapes, strides, dtypes, devices and requires_grad, dropout_p,
# training, grad mode, and the settings that choose a backend and a path (routing.settings_key: the overrides, the
# environment variables, TRITON_INTERPRET). Only a signature that passed check_inputs is stored, so a bad
# input is re-checked (and raises the same error) on every call. Bounded (many distinct shapes with dynamic
# batch sizes): when full it starts over, which is atomic, so threads need no lock. Eager calls only: under
# torch.compile the inputs are checked while tracing, never here.
_CALL_PLANS: dict[tuple, CallPlan] = {}
_MAX_CALL_PLANS = 1024
_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_PLAIN_NUMBERS = frozenset((float, int))


def call_plan(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float, training: bool,
) -> CallPlan:  # fmt: skip
    """:func:`check_inputs`, the backend and the path, once per call signature (then a dict lookup).

    Raises exactly what :func:`check_inputs` raises. Tensor subclasses and scalars other than Python floats
    and ints are checked on every call, uncached.
    """
    plain = (
        type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS and type(lora_A) in _PLAIN_TENSORS
        and type(lora_B) in _PLAIN_TENSORS and (bias is None or type(bias) in _PLAIN_TENSORS)
        and type(scaling) in _PLAIN_NUMBERS and type(dropout_p) in _PLAIN_NUMBERS
    )  # fmt: skip
    if not plain:
        return _make_plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    # one flat tuple, written out: a comprehension over the tensors costs twice as much
    key = (
        settings_key(), dropout_p, bool(training), torch.is_grad_enabled(),
        x.shape, x.stride(), x.dtype, x.device, x.requires_grad,
        weight.shape, weight.stride(), weight.dtype, weight.device, weight.requires_grad,
        lora_A.shape, lora_A.stride(), lora_A.dtype, lora_A.device, lora_A.requires_grad,
        lora_B.shape, lora_B.stride(), lora_B.dtype, lora_B.device, lora_B.requires_grad,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.requires_grad),
    )  # fmt: skip
    plan = _CALL_PLANS.get(key)
    if plan is None:
        plan = _make_plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        if len(_CALL_PLANS) >= _MAX_CALL_PLANS:
            _CALL_PLANS.clear()
        _CALL_PLANS[key] = plan
    elif not -math.inf < scaling < math.inf:  # the scaling's value is not in the key: its one per-call check
        check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return plan


def _make_plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training) -> CallPlan:
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    dropout = bool(training) and dropout_p > 0.0
    try:
        backend = _backend_for(x.device, x.dtype, lora_A.shape[0])
    except (RuntimeError, ValueError):  # raised again where the fused path needs a backend: the composite
        return CallPlan(None, dropout, None)  # path (meta tensors, torch.func) runs without one
    grad = records_backward(x, weight, bias, lora_A, lora_B)
    try:
        path = select_path(backend, x, weight, lora_A, dropout_p if dropout else 0.0, grad)
    except ValueError:  # a bad LORA_KERNELS_PATH: raised again where the fused path runs
        path = None
    return CallPlan(backend, dropout, path, dropout and keeps_mask(backend, x))


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, training: bool = False, *, dropout_seed: int | None = None,
    dropout_column_offset: int = 0,
) -> Tensor:  # fmt: skip
    """Fused LoRA linear: ``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    Args:
        x: input ``(..., in_features)``; any number of leading dims, any strides.
        weight: base weight ``(out_features, in_features)``, same dtype as ``x``.
        bias: base bias ``(out_features,)`` or ``None``.
        lora_A: adapter ``(r, in_features)``.
        lora_B: adapter ``(out_features, r)``; same dtype as ``lora_A`` (may be fp32 on a bf16/fp16 base).
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_p: dropout probability on the LoRA branch, applied only when ``training``.
        training: whether dropout is active, as ``F.dropout``'s ``training``.
        dropout_seed: seed of the dropout mask, an int in ``[0, 2**63)`` or an int64 tensor of one
            element (see :func:`lora_kernels.dropout_mask`); by default a fresh one is drawn on ``x``'s
            device from its torch generator (:func:`lora_kernels.dropout.draw_seed`), so
            ``torch.manual_seed`` makes runs repeatable. Not needed under ``torch.compile`` or CUDA graphs.
        dropout_column_offset: where ``x`` holds the columns ``[o, o + in_features)`` of a wider input (a
            shard of a row-parallel layer's input, :mod:`lora_kernels.parallel`), ``o``: the mask is that
            of those columns of the wider input, so the shards of N ranks make one process's mask.

    Returns:
        ``(..., out_features)`` in ``x.dtype``: a new tensor (not a view), which may be modified in place.
    """
    offset = _check_offset(dropout_column_offset)
    if not torch.compiler.is_compiling():
        if (
            any_autocast_enabled is None or any_autocast_enabled()
        ):  # one C call when autocast is off (eager only)
            x, weight, bias = _autocast_inputs(x, weight, bias)
        plan = call_plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        dropout_seed = check_dropout_seed(dropout_seed)
        scaling = float(scaling)
        dropout_p = float(dropout_p) if plan.dropout else 0.0
        if _composite_needed(x, weight, bias, lora_A, lora_B):
            seed = _call_seed(dropout_seed, x.device) if plan.dropout else 0
            params = LoRAParams(scaling, dropout_p, seed, column_offset=offset)
            return lora_linear_composite(x, weight, bias, lora_A, lora_B, params)
        if not plan.dropout or (plan.draws_seed and dropout_seed is None):
            seed = None  # no dropout, or drawn by the backend with the mask (the same draw as _call_seed's)
        else:
            seed = _call_seed(dropout_seed, x.device)
        backend = plan.backend or _backend_for(x.device, x.dtype, lora_A.shape[0])
        return LoRALinearFunction.apply(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, plan.path, offset
        )
    x, weight, bias = _autocast_inputs(x, weight, bias)
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)  # traced once: no cache, no guard
    dropout_seed = check_dropout_seed(dropout_seed)
    dropout_p, scaling = float(dropout_p if training else 0.0), float(scaling)
    seed = _call_seed(dropout_seed, x.device) if dropout_p > 0.0 else None
    if offset and seed is not None:  # the op's schema has no offset: the composite, which the compiler fuses
        params = LoRAParams(scaling, dropout_p, seed, column_offset=offset)
        return lora_linear_composite(x, weight, bias, lora_A, lora_B, params)
    # Traced: the registered op. The rank may be a symbol too (adapters that are not nn.Parameters,
    # dynamic=True), which the constant _backend_for cannot take: only whether it exceeds the kernels'
    # limit matters to it.
    rank = MAX_KERNEL_RANK + 1 if lora_A.shape[0] > MAX_KERNEL_RANK else 1
    backend = _backend_for(x.device, x.dtype, rank)
    y, _ = lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return y


def _check_offset(offset) -> int:
    """``dropout_column_offset`` as an int >= 0, else a ``TypeError``/``ValueError``."""
    if type(offset) is int and offset >= 0:  # the common case, one check
        return offset
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"dropout_column_offset must be an int >= 0, got {type(offset).__name__} {offset!r}")
    if offset < 0:
        raise ValueError(f"dropout_column_offset must be an int >= 0, got {offset}")
    return int(offset)


def _call_seed(dropout_seed: int | Tensor | None, device: torch.device) -> Tensor:
    """The int64 seed tensor on ``device`` of one call with dropout: a fresh draw from the device's
    generator, or the caller's ``dropout_seed`` (``torch.full`` of an int, traced or not, so no guard).

    A caller's seed tensor is copied (one element, on its device, no host sync): the call keeps the value it
    had when the forward ran, so a tensor changed in place before the backward (a step counter) cannot give
    the backward another mask than the forward's."""
    if dropout_seed is None:
        return draw_seed(device)
    seed = seed_tensor(dropout_seed, device)
    if isinstance(dropout_seed, Tensor) and seed.device == dropout_seed.device:  # else .to() copied it
        seed = seed.clone()
    return seed


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    scaling: float, dropout_p: float = 0.0, training: bool = False, *, dropout_seed: int | None = None,
    dropout_column_offset: int = 0, weight_norm: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Fused DoRA linear (weight-decomposed LoRA, PEFT's ``use_dora=True``), with PEFT's semantics.

    With ``n = ‖W + s·B·A‖`` per output row, detached (DoRA paper §4.3), and ``c = magnitude / n``:
    ``y = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` without dropout (or in eval), and with dropout in training,
    ``x̃ = dropout(x)``: ``y = x·Wᵀ + b + (c − 1) ⊙ (x̃·Wᵀ) + c ⊙ s·(x̃·Aᵀ)·Bᵀ``, as PEFT's
    ``DoraLinearVariant`` computes it (:func:`lora_kernels.reference.dora_linear_reference`).

    Args:
        magnitude: DoRA's trainable magnitude ``m``, ``(out_features,)`` (PEFT's ``lora_magnitude_vector``),
            usually in the adapters' dtype.
        weight_norm: ``‖W + s·B·A‖`` per output row (float32, detached), where the caller computed it:
            a row-parallel layer (:mod:`lora_kernels.parallel`) holds a shard of each row and reduces the
            norm over the ranks; by default it is computed here (:func:`dora_weight_norm`).
        the others: as :func:`lora_linear`.

    Returns:
        ``(..., out_features)`` in ``x.dtype``, a new tensor. Gradients flow to ``x``, ``lora_A``,
        ``lora_B``, ``magnitude`` (and ``weight``/``bias`` if they require them).

    The eager call runs the fused autograd Function on the selected backend (the CUDA extension runs DoRA on
    the torch backend's ops); under ``torch.compile``, ``torch.func`` transforms, forward-mode AD and on
    ``meta`` tensors it runs the same math as plain torch ops.
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _check_magnitude(magnitude, weight, lora_A)
    dropout_seed = check_dropout_seed(dropout_seed)
    offset = _check_offset(dropout_column_offset)
    if weight_norm is not None and tuple(weight_norm.shape) != (weight.shape[0],):
        raise ValueError(f"{_describe('weight_norm', weight_norm)} must be (out_features={weight.shape[0]},)")
    dropout_p, scaling = float(dropout_p if training else 0.0), float(scaling)
    seed = _call_seed(dropout_seed, x.device) if dropout_p > 0.0 else 0
    if torch.compiler.is_compiling() or _composite_needed(x, weight, bias, lora_A, lora_B, magnitude):
        params = LoRAParams(scaling, dropout_p, seed, column_offset=offset)
        return dora_linear_composite(x, weight, bias, lora_A, lora_B, magnitude, params, weight_norm)
    backend = _backend_for(x.device, x.dtype, lora_A.shape[0])
    return DoRALinearFunction.apply(
        x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, backend, offset, weight_norm
    )


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``‖W + s·B·A‖`` per output row (``out_features``), float32 (float64 for float64 weights), without
    autograd: DoRA's detached norm, and the initial value of its magnitude. Computed on the backend
    :func:`lora_linear` would use, from one read of ``W`` where that backend fuses it (Triton)."""
    # meta tensors (meta-device init) hold shapes only: no kernel can run on them
    backend = "torch" if weight.is_meta else _backend_for(weight.device, weight.dtype, lora_A.shape[0])
    return ops.dora_weight_norm(backend, weight, lora_A, lora_B, float(scaling))


def _check_magnitude(magnitude: Tensor, weight: Tensor, lora_A: Tensor) -> None:
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if magnitude.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_describe('magnitude', magnitude)} must be a floating-point tensor")
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"{_describe('magnitude', magnitude)} must be (out_features={weight.shape[0]},)")
    if magnitude.device != weight.device:
        raise ValueError(f"{_describe('magnitude', magnitude)} is not on the device of the weight")


_forward_ad = torch.autograd.forward_ad


def _composite_needed(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the inputs need :func:`lora_linear_composite` rather than the fused autograd Function.

    ``torch.func`` transforms refuse an autograd Function whose ``forward`` takes ``ctx`` (the check below
    is the one autograd.Function makes itself, torch/_functorch/autograd_function.py; torch has no public
    one), forward-mode AD would need a ``jvp`` (the fused backward gives only the vjp), and meta tensors
    have no data for a kernel. A few hundred ns on the common path: two C calls and a module global.
    """
    if x.is_meta or torch._C._are_functorch_transforms_active():
        return True
    if _forward_ad._current_level >= 0:  # inside `with forward_ad.dual_level()`
        return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in (x, *tensors))
    return False


@torch.compiler.assume_constant_result
def _backend_for(device: torch.device, dtype: torch.dtype, rank: int) -> str:
    """:func:`select_backend`, evaluated once when ``torch.compile`` traces (the choice is baked in)."""
    return select_backend(device, dtype, rank)


def _autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under ``torch.autocast``, cast ``x``, ``weight`` and ``bias`` as ``nn.Linear`` would be.

    The adapters keep their dtype (the backends cast them tile by tile); float64 is left alone, as autocast
    does.
    """
    if not isinstance(x, torch.Tensor):
        return x, weight, bias  # check_inputs names the bad argument
    device_type = x.device.type
    if not autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


# --------------------------------------------------------------------------------------------------------
# A 4-bit (bitsandbytes) base weight: QLoRA
# --------------------------------------------------------------------------------------------------------


def _qlora_inputs(
    x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, compute_dtype: torch.dtype | None
):
    """``(w, x, bias, input dtype)``: the :class:`~lora_kernels.quant4bit.Weight4bit` of ``weight`` and the
    input and bias in the compute dtype, as ``bitsandbytes.nn.Linear4bit.forward`` casts them; checked."""
    from . import quant4bit

    w = quant4bit.describe(weight)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if x.device != w.device:
        raise ValueError(f"{_describe('x', x)} is not on the device of the 4-bit weight ({w.device})")
    input_dtype = x.dtype
    dtype = compute_dtype or x.dtype
    x = x.to(dtype)
    if bias is not None:
        bias = bias.to(dtype)

    def meta(t: Tensor | None) -> Tensor | None:  # shapes and dtypes only, for check_inputs
        return None if t is None else torch.empty_like(t, device="meta")

    dense = torch.empty(w.shape, device="meta", dtype=dtype)
    check_inputs(meta(x), dense, meta(bias), meta(lora_A), meta(lora_B), 1.0, 0.0)
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{_describe(name, tensor)} is not on the device of {_describe('x', x)}")
    return w, x, bias, input_dtype


def qlora_linear(
    x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, training: bool = False, *, dropout_seed: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """:func:`lora_linear` over a 4-bit bitsandbytes base (QLoRA): ``weight`` is the ``Params4bit`` of a
    ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, double-quantized or not, any ``quant_storage``), frozen.

    As ``Linear4bit`` does, ``x`` and ``bias`` are cast to ``compute_dtype`` (default ``x.dtype``), the
    base weight is dequantized to it (bitsandbytes' values, rounded to the original weight's dtype first),
    and the output is returned in ``x``'s dtype. Gradients flow to ``x``, ``bias`` (if it requires them),
    ``lora_A`` and ``lora_B``. The path (in-kernel dequantization or dequantize-once,
    :mod:`lora_kernels.ops.qlora`) is chosen per call; where the fused autograd cannot run
    (``torch.func``, forward-mode AD, ``torch.compile``) it runs :func:`lora_linear` on the dequantized
    weight.
    """
    w, x, bias, input_dtype = _qlora_inputs(x, weight, bias, lora_A, lora_B, compute_dtype)
    dropout_seed = check_dropout_seed(dropout_seed)
    _check_real("scaling", scaling)
    _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if torch.compiler.is_compiling() or _composite_needed(x, bias, lora_A, lora_B):
        from . import quant4bit

        dense = quant4bit.dequantize(w, x.dtype)
        y = lora_linear(
            x, dense, bias, lora_A, lora_B, scaling, dropout_p, training, dropout_seed=dropout_seed
        )
        return y.to(input_dtype)
    from .library import QLoRALinearFunction
    from .ops.qlora import select_path

    dropout_p, scaling = float(dropout_p if training else 0.0), float(scaling)
    seed = _call_seed(dropout_seed, x.device) if dropout_p > 0.0 else None
    backend = _backend_for(x.device, x.dtype, lora_A.shape[0])
    path = select_path(backend, x.numel() // max(x.shape[-1], 1) if x.shape[-1] else 0)
    y = QLoRALinearFunction.apply(x, bias, lora_A, lora_B, w, scaling, dropout_p, seed, backend, path)
    return y.to(input_dtype)


def qdora_linear(
    x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    scaling: float, dropout_p: float = 0.0, training: bool = False, *, dropout_seed: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """:func:`dora_linear` over a 4-bit bitsandbytes base (see :func:`qlora_linear` for the casts).

    The weight is dequantized to the compute dtype and :func:`dora_linear` runs on it; its autograd keeps
    that dense weight for the backward, as PEFT's DoRA on a 4-bit base does (no in-kernel path for DoRA).
    """
    from . import quant4bit
    from .ops.qlora import dequantize

    w, x, bias, input_dtype = _qlora_inputs(x, weight, bias, lora_A, lora_B, compute_dtype)
    backend = _backend_for(x.device, x.dtype, lora_A.shape[0])
    dense = (
        dequantize(backend, w, x.dtype)
        if not torch.compiler.is_compiling()
        else quant4bit.dequantize(w, x.dtype)
    )
    y = dora_linear(
        x, dense, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, dropout_seed=dropout_seed
    )
    return y.to(input_dtype)
