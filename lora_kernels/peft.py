"""Interop with Hugging Face PEFT at run time: run PEFT's LoRA layers on the fused op.

:func:`fuse` / :func:`unfuse`: a ``PeftModel`` keeps its modules, parameters, state-dict keys and
``save_pretrained``; only the forward of each ``peft.tuners.lora.layer.Linear`` is swapped for one that
calls :func:`lora_kernels.lora_linear` on PEFT's own ``lora_A``/``lora_B`` parameters (DoRA layers:
:func:`lora_kernels.dora_linear`, with PEFT's ``lora_magnitude_vector`` as the magnitude), or, for several
adapters and mixed batches, :func:`lora_kernels.multi_lora_linear`.

This module is ``lora_kernels.peft``; ``import peft`` inside it is absolute, so it always means the real
package (imported lazily, only by :func:`fuse`). :func:`save_adapter` / :func:`load_adapter`, which
exchange adapters with PEFT in its file format without needing PEFT, live in
:mod:`lora_kernels.adapter_io` and are re-exported here.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import quant4bit
from .adapter_io import load_adapter, save_adapter
from .functional import dora_linear, dora_weight_norm, lora_linear, qdora_linear, qlora_linear
from .multi_functional import AdapterTerm, multi_lora_linear

__all__ = ["fuse", "load_adapter", "save_adapter", "unfuse"]


def _peft_lora_linear_class() -> tuple[type, ...]:
    """PEFT's LoRA layer classes :func:`fuse` patches: ``lora.Linear`` and, where bitsandbytes is installed,
    ``lora.bnb.Linear4bit`` (QLoRA)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as err:
        raise ImportError(
            f"lora_kernels.peft.fuse needs the peft package ({err}); install it with pip install peft"
        ) from err
    return (Linear, *_peft_bnb_classes("Linear4bit"))


def _peft_bnb_classes(name: str) -> tuple[type, ...]:
    """PEFT's ``lora.bnb.<name>`` as a 1-tuple where PEFT defines it (bitsandbytes installed), else ``()``."""
    if quant4bit.bnb_module() is None:
        return ()
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return ()
    return (peft_bnb.__dict__[name],) if name in peft_bnb.__dict__ else ()


def _runs_more_than_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: module hooks (forward, pre-forward,
    backward: user hooks, layerwise casting as used with PEFT's ``disable_input_dtype_casting``) or a
    replaced ``forward`` (accelerate's ``add_hook_to_module``: offload, device alignment). The fused op
    reads the weights itself, so such a layer keeps PEFT's forward. DeepSpeed's own hooks (ZeRO-3's
    parameter gathering) do not count: :func:`_zero3_gathered` meets them through ZeRO-3's API."""
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    return (
        any(not _is_deepspeed_hook(hook) for table in hooks for hook in table.values())
        or "forward" in module.__dict__
        or getattr(module, "_hf_hook", None) is not None
    )


def _is_deepspeed_hook(hook: Any) -> bool:
    """Whether a module hook is DeepSpeed's (a function of the ``deepspeed`` package, or a partial of one)."""
    function = getattr(hook, "func", hook)
    module = getattr(function, "__module__", None) or ""
    return module == "deepspeed" or module.startswith("deepspeed.")


def _zero3_gathered(layer: nn.Module, tensors: list[torch.Tensor]) -> bool:
    """ZeRO-3: whether the layer's partitioned parameters (``ds_id``) are all gathered now. Each is
    registered as an external parameter of ``layer`` (``deepspeed.zero.register_external_parameter``, the
    documented way to use a parameter outside its own module's forward: ZeRO-3 then gathers it for the
    layer's forward and backward and releases it after), so from the next call on they are; until then the
    caller runs PEFT's forward, whose modules gather their own."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

    external = dict(layer.ds_external_parameters()) if hasattr(layer, "ds_external_parameters") else {}
    for param in tensors:
        if param.ds_id not in external:
            register_external_parameter(layer, param)
    return all(param.ds_status == ZeroParamStatus.AVAILABLE for param in tensors)


def _global_module_hooks() -> bool:
    """Whether hooks registered for every module (``nn.modules.module.register_module_forward_hook``...) exist."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


@dataclass(frozen=True)
class _Plan:
    """How a PEFT LoRA layer's call runs fused: its ``adapters`` (active ones, or those a mixed batch names),
    the base's ``kind`` (``linear``, ``conv1d``: weight read by the op; ``4bit``: QLoRA; ``module``: the base
    layer called, its output passed on, for a base the op cannot read: another tuner layer, hooks, an
    accelerate hook), and whether any of them is a ``dora`` adapter (one alone: the fused DoRA op; among
    several: PEFT's order-dependent chain)."""

    adapters: tuple[str, ...]
    kind: str
    dora: bool = False


def _conv1d_class() -> type | None:
    """``transformers``' GPT-2-style ``Conv1D`` (weight ``(in, out)``), if transformers is imported."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_conv1d(base: nn.Module) -> bool:
    """Whether ``base`` is a ``Conv1D`` as PEFT tells one (``isinstance``, which makes it a
    ``fan_in_fan_out`` layer) that keeps ``Conv1D``'s forward, ``x·W + b``; a subclass with its own forward
    is called as a module."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(base, conv1d) and type(base).forward is conv1d.forward


def _base_kind(layer: nn.Module) -> tuple[str | None, str | None]:
    """``(kind, why)``: how the op takes the base layer (see :class:`_Plan`), or why it cannot."""
    base = layer.base_layer
    if hasattr(base, "base_layer"):  # as PEFT's get_base_layer() tells a tuner layer: called as it is
        return "module", None
    if _runs_more_than_forward(base):  # hooks, accelerate: PEFT's forward runs them, so calling it does
        return "module", None
    if type(base) is nn.Linear:  # fan_in_fan_out set on it by hand: PEFT's forward calls it all the same
        return "linear", None
    if _is_conv1d(base):
        return "conv1d", None
    if quant4bit.is_linear4bit(base):
        quant4bit.restore_4bit_weight(base)  # a model loaded with torch.load: its Params4bit class back
        quant4bit.check_still_4bit(
            base.weight
        )  # refused, not a fallback: PEFT's forward cannot read it either
        try:
            quant4bit.describe(base.weight)
        except (ValueError, TypeError, ImportError) as err:
            return None, f"its 4-bit base cannot be read by the fused kernels: {err}"
        return "4bit", None
    if isinstance(base, nn.Module) and type(base).forward is not nn.Module.forward:
        return "module", None  # any other base layer: called, its output passed on
    return None, f"its base layer is {type(base).__name__}"


def _adapter_reason(layer: nn.Module, adapter: str, several: bool, mixed: bool) -> str | None:
    """Why ``adapter`` of ``layer`` cannot take part in a fused call (``several``: with other adapters;
    ``mixed``: in a mixed batch), or ``None``."""
    dora = layer.use_dora.get(adapter, False)
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return f"a LoRA variant ({type(variant).__name__})"
    if dora and mixed:
        return "DoRA in a mixed batch"
    if dora:  # PEFT's DoRA norm transposes W by the fan_in_fan_out the layer had when the adapter was added
        transposes = getattr(layer.lora_magnitude_vector[adapter], "fan_in_fan_out", False)
        if transposes != _is_conv1d(layer.base_layer):
            return f"DoRA with fan_in_fan_out={transposes} on a {type(layer.base_layer).__name__} base"
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if lora_A.bias is not None:
        return "a bias on lora_A"
    if lora_B.bias is not None and (dora or mixed):
        return "lora_bias=True with DoRA" if dora else "lora_bias=True in a mixed batch"
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"its dropout is {type(dropout).__name__}"
    modules = [lora_A, lora_B, dropout]
    if dora:
        modules.append(layer.lora_magnitude_vector[adapter])
    if any(_runs_more_than_forward(m) for m in modules):
        return "its adapter modules have hooks or a replaced forward (PEFT's forward runs them)"
    return None


def _plan_call(layer: nn.Module, adapter_names: list | None) -> tuple[_Plan | None, str | None, bool]:
    """``(plan, why, warn)``: how this call of a PEFT LoRA layer runs fused, or why it cannot (``why``) and
    whether that deserves a warning: not when PEFT's forward is just the base layer (adapters disabled or
    merged, no adapter of this layer in the call), which is as fast as the fused op."""
    if getattr(layer, "disable_adapters", False):
        return None, "adapters are disabled", False
    if getattr(layer, "merged", False):
        return None, "its adapter is merged into the base weight", False
    if adapter_names is not None:
        named = dict.fromkeys(n for n in adapter_names if n != "__base__" and n in layer.lora_A)
        adapters = tuple(named)
    else:
        adapters = tuple(a for a in layer.active_adapters if a in layer.lora_A)
    if not adapters:
        return None, "no active adapter in this layer", False
    kind, why = _base_kind(layer)
    if kind is None:
        return None, why, True
    several, mixed = len(adapters) > 1 or adapter_names is not None, adapter_names is not None
    for adapter in adapters:
        why = _adapter_reason(layer, adapter, several, mixed)
        if why is not None:
            return None, why, True
    dora = any(layer.use_dora.get(adapter, False) for adapter in adapters)
    if dora and kind == "module":
        return None, "DoRA on a base layer that is called as a module (a tuner layer, hooks)", True
    if dora and len(adapters) > 1 and kind == "4bit":
        return None, "DoRA among several active adapters on a 4-bit base", True
    if _global_module_hooks():
        return None, "global module hooks are registered (PEFT's forward runs them on the base layer)", True
    return _Plan(adapters, kind, dora), None, False


def _why_not_fused(layer: nn.Module) -> tuple[str | None, bool]:
    """``(why, warn)`` of :func:`_plan_call` for a call with the layer's active adapters (what :func:`fuse`
    reports)."""
    _, why, warn = _plan_call(layer, None)
    return why, warn


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"lora_kernels.peft: a LoRA layer runs PEFT's own forward, not the fused op: {reason}",
            stacklevel=4,
        )


def _base_tensors(layer: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base weight as ``(out, in)`` (a view: ``Conv1D`` stores ``(in, out)``) and its bias."""
    base = layer.base_layer
    return (base.weight.t() if kind == "conv1d" else base.weight), base.bias


def _with_lora_bias(
    bias: torch.Tensor | None, lora_B: nn.Module, scaling: float, dtype: torch.dtype | None
) -> torch.Tensor | None:
    """The base bias with ``s·b_B`` folded in where ``lora_B`` has a bias (``lora_bias=True``): PEFT's term
    ``s·(t·Bᵀ + b_B)`` in the op's bias, differentiable (``d b_B = s·Σ dY``), in ``dtype`` (the base
    weight's, which the op wants the bias in; None: left to the caller's casts)."""
    if lora_B.bias is None:
        return bias
    extra = lora_B.bias * scaling
    if dtype is not None:
        extra = extra.to(dtype)
    return extra if bias is None else bias + extra


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` through the fused op: one adapter (LoRA, DoRA, QLoRA) on the layer's
    base, or several adapters (several active, or a mixed batch, ``adapter_names=``) in one grouped call."""
    peft_forward = type(self).forward
    adapter_names = kwargs.get("adapter_names")
    if args or any(key != "adapter_names" for key in kwargs):
        return peft_forward(self, x, *args, **kwargs)
    if adapter_names is not None:
        self._check_forward_args(x, *args, **kwargs)  # PEFT's errors: the length, merged layers, DoRA
    plan, why, warn = _plan_call(self, adapter_names)
    if plan is None:
        if warn:
            _warn_once(why)
        return peft_forward(self, x, **kwargs)
    first = self.lora_A[plan.adapters[0]].weight
    if x.dtype != first.dtype and not getattr(self, "cast_input_dtype_enabled", True):
        _warn_once("input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)")
        return peft_forward(self, x, **kwargs)
    base = self.base_layer
    tensors = [base.weight, base.bias] if plan.kind != "module" else []
    for adapter in plan.adapters:
        tensors += [self.lora_A[adapter].weight, self.lora_B[adapter].weight]
        if self.use_dora.get(adapter, False):
            tensors.append(self.lora_magnitude_vector[adapter].weight)
    zero3 = [t for t in tensors if hasattr(t, "ds_id")]
    if zero3 and not _zero3_gathered(self, zero3):
        return peft_forward(self, x, **kwargs)  # this call only (see _zero3_gathered)
    if len(plan.adapters) == 1 and adapter_names is None and plan.kind != "module":
        return _single_forward(self, x, plan)
    if plan.dora:
        return _chained_forward(self, x, plan)
    return _grouped_forward(self, x, plan, adapter_names)


def _single_forward(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """One adapter on a base the op reads: :func:`lora_linear`, :func:`dora_linear` or their QLoRA forms."""
    (adapter,) = plan.adapters
    base = self.base_layer
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    scaling = float(self.scaling[adapter])
    magnitude = self.lora_magnitude_vector[adapter].weight if plan.dora else None
    if plan.kind == "4bit":  # QLoRA, cast as Linear4bit.forward does (see qlora_linear)
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        if plan.dora:
            return qdora_linear(
                x, base.weight, base.bias, lora_A, lora_B, magnitude, scaling, p, dropout.training,
                compute_dtype=base.compute_dtype,
            )  # fmt: skip
        bias = _with_lora_bias(base.bias, self.lora_B[adapter], scaling, None)
        return qlora_linear(
            x,
            base.weight,
            bias,
            lora_A,
            lora_B,
            scaling,
            p,
            dropout.training,
            compute_dtype=base.compute_dtype,
        )
    weight, bias = _base_tensors(self, plan.kind)
    if plan.dora:
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, dropout.training)
    bias = _with_lora_bias(bias, self.lora_B[adapter], scaling, weight.dtype)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, dropout.training)


def _grouped_forward(self, x: torch.Tensor, plan: _Plan, adapter_names: list | None) -> torch.Tensor:
    """Several adapters, a mixed batch, or a base called as a module: :func:`multi_lora_linear`."""
    terms = []
    for adapter in plan.adapters:
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        terms.append(AdapterTerm(A, B, float(self.scaling[adapter]), p))
    ids = None
    if adapter_names is not None:
        index = {name: i for i, name in enumerate(plan.adapters)}
        ids = [index.get(name, -1) for name in adapter_names]
    if plan.kind in ("module", "4bit"):  # the base layer's own forward gives the base output
        base_output, lora_bias = self.base_layer(x), None
        for adapter, term in zip(plan.adapters, terms, strict=True):
            lora_bias = _with_lora_bias(lora_bias, self.lora_B[adapter], term.scaling, base_output.dtype)
        if lora_bias is not None:  # lora_bias=True (all active): added to the base output, as PEFT adds it
            base_output = base_output + lora_bias
        return multi_lora_linear(
            x, None, None, terms, adapter_ids=ids, training=True, base_output=base_output
        )
    weight, bias = _base_tensors(self, plan.kind)
    for adapter, term in zip(plan.adapters, terms, strict=True):  # (all active: lora_bias folds into b)
        bias = _with_lora_bias(bias, self.lora_B[adapter], term.scaling, weight.dtype)
    y = multi_lora_linear(x, weight, bias, terms, adapter_ids=ids, training=True)
    return y


def _chained_forward(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Several active adapters with DoRA among them, in PEFT's order and with PEFT's result: a DoRA adapter
    rescales what the adapters before it made. With ``r`` the output so far, ``c = m / ‖W + s·B·A‖``
    (detached) and ``L`` its LoRA product, a DoRA adapter makes ``r ← c ⊙ (r − b) + b + c ⊙ s·L(x)``, or
    with dropout in training ``r ← r + c ⊙ (x̃·Wᵀ + s·L(x̃)) − x̃·Wᵀ`` (``x̃``: PEFT's dropout module
    applied, as PEFT does). Runs of plain LoRA adapters between them are one grouped call each; the DoRA
    products are the fused ops (:func:`lora_linear`, the grouped op), their norm :func:`dora_weight_norm`."""
    weight, bias = _base_tensors(self, plan.kind)
    result = torch.nn.functional.linear(x, weight, bias)
    run: list[AdapterTerm] = []
    run_bias: torch.Tensor | None = None  # the run's s·b_B (lora_bias=True), added with its terms

    def flush(result: torch.Tensor) -> torch.Tensor:
        nonlocal run_bias
        if run_bias is not None:
            result, run_bias = result + run_bias, None
        if run:
            result = multi_lora_linear(x, None, None, list(run), training=True, base_output=result)
            run.clear()
        return result

    for adapter in plan.adapters:
        dropout = self.lora_dropout[adapter]
        A, B, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter])
        if not self.use_dora.get(adapter, False):
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            run.append(AdapterTerm(A, B, scaling, p))
            run_bias = _with_lora_bias(run_bias, self.lora_B[adapter], scaling, result.dtype)
            continue
        result = flush(result)
        magnitude = self.lora_magnitude_vector[adapter].weight
        norm = dora_weight_norm(weight, A, B, scaling).to(magnitude.dtype)
        scale = magnitude / norm  # the norm detached (no autograd through it), as PEFT's
        if isinstance(dropout, nn.Identity) or not self.training:
            shifted = result if bias is None else result - bias
            term = multi_lora_linear(x, None, None, [AdapterTerm(A, B, scaling)], base_output=shifted)
            result = (scale * term).to(result.dtype) + (0 if bias is None else bias)
        else:
            dropped = dropout(x)
            z = lora_linear(dropped, weight, None, A, B, scaling)
            base = torch.nn.functional.linear(dropped, weight)
            result = (result + scale * z - base).to(result.dtype)
    return flush(result)


class _FusedForward:
    """The ``forward`` that :func:`fuse` sets on a PEFT layer instance.

    An object rather than a bound method so that a fused model pickles (``torch.save``), unpickles and
    deep-copies: it reduces to ``_FusedForward(layer)``, and the copy refers to the copied layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _fused_forward(self.layer, x, *args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple[nn.Module]]:
        return (_FusedForward, (self.layer,))

    def __repr__(self) -> str:
        return f"<lora_kernels fused forward of {type(self.layer).__name__} at {id(self.layer):#x}>"


_REPLACED = "its forward was already replaced (an accelerate hook?) and is left as it is"


def fuse(peft_model: nn.Module) -> int:
    """Run every PEFT LoRA ``Linear`` of ``peft_model`` on the fused op; returns how many layers can now.

    The forward of each ``peft.tuners.lora.layer.Linear`` instance is replaced; modules, parameters,
    state-dict keys, ``save_pretrained``, merging and adapter switching stay PEFT's, and the model still
    saves with ``torch.save``, pickles and deep-copies. What runs fused, decided at each call:

    * one active adapter (LoRA or DoRA) on an ``nn.Linear`` (``fan_in_fan_out`` set on it by hand included:
      PEFT's forward ignores it), a GPT-2 ``Conv1D`` (told as PEFT tells it, ``isinstance``: PEFT's
      ``fan_in_fan_out`` layers; the op reads the transposed weight, a view, no copy) or a 4-bit
      bitsandbytes base (QLoRA): :func:`lora_kernels.lora_linear` and its DoRA/QLoRA forms. With
      ``lora_bias=True``, ``s·b_B`` is folded into the bias the op adds (its gradient ``s·ΣdY``), or added to
      the base output where the base layer is called as a module;
    * several active adapters (``set_adapter([...])``) and mixed batches (``adapter_names=``, PEFT's
      "__base__" included), LoRA adapters: one grouped call, :func:`lora_kernels.multi_lora_linear`; with
      DoRA among several active adapters, PEFT's order-dependent chain (:func:`_chained_forward`);
    * a base the op cannot read (another tuner layer, e.g. LoHa in a ``PeftMixedModel``; hooks on the base
      layer; accelerate's hooks): the base layer is called as PEFT calls it, and the grouped op adds the
      LoRA terms to its output.

    A layer that cannot run fused falls back to PEFT's own forward at call time: LoRA variants other than
    DoRA, DoRA on a base called as a module or among several adapters on a 4-bit base, DoRA whose
    ``fan_in_fan_out`` (its magnitude layer's, which PEFT's norm transposes by) does not match how the base
    stores its weight, ``lora_bias`` in a mixed batch, a bias on ``lora_A`` (PEFT never sets one), an 8-bit
    base, hooks on the adapter modules (or global module hooks), disabled input casting, all of which
    PEFT's forward honours. One warning lists those found now, and each new reason met later
    warns once. Layers whose PEFT forward is just the base layer (adapters merged or disabled, no active
    adapter in the layer) fall back silently. PEFT's own argument checks (``adapter_names``' length, DoRA
    in a mixed batch, merged layers) raise as in PEFT. A layer whose forward was already replaced by someone
    else (e.g. accelerate) is not touched.
    """
    linear_cls = _peft_lora_linear_class()
    eight_bit = _peft_bnb_classes("Linear8bitLt")
    fused, skipped = 0, Counter()
    for module in peft_model.modules():
        if eight_bit and isinstance(module, eight_bit):
            skipped["an 8-bit base (bitsandbytes Linear8bitLt): only 4-bit bases run fused"] += 1
            continue
        if not isinstance(module, linear_cls):
            continue
        forward = module.__dict__.get("forward")
        if forward is not None and not isinstance(forward, _FusedForward):
            skipped[_REPLACED] += 1
            continue
        if forward is None:  # (a tensor-parallel layer's fused forward, lora_kernels.parallel, stays)
            module.forward = _FusedForward(module)
        why, warn = _why_not_fused(module)
        if why is None:
            fused += 1
        elif warn:
            skipped[why] += 1
    if skipped:
        reasons = "; ".join(f"{n} × {why}" for why, n in skipped.items())
        warnings.warn(
            f"lora_kernels.peft.fuse: {sum(skipped.values())} LoRA layer(s) keep PEFT's own forward: {reasons}",
            stacklevel=2,
        )
    return fused


def unfuse(peft_model: nn.Module) -> int:
    """Give every layer patched by :func:`fuse` its PEFT forward back; returns how many were restored.

    Tensor-parallel layers (:mod:`lora_kernels.parallel`) keep their sharded forward: PEFT's cannot run on
    the shards."""
    restored = 0
    for module in peft_model.modules():
        if type(module.__dict__.get("forward")) is _FusedForward:
            del module.__dict__["forward"]
            restored += 1
    return restored
