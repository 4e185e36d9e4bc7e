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
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from .inject import attach_lora, lora_layers, matches_target
from .modules import FusedLoRALinear
from .multi_modules import multi_layers

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


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, *, target_modules: Any = None, adapter: str | None = None
) -> str:
    """Write the adapters of an injected model as a PEFT LoRA adapter directory; returns the weights path.

    ``PeftModel.from_pretrained(base_model, directory)`` on the same (un-injected) base model then
    reproduces this model's outputs. Layers of a rank or alpha other than the most common one go to PEFT's
    ``rank_pattern``/``alpha_pattern``, keyed by a regex matching exactly their module name.

    Args:
        target_modules: written to the config; default the module names' last components when they select
            exactly the injected layers, else the full module names.
        adapter: the name of one adapter of a model with several (:class:`~lora_kernels.MultiLoRALinear`
            layers, ``inject_lora(..., adapters=...)``): that adapter alone, as its own PEFT directory.

    Raises:
        ValueError: no injected layers, a merged layer, or layers that differ in ``lora_dropout`` or
            ``use_rslora`` or ``use_dora``, which a PEFT ``LoraConfig`` holds once for all its layers (the
            message names the layers).
    """
    if adapter is not None:
        layers = {n: m.adapters[adapter] for n, m in multi_layers(model).items() if adapter in m.adapters}
        if not layers:
            names = sorted({a for m in multi_layers(model).values() for a in m.adapter_names})
            raise ValueError(f"no layer of the model has an adapter {adapter!r}; the adapters are {names}")
    else:
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


#: ``LoraConfig`` options that change the model and that fused ``nn.Linear`` layers do not implement, each
#: with what it does: an adapter that sets one is refused by name (``peft.LoraConfig``, peft 0.21).
_REFUSED_OPTIONS = {
    "fan_in_fan_out": "Conv1D-style transposed base weights",
    "bias": "trained biases of the base layers",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of other modules",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated decoder layers",
    "target_parameters": "LoRA on nn.Parameter targets (e.g. MoE experts)",
    "megatron_config": "Megatron's parallel linear layers",
    "alora_invocation_tokens": "aLoRA: the adapter acts only from the invocation tokens on",
    "velora_config": "VeLoRA: a compressed backward for lora_A",
    "use_qalora": "QALoRA: a pooled input to lora_A",
    "monteclora_config": "MonteCLoRA: sampled adapters",
    "use_bdlora": "BD-LoRA: block-diagonal lora_A or lora_B",
    "arrow_config": "Arrow: routing between adapters",
    "kasa_config": "KaSA: a singular-value diagonal and truncated base weights",
}
#: Options :func:`load_adapter` applies (``init_lora_weights``: see :func:`_initialisation`).
_APPLIED_OPTIONS = {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora",
    "init_lora_weights",
}  # fmt: skip
#: Options that do not change the loaded model: bookkeeping; the module selection (the file's tensors say which
#: modules have adapters); settings of initialisations that loading does not run or that are refused anyway.
_INERT_OPTIONS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "ensure_weight_tying",
}  # fmt: skip


def _is_set(value: Any) -> bool:
    return value not in (None, False, "none", "", [], {})


def _initialisation(init: Any) -> str:
    """What ``PeftModel.from_pretrained`` does to load an adapter saved with ``init_lora_weights=init``:
    ``"plain"``, the base weights stay as they are (after ``"eva"``, ``"orthogonal"`` and, without LoRA-GA's
    gradients, ``"lora_ga"``, too); ``"mica"``, the same with lora_B frozen; ``"pissa"`` / ``"olora"``, each
    base weight becomes the residual of PEFT's SVD / QR initialisation. A ValueError for the others."""
    name = init.lower() if isinstance(init, str) else init
    if name in ("olora", "mica") or init == "pissa":
        return name
    if isinstance(init, bool) or name == "gaussian" or init in ("eva", "orthogonal", "lora_ga"):
        return "plain"
    why = {
        "pissa_niter": "PEFT recomputes the residual base weights with a randomised SVD on every load, so the "
        "loaded model is not reproducible",
        "corda": "PEFT needs preprocess_corda's covariances to rebuild the residual base weights",
        "loftq": "PEFT quantizes the base weights again on load",
    }
    key = next((k for k in why if isinstance(init, str) and init.startswith(k)), None)
    reason = why[key] if key else "lora_kernels does not know this initialisation"
    raise ValueError(
        f"lora_kernels cannot load an adapter with init_lora_weights={init!r}: {reason}. Convert it to a plain "
        "LoRA adapter first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )


def _read_config(directory: str) -> dict[str, Any]:
    """``adapter_config.json``, checked to describe LoRA (or DoRA) on linear layers that the fused layers
    reproduce: every option that changes the model is either applied or refused by name."""
    with open(os.path.join(directory, _CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} is a {config.get('peft_type')} adapter, not LoRA")
    refused = [
        f"{key}={value!r} ({_REFUSED_OPTIONS[key]})"
        for key, value in config.items()
        if key in _REFUSED_OPTIONS and _is_set(value)
    ]
    unknown = [
        f"{key}={value!r} (an option lora_kernels does not know, from a newer PEFT?)"
        for key, value in config.items()
        if key not in {*_REFUSED_OPTIONS, *_APPLIED_OPTIONS, *_INERT_OPTIONS} and _is_set(value)
    ]
    if refused or unknown:
        raise ValueError(
            f"lora_kernels cannot load this adapter as fused LoRA layers: {'; '.join(refused + unknown)}"
        )
    _initialisation(config.get("init_lora_weights", True))
    return config


def _read_weights(
    directory: str, use_dora: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The adapter tensors as ``{module name: {"lora_A": A, "lora_B": B[, "lora_magnitude": m]}}``, and the
    base-layer tensors saved beside them as ``{parameter name in the model: tensor}``.

    PEFT's ``save_pretrained`` stores a targeted embedding layer's own weight next to the adapter
    (``save_embedding_layers="auto"``, e.g. a tied ``lm_head`` of a small Llama or Qwen model):
    ``lm_head.base_layer.weight``, which ``PeftModel.from_pretrained`` loads into the model's ``lm_head``
    (the tied weight, the model's own); a resized, untargeted embedding comes as ``embed_tokens.weight``."""
    safe, binary = os.path.join(directory, _WEIGHTS_SAFE), os.path.join(directory, _WEIGHTS_BIN)
    if os.path.exists(safe):
        from safetensors.torch import load_file

        state = load_file(safe)
    elif os.path.exists(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} holds neither {_WEIGHTS_SAFE} nor {_WEIGHTS_BIN}")
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", name)
        base_layer = re.fullmatch(r"(.+?)\.(?:base_layer\.)?(weight|bias)", name)
        if match is not None:
            per_module.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif magnitude is not None and use_dora:
            per_module.setdefault(magnitude.group(1), {})["lora_magnitude"] = tensor
        elif base_layer is not None and "lora_" not in name:
            base[f"{base_layer.group(1)}.{base_layer.group(2)}"] = tensor
        else:
            supported = "lora_A/lora_B weights" + (" and lora_magnitude_vector" if use_dora else "")
            raise ValueError(
                f"unexpected tensor {key!r} in {directory}: only {supported} (and base-layer weights saved by "
                "PEFT's save_embedding_layers) are supported"
            )
    expected = {"lora_A", "lora_B", "lora_magnitude"} if use_dora else {"lora_A", "lora_B"}
    for name, pair in per_module.items():
        if set(pair) != expected:
            raise ValueError(f"{directory} has only {', '.join(pair)} for module {name}")
    return per_module, base


def _check_base_tensors(model: nn.Module, base: dict[str, torch.Tensor], directory: str) -> None:
    """A ValueError unless each base-layer tensor saved with the adapter fits a parameter of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in base.items():
        param = params.get(name)
        if param is None or tuple(param.shape) != tuple(tensor.shape):
            found = (
                "the model has no such parameter" if param is None else f"the model's is {tuple(param.shape)}"
            )
            raise ValueError(
                f"{directory} holds the base-layer tensor {name} {tuple(tensor.shape)} (PEFT saves a targeted "
                f"or resized embedding layer's weight with save_embedding_layers), but {found}; load the "
                "adapter into the base model it was trained on (resize its embeddings first if they were "
                "resized), or save it again with save_embedding_layers=False"
            )


def _residual_weight(weight: torch.Tensor, init: str, r: int, scaling: float) -> torch.Tensor:
    """The base weight as PEFT's ``pissa_init`` / ``olora_init`` leave it when ``PeftModel.from_pretrained``
    builds the layer: ``W - s·B₀·A₀`` from the SVD (PiSSA) or QR (OLoRA) of ``W`` in float32, by the same ops in
    the same order, so the same bits."""
    w = weight.detach().to(torch.float32)
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[:r] / scaling
        lora_A, lora_B = torch.diag(torch.sqrt(Sr)) @ Uh[:r], V[:, :r] @ torch.diag(torch.sqrt(Sr))
    else:
        Q, R = torch.linalg.qr(w)
        lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return (w - scaling * lora_B @ lora_A).to(weight.dtype)


def _check_target(name: str, module: nn.Module | None, tensors: dict[str, torch.Tensor], init: str) -> None:
    """A ValueError unless ``module`` can take these adapter tensors: an ``nn.Linear`` or
    :class:`FusedLoRALinear` whose sizes fit every tensor's shape (the message names both shapes), plain for a
    PiSSA/OLoRA adapter, able to unmerge if it is merged."""
    if not isinstance(module, (nn.Linear, FusedLoRALinear)):
        what = (
            "which the model does not have"
            if module is None
            else f"a {type(module).__name__}, not an nn.Linear"
        )
        raise ValueError(f"the adapter targets {name!r}, {what}")
    lora_A = tensors["lora_A"]
    r = lora_A.shape[0] if lora_A.dim() == 2 else "r"
    expected = {
        "lora_A": (r, module.in_features),
        "lora_B": (module.out_features, r),
        "lora_magnitude": (module.out_features,),
    }
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{name}: the adapter's {key} has shape {tuple(tensor.shape)}, but the module "
                f"({type(module).__name__}, in_features={module.in_features}, out_features={module.out_features}) "
                f"needs {expected[key]}"
            )
    if init in ("pissa", "olora"):
        if isinstance(module, FusedLoRALinear):
            raise ValueError(
                f"{name} already has a fused LoRA adapter; an init_lora_weights={init!r} adapter changes the base "
                "weights as it loads (as PEFT does), so load it into the plain base model"
            )
        if module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"{name}: PEFT builds init_lora_weights={init!r} layers only on float32, float16 or bfloat16 "
                f"weights, not {module.weight.dtype}"
            )
    merged_dora = isinstance(module, FusedLoRALinear) and module.merged and module.use_dora
    if merged_dora and module._dora_merged_norm is None:
        raise ValueError(
            f"{name} is a merged DoRA layer that does not know its merge norm; it cannot unmerge"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, injecting :class:`FusedLoRALinear` where needed.

    ``model`` is the plain base model (or one already injected: its layers take the adapter's alpha,
    ``use_rslora`` and ``lora_dropout``; merged layers are unmerged, loaded and merged again, as ``load_state_dict`` does). Every
    parameter but the adapters is frozen, as after :func:`lora_kernels.inject_lora` (with MiCA's
    ``init_lora_weights="mica"``, ``lora_B`` stays frozen too, as in PEFT). The result is the model
    ``PeftModel.from_pretrained`` builds: for ``init_lora_weights="pissa"`` / ``"olora"`` that means, as in PEFT,
    that each targeted base weight is replaced by the residual of PiSSA's SVD / OLoRA's QR of it (so load such
    an adapter into the original base model, not a residual one). Base-layer weights that PEFT saved beside
    the adapter (``save_embedding_layers``: a targeted, often tied, ``lm_head``) are loaded into the model's
    own parameters, as ``PeftModel.from_pretrained`` loads them. Returns ``model``.

    Raises:
        ValueError: the adapter uses a ``LoraConfig`` option the fused layers do not implement (named in the
            message: ``fan_in_fan_out``, biases, ``modules_to_save``, aLoRA, BD-LoRA, other LoRA variants,
            ``init_lora_weights`` ``"pissa_niter_*"`` / ``"corda"`` / ``"loftq"``...), names a module the model
            does not have or that is not ``nn.Linear``, has a tensor whose shape does not fit its module (the
            message names both shapes), holds a base-layer weight that fits no parameter of the model, or does
            not match the config or the model's layers in rank. All checked before the model changes.
    """
    directory = os.fspath(directory)
    config = _read_config(directory)
    use_dora = bool(config.get("use_dora", False))
    init = _initialisation(config.get("init_lora_weights", True))
    per_module, base = _read_weights(directory, use_dora)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules = dict(model.named_modules())
    options, residuals = {}, {}
    for name, pair in sorted(per_module.items()):
        module = modules.get(name)
        _check_target(name, module, pair, init)
        r = pair["lora_A"].shape[0]
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
        if init in ("pissa", "olora"):
            alpha = options[name]["lora_alpha"]
            residuals[name] = _residual_weight(
                module.weight, init, r, alpha / (math.sqrt(r) if use_rslora else r)
            )
    _check_base_tensors(model, base, directory)
    layers = attach_lora(model, options, stacklevel=3)
    with torch.no_grad():
        merged = [layer for layer in layers.values() if layer.merged]
        for layer in merged:  # take the old adapter out of the weight first (with its own alpha)
            layer.unmerge()
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, tensor in base.items():  # as PeftModel.from_pretrained loads them (a tied weight: both)
            params[name].copy_(tensor)
        for name, layer in layers.items():
            if name in residuals:
                layer.weight.copy_(residuals[name])
            layer.lora_alpha, layer.use_rslora = options[name]["lora_alpha"], use_rslora
            layer.lora_dropout = options[name]["lora_dropout"]
            layer.lora_A.copy_(per_module[name]["lora_A"])
            layer.lora_B.copy_(per_module[name]["lora_B"])
            if use_dora:
                layer.lora_magnitude.copy_(per_module[name]["lora_magnitude"])
            if init == "mica":
                layer.lora_B.requires_grad_(False)
        for layer in merged:
            layer.merge()
    return model
