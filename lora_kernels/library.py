"""The autograd of the fused LoRA linear, defined once, and its ``torch.library`` registration.

One forward (:func:`lora_kernels.ops.run_forward`), one way to keep what backward needs (:func:`_save`: ``x``,
as ``nn.Linear`` keeps it, the frozen weight and adapters, which are parameters and not copied, and the
``(M, r)`` float32 intermediate ``t``; the dropout mask only where the backend keeps it packed at one bit
per element, :func:`lora_kernels.ops.with_kept_mask`, else it is regenerated from its seed) and one
backward (:func:`_backward`), reached two ways:

* :class:`LoRALinearFunction`, the eager path of :func:`lora_kernels.lora_linear`;
* the custom op ``lora_kernels::lora_linear`` with ``register_autograd``, which ``torch.compile`` traces
  without graph breaks. Its backward calls the op ``lora_kernels::lora_linear_backward`` (so the compiled
  backward graph holds an op, not the kernels), where the eager Function calls the backend directly.

Why eager keeps an autograd Function rather than calling the registered op: the op costs custom-op
dispatch, argument checks and its autograd wrapper on every call, forward and backward. Measured with
``tools/host_overhead.py``'s method (4×64 input, 32 outputs, r = 8, torch backend, forward +
``autograd.grad``, one CPU thread, torch 2.14, medians of 5×2000 calls, a 2-core CPU): ``lora_linear``
through the Function 165–172 µs a call, the same call through the op 275–283 µs (an earlier measurement on
a less loaded machine: 67 against 105 µs).

Why one op that carries the backend's name rather than a kernel per device (``register_kernel("cuda")``,
``"cpu"``): backends are not devices. CUDA tensors can run on ``triton``, ``cuda`` or ``torch``, CPU tensors
on ``torch`` or (``TRITON_INTERPRET=1``) ``triton``, and :func:`lora_kernels.use_backend` forces any of them.
A per-device kernel would still pick the backend inside, from Python state read at run time: the backward
runs after the ``with use_backend(...)`` block has exited, so it could run on another backend than its
forward. The name in the schema is chosen once, by the caller, while tracing, and saved for backward.

The ops, neither mutating its inputs:

``lora_kernels::lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend) -> (y, t)``
    ``y = x·Wᵀ + b + s·(t·Bᵀ)`` with ``t = dropout(x)·Aᵀ`` (returned so autograd can save it; it is marked
    non-differentiable).
``lora_kernels::lora_linear_backward(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed,
backend, needs_grad) -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)``
    a gradient that is not needed comes back as an empty tensor (custom ops cannot return ``None``).

Everything that depends on Python state is decided by the caller (:func:`lora_kernels.lora_linear`) and
passed in: ``backend`` is a string, ``seed`` an int64 tensor of one element on the input's device (or
``None`` without dropout), drawn by the caller (a compiled graph holds the draw; a CUDA graph replays it).
The kernels read it on the device: nothing here reads its value.
Both ops have a fake (meta) implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import (
    LoRAParams,
    as_output,
    run_backward,
    run_dora_backward,
    run_dora_forward,
    run_forward,
    t_dtype,
    with_kept_mask,
)
from .ops.routing import select_path

__all__ = [
    "DoRALinearFunction",
    "LoRALinearFunction",
    "MultiLoRALinearFunction",
    "QLoRALinearFunction",
    "lora_linear_backward_op",
    "lora_linear_op",
    "once_differentiable_grads",
]


# --------------------------------------------------------------------------------------------------------
# The shared autograd
# --------------------------------------------------------------------------------------------------------


def _save(
    ctx, x, weight, lora_A, lora_B, t, params: LoRAParams, backend: str, *, op_seed: Tensor | None = None,
    through_op: bool = False, path: str | None = None,
) -> None:  # fmt: skip
    """Keep what :func:`_backward` needs. The op passes ``through_op`` and its seed tensor ``op_seed`` (its
    ``params.seed`` is unused: the seed stays a tensor in a compiled graph); the Function, its ``params``
    (whose packed mask, if any, is saved as a tensor, seen by saved-tensor hooks like the others) and the
    ``path`` its forward ran (the backward runs the same; the op's backward chooses its own)."""
    ctx.save_for_backward(x, weight, lora_A, lora_B, t, op_seed, params.keep_bits)
    _keep_scalars(ctx, params)
    ctx.backend, ctx.through_op, ctx.path = backend, through_op, path


def _keep_scalars(ctx, params: LoRAParams) -> None:
    """Keep ``params``' scalars on ``ctx``; its packed mask, a tensor, goes into the saved tensors (so
    saved-tensor hooks see it) and comes back through :func:`_kept_params`."""
    ctx.scaling, ctx.dropout_p, ctx.seed = params.scaling, params.dropout_p, params.seed
    ctx.column_offset = params.column_offset


def _kept_params(ctx, keep_bits: Tensor | None) -> LoRAParams:
    """The :class:`LoRAParams` of the forward, from :func:`_keep_scalars` and the saved packed mask."""
    return LoRAParams(ctx.scaling, ctx.dropout_p, ctx.seed, keep_bits, column_offset=ctx.column_offset)


def _backward(ctx, grad_y: Tensor, *_):
    """Gradients for the inputs ``(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend[,
    path, column_offset])``."""
    x, weight, lora_A, lora_B, t, seed, keep_bits = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    if ctx.through_op:  # an op itself, so that a compiled backward graph holds it rather than the kernels
        grads = lora_linear_backward_op(
            grad_y, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, seed, ctx.backend, list(needs)
        )
        grads = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    else:
        params = _kept_params(ctx, keep_bits)
        if not torch.is_grad_enabled():  # the usual backward: no graph to build, no no_grad() to enter
            grads = run_backward(ctx.backend, grad_y, x, weight, lora_A, lora_B, t, params, needs, ctx.path)
        else:  # backward(create_graph=True)
            with torch.no_grad():
                grads = run_backward(
                    ctx.backend, grad_y, x, weight, lora_A, lora_B, t, params, needs, ctx.path
                )
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # backward(create_graph=True)
        grads = once_differentiable_grads((grad_y, x, weight, lora_A, lora_B), grads)
    # the scalars' (None): the op takes (scaling, dropout_p, seed, backend), the Function the path and the
    # column offset too
    return (*grads, None, None, None, None) if ctx.through_op else (*grads, *(None,) * 6)


class OnceDifferentiable(torch.autograd.Function):
    """Identity on gradients; differentiating through it again is a clear error (as ``once_differentiable``).

    Use :func:`once_differentiable_grads`: the op's inputs ride along as anchors, so the returned gradients
    hang off the graph and a second backward reaches this error instead of treating them as constants.
    """

    @staticmethod
    def forward(ctx, num_anchors: int, *tensors):
        return tensors[num_anchors:]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "lora_kernels' fused LoRA linear is once differentiable: double backward (create_graph=True "
            "through its gradients) is not supported"
        )


def once_differentiable_grads(anchors: tuple, grads: tuple) -> tuple:
    """``grads`` unchanged, tied to ``anchors`` so that differentiating them again raises a clear error."""
    anchors = tuple(a for a in anchors if isinstance(a, Tensor) and a.requires_grad)
    if not anchors:
        return grads
    return OnceDifferentiable.apply(len(anchors), *anchors, *grads)


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with a fused forward and backward on one backend.

    The eager path of :func:`lora_kernels.lora_linear` (cheaper to call than the registered op: see the
    module docstring); under ``torch.compile`` the op runs instead. Both share :func:`_save` and
    :func:`_backward`.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: Tensor | None,
        backend: str, path: str | None, column_offset: int = 0,
    ):  # fmt: skip
        """``path``: the routing's choice, made by the caller once per call signature; None: chosen here.
        ``column_offset``: the dropout mask's first column (``LoRAParams.column_offset``)."""
        params = LoRAParams(scaling, dropout_p, seed, column_offset=column_offset)
        params = with_kept_mask(backend, x, params)
        if path is None:  # training: an input takes a gradient (under no_grad too: needs_input_grad says so)
            path = select_path(backend, x, weight, lora_A, dropout_p, any(ctx.needs_input_grad[:5]))
        y, t = run_forward(backend, x, weight, bias, lora_A, lora_B, params, path)
        _save(ctx, x, weight, lora_A, lora_B, t, params, backend, path=path)
        return y

    backward = staticmethod(_backward)


class DoRALinearFunction(torch.autograd.Function):
    """DoRA's linear (PEFT's ``use_dora``) with the fused forward and backward of one backend.

    Saves ``x``, the weight and adapters (parameters: not copied), ``t`` (M×r float32), ``z`` (the M×N
    pre-scale output in ``x.dtype``, for ``dm``; see benchmarks/NOTES.md for why it is kept rather than
    recomputed), and the N-sized ``col_scale = m / n`` and ``n``. Eager only: under ``torch.compile``
    :func:`lora_kernels.dora_linear` runs the differentiable composite, which the compiler fuses itself.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float,
        seed: Tensor | None, backend: str, column_offset: int = 0, weight_norm: Tensor | None = None,
    ):  # fmt: skip
        """``column_offset``: the dropout mask's first column; ``weight_norm``: DoRA's norm, if the caller
        computed it (a row-parallel layer reduces it over the ranks), else computed here."""
        params = LoRAParams(scaling, dropout_p, seed, column_offset=column_offset)
        params = with_kept_mask(backend, x, params)
        y, t, z, col_scale, norm = run_dora_forward(
            backend, x, weight, bias, lora_A, lora_B, magnitude, params, weight_norm
        )
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, z, col_scale, norm, params.keep_bits)
        _keep_scalars(ctx, params)
        ctx.backend = backend
        ctx.magnitude_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, t, z, col_scale, norm, keep_bits = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:6])
        params = _kept_params(ctx, keep_bits)
        with torch.no_grad():
            grads = run_dora_backward(
                ctx.backend, grad_y, x, weight, lora_A, lora_B, t, z, col_scale, norm, ctx.magnitude_dtype,
                params, needs,
            )  # fmt: skip
        if torch.is_grad_enabled():  # backward(create_graph=True)
            grads = once_differentiable_grads((grad_y, x, weight, lora_A, lora_B), grads)
        return (*grads, *(None,) * 6)


class QLoRALinearFunction(torch.autograd.Function):
    """:class:`LoRALinearFunction` over a 4-bit (bitsandbytes) base weight, frozen: gradients for ``x``,
    ``bias``, ``lora_A`` and ``lora_B``. ``qweight`` is a :class:`lora_kernels.quant4bit.Weight4bit`;
    ``path`` is :func:`lora_kernels.ops.qlora.select_path`'s choice, kept for the backward. Saves what
    :class:`LoRALinearFunction` saves, with the 4-bit weight in place of the dense one (never a dequantized
    copy: the backward dequantizes again where its path needs ``W``)."""

    @staticmethod
    def forward(
        ctx, x, bias, lora_A, lora_B, qweight, scaling: float, dropout_p: float, seed: int, backend: str,
        path: str,
    ):  # fmt: skip
        from .ops.qlora import run_qlora_forward

        params = LoRAParams(scaling, dropout_p, seed)
        y, t = run_qlora_forward(backend, path, x, qweight, bias, lora_A, lora_B, params)
        ctx.save_for_backward(x, lora_A, lora_B, t)
        ctx.qweight, ctx.params, ctx.backend, ctx.path = qweight, params, backend, path
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .ops.qlora import run_qlora_backward

        x, lora_A, lora_B, t = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        with torch.no_grad():
            grads = run_qlora_backward(
                ctx.backend, ctx.path, grad_y, x, ctx.qweight, lora_A, lora_B, t, ctx.params, needs
            )
        if torch.is_grad_enabled():  # backward(create_graph=True)
            grads = once_differentiable_grads((grad_y, x, lora_A, lora_B), grads)
        return (*grads, None, None, None, None, None, None)


class MultiLoRALinearFunction(torch.autograd.Function):
    """Many adapters over one base layer (:func:`lora_kernels.multi_lora_linear`): ``y = x·Wᵀ + b +
    Σ_a s_a·(drop_a(x_a)·A_aᵀ)·B_aᵀ`` on the rows ``groups`` gives each adapter, one base GEMM, the grouped
    terms of :mod:`lora_kernels.ops.multi_lora`.

    Inputs ``(x, weight, bias, base_output, groups, params, backend, A_0, B_0, A_1, B_1, ...)``: ``weight``
    and ``bias`` are None when ``base_output`` (the output of a base layer the op does not compute) is given.
    Saves ``x``, the weight and the adapters (not copied), and the backend's ``t`` of each adapter's rows
    (float32; the Triton backend also its padded stacks, ``n·R·(K + N)`` elements)."""

    @staticmethod
    def forward(ctx, x, weight, bias, base_output, groups, params, backend: str, *adapter_tensors):
        from .ops.multi_lora import multi_forward

        adapters = list(zip(adapter_tensors[0::2], adapter_tensors[1::2], strict=True))
        x2d = x.reshape(-1, x.shape[-1])
        y, saved = multi_forward(backend, x2d, weight, bias, base_output, adapters, groups, params)
        ctx.save_for_backward(x2d, weight, *adapter_tensors, *saved)
        ctx.groups, ctx.params, ctx.backend = groups, params, backend
        ctx.x_shape, ctx.num_adapter_tensors = x.shape, len(adapter_tensors)
        ctx.base_shape = None if base_output is None else base_output.shape
        return as_output(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_y):
        from .ops.multi_lora import multi_backward

        x2d, weight, *rest = ctx.saved_tensors
        adapter_tensors, saved = rest[: ctx.num_adapter_tensors], tuple(rest[ctx.num_adapter_tensors :])
        adapters = list(zip(adapter_tensors[0::2], adapter_tensors[1::2], strict=True))
        needs = ctx.needs_input_grad
        need_x, need_weight, need_bias, need_base = needs[:4]
        need_A, need_B = any(needs[7::2]), any(needs[8::2])
        grad_y2d = grad_y.reshape(x2d.shape[0], -1)
        if grad_y2d.dtype != x2d.dtype:
            grad_y2d = grad_y2d.to(x2d.dtype)
        with torch.no_grad():
            grad_x, grads_A, grads_B = multi_backward(
                ctx.backend, grad_y2d, x2d, weight, adapters, saved, ctx.groups, ctx.params,
                (need_x, need_A, need_B),
            )  # fmt: skip
            grad_weight = torch.mm(grad_y2d.t(), x2d) if need_weight else None
            grad_bias = grad_y2d.sum(0) if need_bias else None
        grad_base = grad_y.reshape(ctx.base_shape) if need_base else None
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        grads = [g for pair in zip(grads_A, grads_B, strict=True) for g in pair]
        grads = [g if need else None for g, need in zip(grads, needs[7:], strict=True)]
        out = (grad_x, grad_weight, grad_bias, grad_base, *grads)
        if torch.is_grad_enabled():  # backward(create_graph=True)
            out = once_differentiable_grads((grad_y, x2d, *adapter_tensors), out)
        grad_x, grad_weight, grad_bias, grad_base, *grads = out
        return (grad_x, grad_weight, grad_bias, grad_base, None, None, None, *grads)


# --------------------------------------------------------------------------------------------------------
# The registered ops
# --------------------------------------------------------------------------------------------------------


def _params(scaling: float, dropout_p: float, seed: Tensor | None) -> LoRAParams:
    if seed is None or dropout_p == 0.0:
        return LoRAParams(scaling, dropout_p)
    return LoRAParams(scaling, dropout_p, seed)  # read by the kernels, on its device


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=(), device_types=None)
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Forward of the fused LoRA linear on ``backend``; ``x`` is ``(..., in_features)``."""
    y, t = run_forward(backend, x, weight, bias, lora_A, lora_B, _params(scaling, dropout_p, seed))
    return y.contiguous(), t.contiguous()  # custom ops may not return views of their inputs


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    t = x.new_empty(rows, lora_A.shape[0], dtype=t_dtype(x.dtype))
    return y, t


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=(), device_types=None)
def lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    t: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for ``(x, weight, bias, lora_A, lora_B)``; an empty tensor where ``needs_grad`` is False."""
    params, needs = _params(scaling, dropout_p, seed), tuple(bool(n) for n in needs_grad)
    grads = run_backward(backend, grad_y, x, weight, lora_A, lora_B, t, params, needs)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(
    grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, backend, needs_grad
):
    need_x, need_weight, need_bias, need_A, need_B = needs_grad
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else empty,
        x.new_empty(weight.shape) if need_weight else x.new_empty(0),
        x.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_A else x.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_B else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, t = output
    ctx.mark_non_differentiable(t)
    params = LoRAParams(scaling, dropout_p)
    _save(ctx, x, weight, lora_A, lora_B, t, params, backend, op_seed=seed, through_op=True)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
