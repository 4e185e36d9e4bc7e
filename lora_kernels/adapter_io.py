"""PEFT's LoRA adapter format, read and written without PEFT: ``adapter_config.json`` + the weights.

:func:`save_adapter` writes the adapters of a model injected with :func:`lora_kernels.inject_lora` as a PEFT
adapter directory (``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` as ``PeftModel.save_pretrained`` writes them, DoRA's magnitude as
``.lora_magnitude_vector``, and ``adapter_config.json``), which
``PeftModel.from_pretrained`` loads; :func:`load_adapter` reads such a directory (ours or PEFT's) into a
plain or injected model. Needs only ``safetensors`` (without it, ``adapter_model.bin`` through
``torch.save``). Also reachable as ``lora_kernels.peft.save_adapter`` / ``load_adapter``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from .inject import attach_lora, lora_layers, matches_target
from .modules import FusedLoRALinear

__all__ = ["load_adapter", "save_adapter"]

_PREFIX = "base_model.model."
_WEIGHTS_SAFE = "adapter_model.safetensors"
_WEIGHTS_BIN = "adapter_model.bin"
_CONFIG = "adapter_config.json"


def _short_targets(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly ``names``: last components if unambiguous, else full names."""
    short = sorted({n.rpartition(".")[2] for n in names})
    chosen = {n for n, m in model.named_modules() if n and matches_target(n, short)}
    return short if chosen == set(names) else sorted(names)


def _most_common(layers: dict[str, FusedLoRALinear], attribute: str) -> Any:
    return Counter(getattr(layer, attribute) for layer in layers.values()).most_common(1)[0][0]


def _pattern(layers: dict[str, FusedLoRALinear], attribute: str, default: Any) -> dict[str, Any]:
    """PEFT's ``rank_pattern``/``alpha_pattern``: the layers whose value differs from the config's default,
    each as a regex matching exactly its module name."""
    values = {name: getattr(layer, attribute) for name, layer in layers.items()}
    return {f"^{re.escape(name)}$": value for name, value in values.items() if value != default}


def _single_value(layers: dict[str, FusedLoRALinear], attribute: str, why: str) -> Any:
    """The one value of ``attribute`` all layers share; a ValueError naming the layers where they differ."""
    groups: dict[Any, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(getattr(layer, attribute), []).append(name)
    if len(groups) > 1:
        listed = "; ".join(
            f"{attribute}={value!r}: {', '.join(sorted(names))}" for value, names in groups.items()
        )
        raise ValueError(f"{why}, but the layers differ ({listed}); give them one {attribute} before saving")
    return next(iter(groups))


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, target_modules: Any = None) -> str:
    """Write the adapters of an injected model as a PEFT LoRA adapter directory; returns the weights path.

    ``PeftModel.from_pretrained(base_model, directory)`` on the same (un-injected) base model then
    reproduces this model's outputs. Layers of a rank or alpha other than the most common one go to PEFT's
    ``rank_pattern``/``alpha_pattern``, keyed by a regex matching exactly their module name.

    Args:
        target_modules: written to the config; default the module names' last components when they select
            exactly the injected layers, else the full module names.

    Raises:
        ValueError: no injected layers, a merged layer, or layers that differ in ``lora_dropout`` or
            ``use_rslora`` or ``use_dora``, which a PEFT ``LoraConfig`` holds once for all its layers (the
            message names the layers).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no FusedLoRALinear layers; inject adapters with inject_lora first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"unmerge the layers before saving: {', '.join(merged[:5])} are merged")
    dropout = _single_value(layers, "lora_dropout", "PEFT's LoraConfig has one lora_dropout for all layers")
    rslora = _single_value(layers, "use_rslora", "PEFT's LoraConfig has one use_rslora for all layers")
    use_dora = _single_value(layers, "use_dora", "PEFT's LoraConfig has one use_dora for all layers")
    r, alpha = _most_common(layers, "r"), _most_common(layers, "lora_alpha")
    if target_modules is None:
        target_modules = _short_targets(model, sorted(layers))
    elif isinstance(target_modules, (set, tuple)):
        target_modules = sorted(target_modules)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": target_modules,
        "rank_pattern": _pattern(layers, "r", r),
        "alpha_pattern": _pattern(layers, "lora_alpha", alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
        if use_dora:  # PEFT's file key: no adapter name, no ".weight"
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = (
                layer.lora_magnitude.detach().contiguous().cpu()
            )
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
    """PEFT's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``): a key matches a module name
    as a regex on a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def _read_config(directory: str) -> dict[str, Any]:
    """``adapter_config.json``, checked to describe LoRA (or DoRA) on linear layers."""
    with open(os.path.join(directory, _CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} is a {config.get('peft_type')} adapter, not LoRA")
    unsupported = {
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    if any(unsupported.values()):
        bad = ", ".join(f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v)
        raise ValueError(f"lora_kernels cannot load this adapter as fused LoRA layers: {bad}")
    return config


def _read_weights(directory: str, use_dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter tensors as ``{module name: {"lora_A": A, "lora_B": B[, "lora_magnitude": m]}}``."""
    safe, binary = os.path.join(directory, _WEIGHTS_SAFE), os.path.join(directory, _WEIGHTS_BIN)
    if os.path.exists(safe):
        from safetensors.torch import load_file

        state = load_file(safe)
    elif os.path.exists(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} holds neither {_WEIGHTS_SAFE} nor {_WEIGHTS_BIN}")
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", name)
        if match is not None:
            per_module.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif magnitude is not None and use_dora:
            per_module.setdefault(magnitude.group(1), {})["lora_magnitude"] = tensor
        else:
            supported = "lora_A/lora_B weights" + (" and lora_magnitude_vector" if use_dora else "")
            raise ValueError(f"unexpected tensor {key!r} in {directory}: only {supported} are supported")
    expected = {"lora_A", "lora_B", "lora_magnitude"} if use_dora else {"lora_A", "lora_B"}
    for name, pair in per_module.items():
        if set(pair) != expected:
            raise ValueError(f"{directory} has only {', '.join(pair)} for module {name}")
    return per_module


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, injecting :class:`FusedLoRALinear` where needed.

    ``model`` is the plain base model (or one already injected: its layers take the adapter's alpha and
    ``use_rslora``). Every parameter but the adapters is frozen, as after :func:`lora_kernels.inject_lora`.
    Returns ``model``.

    Raises:
        ValueError: the adapter is not LoRA or DoRA on linear layers (``fan_in_fan_out``, biases,
            ``modules_to_save``, embeddings...), names a module the model does not have, or does not
            match the config or the model's layers in rank. Checked before the model changes.
    """
    directory = os.fspath(directory)
    config = _read_config(directory)
    use_dora = bool(config.get("use_dora", False))
    per_module = _read_weights(directory, use_dora)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules = dict(model.named_modules())
    options = {}
    for name, pair in sorted(per_module.items()):
        module, r = modules.get(name), pair["lora_A"].shape[0]
        if not isinstance(module, (nn.Linear, FusedLoRALinear)):
            what = (
                "which the model does not have"
                if module is None
                else f"a {type(module).__name__}, not an nn.Linear"
            )
            raise ValueError(f"the adapter targets {name!r}, {what}")
        expected_r = int(_pattern_value(rank_pattern, name, config.get("r", 8)))
        if r != expected_r:
            raise ValueError(f"{name}: lora_A has rank {r} but the config says r={expected_r}")
        if isinstance(module, FusedLoRALinear) and module.r != r:
            raise ValueError(f"{name} is a FusedLoRALinear of rank {module.r}, the adapter has rank {r}")
        if isinstance(module, FusedLoRALinear) and module.use_dora != use_dora:
            raise ValueError(
                f"{name} is a FusedLoRALinear with use_dora={module.use_dora}, the adapter has {use_dora}"
            )
        options[name] = dict(
            r=r, lora_alpha=_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)),
            lora_dropout=float(config.get("lora_dropout", 0.0)), use_rslora=use_rslora,
            adapter_dtype=pair["lora_A"].dtype, use_dora=use_dora,
        )  # fmt: skip
    layers = attach_lora(model, options, stacklevel=3)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_alpha, layer.use_rslora = options[name]["lora_alpha"], use_rslora
            layer.lora_A.copy_(per_module[name]["lora_A"])
            layer.lora_B.copy_(per_module[name]["lora_B"])
            if use_dora:
                layer.lora_magnitude.copy_(per_module[name]["lora_magnitude"])
    return model
