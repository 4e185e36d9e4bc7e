"""Put fused LoRA adapters into an existing model, as PEFT's ``target_modules`` does, without PEFT.

``inject_lora`` swaps matching ``nn.Linear`` modules for :class:`FusedLoRALinear` in place (the base
weights are reused, not copied) and freezes everything but the adapters; :func:`attach_lora` is that swap
and freeze for modules named one by one, each with its own options (``lora_kernels.adapter_io.load_adapter``
builds on it). ``lora_state_dict`` takes the adapter tensors out for saving; ``merge_lora``/``unmerge_lora``
fold them into the base weights and back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from typing_extensions import Unpack

from .modules import FusedLoRALinear, LoRAOptions, lora_options, lost_behaviour
from .multi_modules import MultiLoRALinear, adapter_options
from .quant4bit import quantized_base_error

__all__ = [
    "attach_lora",
    "inject_lora",
    "lora_layers",
    "lora_state_dict",
    "matches_target",
    "merge_lora",
    "unmerge_lora",
]


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a str is a regex that must match the whole module name; a list of names matches a
    module whose name equals one of them or ends with ``"." + name``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def lora_layers(model: nn.Module) -> dict[str, FusedLoRALinear]:
    """Every :class:`FusedLoRALinear` in ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


#: Modules that read a child Linear's ``weight``/``bias`` directly instead of calling it: an adapter there
#: would never run. ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``.
_PARENTS_NOT_CALLING = {nn.MultiheadAttention: ("out_proj",)}


def warn_if_never_called(model: nn.Module, names: Iterable[str], *, stacklevel: int = 2) -> None:
    """Warn for each of ``names`` whose parent module uses the child's weight without calling its forward
    (so an adapter put there would be silently ignored), e.g. ``nn.MultiheadAttention.out_proj``.
    ``stacklevel`` as ``warnings.warn`` counts it, from this function (2: its caller)."""
    ignored = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for parent_type, children in _PARENTS_NOT_CALLING.items():
            if isinstance(parent, parent_type) and child in children:
                ignored.append(f"{name} ({type(parent).__name__}.{child})")
    if ignored:
        warnings.warn(
            f"LoRA adapters on {', '.join(ignored)} have no effect: nn.MultiheadAttention reads out_proj.weight "
            "directly and never calls out_proj's forward. Leave these modules out of target_modules (or use "
            "an attention module that calls its projections).",
            stacklevel=stacklevel,
        )


#: Modules with an eval fast path that reads these children's weights without calling them: torch takes it
#: only when no forward hook is attached to the module or its children (``nn.TransformerEncoderLayer``'s
#: ``why_not_sparsity_fast_path``), so a no-op pre-hook on the parent keeps an adapter there in effect.
_PARENTS_WITH_FAST_PATH = {nn.TransformerEncoderLayer: ("linear1", "linear2")}


def _keep_off_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence keeps ``module`` off its fast path (see
    :data:`_PARENTS_WITH_FAST_PATH`), which would skip the adapters' forward. A merged adapter would be
    right there too; the layer runs its ordinary path either way."""
    return None


def _keep_adapters_called(model: nn.Module, names: Iterable[str]) -> None:
    """Hook the parents of ``names`` that have a fast path skipping those children (once per parent)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for parent_type, children in _PARENTS_WITH_FAST_PATH.items():
            hooked = _keep_off_fast_path in parent._forward_pre_hooks.values()
            if isinstance(parent, parent_type) and child in children and not hooked:
                parent.register_forward_pre_hook(_keep_off_fast_path)


#: The hook dicts of an ``nn.Module``; :func:`_move_hooks` hands the very dicts over, so the handles that
#: ``register_*_hook`` returned still remove their hooks from the new module.
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` every module hook registered on ``old`` (forward, pre-forward, backward, state dict), in
    their order, so that they run on the layer that now stands in the model."""
    for attr in _HOOK_DICTS:
        hooks, own = getattr(old, attr, None), getattr(new, attr, None)
        if hooks is None or own is None or not hooks:
            continue
        hooks.update(own)  # (the new module's own hooks, if any, after the moved ones)
        setattr(new, attr, hooks)
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def _linear_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not names:
        return "the model has no nn.Linear modules"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"nn.Linear modules in the model: {shown}"


def inject_lora(
    model: nn.Module, target_modules: str | Iterable[str], *,
    adapters: Iterable[str] | Mapping[str, Mapping] | None = None, **options: Unpack[LoRAOptions],
) -> nn.Module:  # fmt: skip
    """Replace the ``nn.Linear`` modules named by ``target_modules`` with :class:`FusedLoRALinear`.

    Args:
        model: modified in place and returned.
        target_modules: as PEFT's ``LoraConfig.target_modules``: a list of names (``["q_proj", "v_proj"]``
            matches ``model.layers.0.self_attn.q_proj``; a dotted suffix also works) or a regex string
            matched against the full module name.
        **options: the adapter's options (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
            ``init_lora_weights``, ``adapter_dtype``, ``use_dora``: :class:`~lora_kernels.modules.LoRAOptions`), as for
            :class:`FusedLoRALinear`.
        adapters: several named adapters trained at once (:class:`~lora_kernels.multi_modules.MultiLoRALinear`
            layers): a list of names, each with ``options``, or ``{name: options}`` overriding ``options``
            per adapter (e.g. ``{"a": {"r": 8}, "b": {"r": 16, "lora_dropout": 0.1}}``). Which samples each
            adapter takes is set per batch with :func:`lora_kernels.adapter_rows`. A matching
            ``MultiLoRALinear`` gets the new adapters added.

    Every parameter outside the adapters is frozen (``requires_grad=False``), as ``get_peft_model`` does.
    Modules that already are :class:`FusedLoRALinear` are left as they are.

    Warns:
        UserWarning: a matching module's parent never calls it (``nn.MultiheadAttention.out_proj``, whose
            weight MHA reads directly): its adapter would have no effect.

    Raises:
        ValueError: no module matches (the message lists some ``nn.Linear`` names to pick from).
        TypeError: a matching module is neither ``nn.Linear`` nor :class:`FusedLoRALinear`, or is an
            ``nn.Linear`` subclass with its own ``forward`` (the fused layer would not run it; the message
            names the module). Hooks on a replaced module move to its fused layer (see :func:`attach_lora`).
    """
    if adapters is not None:
        per_adapter = adapter_options(adapters, options)
    else:
        options = lora_options(options, "inject_lora")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty; name at least one module")
    matched = [(n, m) for n, m in model.named_modules() if n and matches_target(n, target_modules)]
    if not matched:
        raise ValueError(
            f"no module of the model matches target_modules={target_modules!r}; {_linear_names(model)}"
        )
    allowed = (nn.Linear, FusedLoRALinear) if adapters is None else (nn.Linear, MultiLoRALinear)
    bad = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, allowed)]
    if bad:
        raise TypeError(
            f"target_modules={target_modules!r} matches modules that are not nn.Linear: {', '.join(bad[:8])}; "
            f"only nn.Linear can take a fused LoRA adapter{'' if adapters is None else ' (FusedLoRALinear takes one)'}. "
            f"{_linear_names(model)}"
        )
    if adapters is not None:
        _attach_multi(model, dict(matched), per_adapter)
        return model
    attach_lora(model, {name: options for name, _ in matched}, stacklevel=3)
    return model


def _attach_multi(model: nn.Module, modules: dict[str, nn.Module], adapters: dict[str, LoRAOptions]) -> None:
    """A :class:`MultiLoRALinear` with ``adapters`` at each of ``modules`` (existing ones get them added);
    everything else frozen, the adapters trained."""
    refused = [
        f"{n}: {why}" for n, m in modules.items()
        if not isinstance(m, MultiLoRALinear) and (why := quantized_base_error(m) or lost_behaviour(m))
    ]  # fmt: skip
    refused += [f"{n}: an nn.Linear subclass" for n, m in modules.items() if isinstance(m, nn.Linear) and
                type(m) is not nn.Linear and not refused]  # fmt: skip
    if refused:
        raise TypeError(f"these modules cannot take several adapters: {'; '.join(refused[:8])}")
    new = [name for name, m in modules.items() if not isinstance(m, MultiLoRALinear)]
    warn_if_never_called(model, new, stacklevel=4)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in modules.items():
        if isinstance(module, MultiLoRALinear):
            for adapter, opts in adapters.items():
                module.add_adapter(adapter, opts)
            continue
        layer = MultiLoRALinear(module, adapters)
        _move_hooks(module, layer)
        _set_submodule(model, name, layer)
    _keep_adapters_called(model, new)
    for layer in model.modules():
        if isinstance(layer, MultiLoRALinear):
            for param in layer.adapter_parameters().values():
                param.requires_grad_(True)


def attach_lora(
    model: nn.Module, options: Mapping[str, LoRAOptions], *, stacklevel: int = 2
) -> dict[str, FusedLoRALinear]:
    """Put a :class:`FusedLoRALinear` at each module named in ``options`` and freeze all but the adapters.

    ``options[name]`` holds the keyword arguments of :meth:`FusedLoRALinear.from_linear` for that module: an
    ``nn.Linear`` there is replaced (its ``weight``/``bias`` reused, not copied), a :class:`FusedLoRALinear`
    is kept as it is. Then every parameter of the model outside the adapters is frozen and every adapter
    trains, as ``get_peft_model`` leaves a model. Warns where a parent never calls the module (see
    :func:`warn_if_never_called`; ``stacklevel`` as ``warnings.warn`` counts it, from this function); an
    ``nn.TransformerEncoderLayer`` whose ``linear1``/``linear2`` take an adapter gets a no-op forward
    pre-hook, which keeps it off its eval fast path (that path never calls them). Hooks registered on a
    replaced module (forward, pre-forward, backward, state dict) move to its fused layer, handles included:
    they then see the fused layer's output, base plus adapter term (with a fresh adapter, ``B = 0``, the
    base output as before). Returns the layers of ``options`` by name.

    Raises:
        ValueError: a name the model does not have; TypeError: a module that is not ``nn.Linear``, or whose
            own behaviour the fused layer would drop (:func:`~lora_kernels.modules.lost_behaviour`: an ``nn.Linear`` subclass with
            its own ``forward``, a replaced ``forward``). Both before anything changes.
    """
    named = dict(model.named_modules())
    missing = [repr(name) for name in options if name not in named]
    if missing:
        raise ValueError(f"the model has no module {', '.join(missing[:8])}")
    modules = {name: named[name] for name in options}
    bad = [
        f"{n} ({type(m).__name__})"
        for n, m in modules.items()
        if not isinstance(m, (nn.Linear, FusedLoRALinear))
    ]
    if bad:
        raise TypeError(f"only nn.Linear modules can take a fused LoRA adapter, not {', '.join(bad[:8])}")
    refused = [
        f"{n}: {why}" for n, m in modules.items() if (why := quantized_base_error(m) or lost_behaviour(m))
    ]
    if refused:
        raise TypeError(f"these modules cannot take a fused LoRA adapter: {'; '.join(refused[:8])}")
    new = [name for name, module in modules.items() if not isinstance(module, FusedLoRALinear)]
    warn_if_never_called(model, new, stacklevel=stacklevel + 1)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in new:
        linear = modules[name]
        modules[name] = FusedLoRALinear.from_linear(linear, **options[name])
        _move_hooks(linear, modules[name])
        _set_submodule(model, name, modules[name])
    _keep_adapters_called(model, new)
    for layer in lora_layers(model).values():
        for param in layer.adapter_parameters().values():
            param.requires_grad_(True)
    return modules


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (``...lora_A`` / ``...lora_B``, and DoRA's ``...lora_magnitude``), keyed as in
    ``model.state_dict()``.

    Load them back with ``model.load_state_dict(sd, strict=False)`` on an injected model.
    """
    keys = set()
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        keys.update(prefix + key for key in layer.adapter_parameters())
    return {k: v for k, v in model.state_dict().items() if k in keys}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (for inference); already merged layers are skipped."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`; layers that are not merged are skipped."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model
