"""Interop with Hugging Face PEFT: run PEFT's LoRA layers on the fused op, and exchange adapters.

* :func:`fuse` / :func:`unfuse`: a ``PeftModel`` keeps its modules, parameters, state-dict keys and
  ``save_pretrained``; only the forward of each ``peft.tuners.lora.layer.Linear`` is swapped for one that
  calls :func:`lora_kernels.lora_linear` on PEFT's own ``lora_A``/``lora_B`` parameters.
* :func:`save_adapter` / :func:`load_adapter`: write the adapters of a model injected with
  :func:`lora_kernels.inject_lora` as a PEFT adapter directory (``adapter_model.safetensors`` +
  ``adapter_config.json``, loadable by ``PeftModel.from_pretrained``), and read one back.

This module is ``lora_kernels.peft``; ``import peft`` inside it is absolute, so it always means the real
package (which is imported lazily, only by :func:`fuse`/:func:`unfuse`). Saving and loading need only
``safetensors`` (or fall back to ``adapter_model.bin``), not PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .functional import lora_linear
from .inject import lora_layers, matches_target, warn_if_never_called
from .modules import FusedLoRALinear

__all__ = ["fuse", "load_adapter", "save_adapter", "unfuse"]

_PREFIX = "base_model.model."
_WEIGHTS_SAFE = "adapter_model.safetensors"
_WEIGHTS_BIN = "adapter_model.bin"
_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------------------------------------
# fuse / unfuse
# --------------------------------------------------------------------------------------------------------


def _peft_lora_linear_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as err:
        raise ImportError(
            f"lora_kernels.peft.fuse needs the peft package ({err}); install it with pip install peft"
        ) from err
    return Linear


def _runs_more_than_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: module hooks (forward, pre-forward,
    backward: user hooks, layerwise casting as used with PEFT's ``disable_input_dtype_casting``, DeepSpeed
    ZeRO-3 parameter gathering) or a replaced ``forward`` (accelerate's ``add_hook_to_module``: offload,
    device alignment). The fused op reads the weights itself, so such a layer keeps PEFT's forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
        or getattr(module, "_hf_hook", None) is not None
    )


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
    if type(base) is not nn.Linear:
        return f"its base layer is {type(base).__name__}, not a plain nn.Linear (quantized or wrapped)", True
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed weights)", True
    if len(active) != 1:
        return f"{len(active)} active adapters ({', '.join(active)}); the fused op runs exactly one", True
    adapter = active[0]
    if layer.use_dora.get(adapter, False):
        return "DoRA (use_dora=True)", True
    if adapter in getattr(layer, "lora_variant", {}):
        return f"a LoRA variant ({type(layer.lora_variant[adapter]).__name__})", True
    lora_A, lora_B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if lora_A.bias is not None or lora_B.bias is not None:
        return "lora_bias=True", True
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"its dropout is {type(dropout).__name__}", True
    if any(_runs_more_than_forward(m) for m in (base, lora_A, lora_B, dropout)):
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
    """PEFT ``lora.Linear.forward`` for one plain LoRA adapter on an ``nn.Linear``, through the fused op."""
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
    return lora_linear(
        x, base.weight, base.bias, lora_A, lora_B, float(self.scaling[adapter]), p, dropout.training
    )


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
    own forward at call time: DoRA and other variants, several active adapters, a quantized or
    non-``nn.Linear`` base, a base that is itself a tuner layer (LoHa, LoKr... in a ``PeftMixedModel``),
    ``fan_in_fan_out``, ``lora_bias``, hooks on the base layer or adapter modules (or global module hooks),
    all of which PEFT's forward honours. One warning lists those found now, and each new reason met later
    (e.g. ``adapter_names=``, a hook added) warns once. Layers whose PEFT forward is just the base layer
    (adapters merged or disabled, no active adapter in the layer) fall back silently. A layer whose forward
    was already replaced by someone else (e.g. accelerate) is not touched.
    """
    linear_cls = _peft_lora_linear_class()
    fused, skipped = 0, Counter()
    for module in peft_model.modules():
        if not isinstance(module, linear_cls):
            continue
        forward = module.__dict__.get("forward")
        if forward is not None and not isinstance(forward, _FusedForward):
            skipped[_REPLACED] += 1
            continue
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
    """Give every layer patched by :func:`fuse` its PEFT forward back; returns how many were restored."""
    restored = 0
    for module in peft_model.modules():
        if isinstance(module.__dict__.get("forward"), _FusedForward):
            del module.__dict__["forward"]
            restored += 1
    return restored


# --------------------------------------------------------------------------------------------------------
# save_adapter / load_adapter
# --------------------------------------------------------------------------------------------------------


def _short_targets(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly ``names``: last components if unambiguous, else full names."""
    short = sorted({n.rpartition(".")[2] for n in names})
    chosen = {n for n, m in model.named_modules() if n and matches_target(n, short)}
    return short if chosen == set(names) else sorted(names)


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, target_modules: Any = None) -> str:
    """Write the adapters of an injected model as a PEFT LoRA adapter directory; returns the weights path.

    The directory holds ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight``, exactly as ``PeftModel.save_pretrained``) and ``adapter_config.json``, so
    ``PeftModel.from_pretrained(base_model, directory)`` on the same (un-injected) base model reproduces
    this model's outputs. Layers of different rank or alpha go to PEFT's ``rank_pattern``/``alpha_pattern``.

    Args:
        target_modules: written to the config; default the module names' last components when they select
            exactly the injected layers, else the full module names.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no FusedLoRALinear layers; inject adapters with inject_lora first")
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT keeps one use_rslora per adapter; the layers disagree")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"unmerge the layers before saving: {', '.join(merged[:5])} are merged")
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for layer in layers.values()).most_common(1)[0][0]
    dropouts = {layer.lora_dropout for layer in layers.values()}
    names = sorted(layers)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_rslora": rslora.pop(),
        "target_modules": target_modules if target_modules is not None else _short_targets(model, names),
        "rank_pattern": {f"^{re.escape(n)}$": layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {
            f"^{re.escape(n)}$": layer.lora_alpha for n, layer in layers.items() if layer.lora_alpha != alpha
        },
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if isinstance(config["target_modules"], (set, tuple)):
        config["target_modules"] = sorted(config["target_modules"])
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = os.path.join(directory, _WEIGHTS_BIN)
        torch.save(tensors, path)
        return path
    path = os.path.join(directory, _WEIGHTS_SAFE)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module name as a regex on a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    safe = os.path.join(directory, _WEIGHTS_SAFE)
    if os.path.exists(safe):
        from safetensors.torch import load_file

        return load_file(safe)
    binary = os.path.join(directory, _WEIGHTS_BIN)
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds neither {_WEIGHTS_SAFE} nor {_WEIGHTS_BIN}")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, injecting :class:`FusedLoRALinear` where needed.

    ``model`` is the plain base model (or one already injected). Every parameter but the adapters is
    frozen, as after :func:`lora_kernels.inject_lora`. Returns ``model``.

    Raises:
        ValueError: the adapter is not plain LoRA on linear layers (DoRA, ``fan_in_fan_out``, biases,
            ``modules_to_save``, embeddings...) or names a module the model does not have.
    """
    directory = os.fspath(directory)
    with open(os.path.join(directory, _CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} is a {config.get('peft_type')} adapter, not LoRA")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    if any(unsupported.values()):
        bad = ", ".join(f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v)
        raise ValueError(f"lora_kernels cannot load this adapter as fused LoRA layers: {bad}")
    state = _read_weights(directory)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if match is None:
            raise ValueError(
                f"unexpected tensor {key!r} in {directory}: only lora_A/lora_B weights are supported"
            )
        per_module.setdefault(match.group(1), {})[match.group(2)] = tensor
    r_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = dict(model.named_modules())
    warn_if_never_called(model, [n for n in per_module if isinstance(modules.get(n), nn.Linear)])
    for param in model.parameters():
        param.requires_grad_(False)
    for name, pair in sorted(per_module.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{directory} has only {', '.join(pair)} for module {name}")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the adapter targets {name!r}, which the model does not have")
        r = pair["lora_A"].shape[0]
        expected_r = int(_pattern_value(rank_pattern, name, r_default))
        if r != expected_r:
            raise ValueError(f"{name}: lora_A has rank {r} but the config says r={expected_r}")
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        if isinstance(module, nn.Linear):
            layer = FusedLoRALinear.from_linear(
                module,
                r=r,
                lora_alpha=alpha,
                lora_dropout=float(config.get("lora_dropout", 0.0)),
                use_rslora=bool(config.get("use_rslora", False)),
                adapter_dtype=pair["lora_A"].dtype,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        elif isinstance(module, FusedLoRALinear):
            layer = module
            if layer.r != r:
                raise ValueError(f"{name} is a FusedLoRALinear of rank {layer.r}, the adapter has rank {r}")
            layer.lora_alpha = alpha
            layer.use_rslora = bool(config.get("use_rslora", False))
            layer.scaling = alpha / (math.sqrt(r) if layer.use_rslora else r)
        else:
            raise ValueError(f"the adapter targets {name!r}, a {type(module).__name__}, not an nn.Linear")
        with torch.no_grad():
            layer.lora_A.copy_(pair["lora_A"])
            layer.lora_B.copy_(pair["lora_B"])
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model
