"""Interop with Hugging Face PEFT at run time: run PEFT's LoRA layers on the fused op.

:func:`fuse` / :func:`unfuse`: a ``PeftModel`` keeps its modules, parameters, state-dict keys and
``save_pretrained``; only the forward of each ``peft.tuners.lora.layer.Linear`` is swapped for one that
calls :func:`lora_kernels.lora_linear` on PEFT's own ``lora_A``/``lora_B`` parameters (DoRA layers:
:func:`lora_kernels.dora_linear`, with PEFT's ``lora_magnitude_vector`` as the magnitude).

This module is ``lora_kernels.peft``; ``import peft`` inside it is absolute, so it always means the real
package (imported lazily, only by :func:`fuse`). :func:`save_adapter` / :func:`load_adapter`, which
exchange adapters with PEFT in its file format without needing PEFT, live in
:mod:`lora_kernels.adapter_io` and are re-exported here.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import quant4bit
from .adapter_io import load_adapter, save_adapter
from .functional import dora_linear, lora_linear, qdora_linear, qlora_linear

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


def _why_not_fused(layer: nn.Module) -> tuple[str | None, bool]:
    """``(why, warn)``: why this PEFT LoRA layer cannot run the fused op now (``None`` if it can), and
    whether that deserves a warning: not when PEFT's forward is just the base layer (adapters disabled or
    merged, or no active adapter in this layer), which is as fast as the fused op."""
    if getattr(layer, "disable_adapters", False):
        return "adapters are disabled", False
    if getattr(layer, "merged", False):
        return "its adapter is merged into the base weight", False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return "no active adapter in this layer", False
    base = layer.base_layer
    if hasattr(base, "base_layer"):  # as PEFT's get_base_layer() tells a tuner layer
        return (
            f"its base layer is another tuner layer ({type(base).__module__.rpartition('.')[0]}"
            f".{type(base).__name__}: stacked adapters, e.g. a PeftMixedModel)",
            True,
        )
    if type(base) is nn.Linear:
        pass
    elif quant4bit.is_linear4bit(base):
        quant4bit.restore_4bit_weight(base)  # a model loaded with torch.load: its Params4bit class back
        quant4bit.check_still_4bit(
            base.weight
        )  # refused, not a fallback: PEFT's forward cannot read it either
        try:
            quant4bit.describe(base.weight)
        except (ValueError, TypeError, ImportError) as err:
            return f"its 4-bit base cannot be read by the fused kernels: {err}", True
    else:
        return f"its base layer is {type(base).__name__}, not a plain nn.Linear (quantized or wrapped)", True
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed weights)", True
    if len(active) != 1:
        return f"{len(active)} active adapters ({', '.join(active)}); the fused op runs exactly one", True
    adapter = active[0]
    dora = layer.use_dora.get(adapter, False)
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return f"a LoRA variant ({type(variant).__name__})", True
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if lora_A.bias is not None or lora_B.bias is not None:
        return "lora_bias=True", True
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"its dropout is {type(dropout).__name__}", True
    modules = [base, lora_A, lora_B, dropout]
    if dora:
        modules.append(layer.lora_magnitude_vector[adapter])
    if any(_runs_more_than_forward(m) for m in modules):
        return (
            "its base layer or adapter modules have hooks or a replaced forward (PEFT's forward runs them)",
            True,
        )
    if _global_module_hooks():
        return "global module hooks are registered (PEFT's forward runs them on the base layer)", True
    return None, False


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"lora_kernels.peft: a LoRA layer runs PEFT's own forward, not the fused op: {reason}",
            stacklevel=4,
        )


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` for one LoRA (or DoRA) adapter on an ``nn.Linear``, through the fused op."""
    peft_forward = type(self).forward
    if args or kwargs:
        if kwargs.get("adapter_names") is not None:
            _warn_once("a mixed-batch call (adapter_names=...)")
        return peft_forward(self, x, *args, **kwargs)
    why, warn = _why_not_fused(self)
    if why is not None:
        if warn:
            _warn_once(why)
        return peft_forward(self, x)
    (adapter,) = [a for a in self.active_adapters if a in self.lora_A]
    base = self.base_layer
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if x.dtype != lora_A.dtype and not getattr(self, "cast_input_dtype_enabled", True):
        _warn_once("input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)")
        return peft_forward(self, x)
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    scaling = float(self.scaling[adapter])
    dora = self.use_dora.get(adapter, False)
    magnitude = self.lora_magnitude_vector[adapter].weight if dora else None
    zero3 = [t for t in (base.weight, base.bias, lora_A, lora_B, magnitude) if hasattr(t, "ds_id")]
    if zero3 and not _zero3_gathered(self, zero3):
        return peft_forward(self, x)  # this call only (see _zero3_gathered)
    if type(base) is not nn.Linear:  # a 4-bit base, the only other kind _why_not_fused lets through: QLoRA,
        # cast as Linear4bit.forward does (see qlora_linear)
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        if dora:
            return qdora_linear(
                x, base.weight, base.bias, lora_A, lora_B, magnitude, scaling, p, dropout.training,
                compute_dtype=base.compute_dtype,
            )  # fmt: skip
        return qlora_linear(
            x,
            base.weight,
            base.bias,
            lora_A,
            lora_B,
            scaling,
            p,
            dropout.training,
            compute_dtype=base.compute_dtype,
        )
    if dora:
        return dora_linear(x, base.weight, base.bias, lora_A, lora_B, magnitude, scaling, p, dropout.training)
    return lora_linear(x, base.weight, base.bias, lora_A, lora_B, scaling, p, dropout.training)


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
    saves with ``torch.save``, pickles and deep-copies. A layer that cannot run fused falls back to PEFT's
    own forward at call time: LoRA variants other than DoRA, several active adapters, a base that is
    neither ``nn.Linear`` nor a 4-bit bitsandbytes ``Linear4bit`` (QLoRA, fused too; an 8-bit base is not), a base that is itself a tuner layer (LoHa, LoKr... in a ``PeftMixedModel``),
    ``fan_in_fan_out``, ``lora_bias``, hooks on the base layer or adapter modules (or global module hooks),
    all of which PEFT's forward honours. One warning lists those found now, and each new reason met later
    (e.g. ``adapter_names=``, a hook added) warns once. Layers whose PEFT forward is just the base layer
    (adapters merged or disabled, no active adapter in the layer) fall back silently. A layer whose forward
    was already replaced by someone else (e.g. accelerate) is not touched.
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
