"""``MultiLoRALinear``: one frozen ``nn.Linear`` base with several named LoRA adapters, trained at once.

Each batch says which rows (samples) each adapter takes (:func:`adapter_rows`), and one fused call
(:func:`lora_kernels.multi_lora_linear`) runs the base GEMM once and each adapter's term on its rows only:
each adapter's gradients are those of training it alone on its own rows. Outside an :func:`adapter_rows`
block every adapter applies to every row (their terms summed, as PEFT's several active adapters).
:func:`lora_kernels.inject_lora` with ``adapters=`` builds these layers; each adapter saves as its own PEFT
directory (``lora_kernels.peft.save_adapter(model, directory, adapter=name)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .modules import LoRAOptions, lora_options, lost_behaviour
from .multi_functional import AdapterGroups, AdapterTerm, groups_from_names, multi_lora_linear
from .quant4bit import quantized_base_error

__all__ = ["BASE", "LoRAAdapter", "MultiLoRALinear", "adapter_rows"]

#: The name of "no adapter" in :func:`adapter_rows` (PEFT's name for it; ``None`` works too).
BASE = "__base__"


class LoRAAdapter(nn.Module):
    """One adapter of a :class:`MultiLoRALinear`: ``lora_A`` (r, in), ``lora_B`` (out, r) and PEFT's options
    (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``; DoRA is not offered here)."""

    use_dora = False
    merged = False

    def __init__(self, in_features: int, out_features: int, options: LoRAOptions, device, dtype) -> None:
        super().__init__()
        if options["use_dora"]:
            raise ValueError("MultiLoRALinear adapters are LoRA adapters; use_dora=True is not supported")
        self.r, self.lora_alpha = int(options["r"]), options["lora_alpha"]
        self.lora_dropout, self.use_rslora = float(options["lora_dropout"]), options["use_rslora"]
        factory = {"device": device, "dtype": options["adapter_dtype"] or dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        self.init_lora_weights = options["init_lora_weights"]
        self.reset_lora_parameters(self.init_lora_weights)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisations: ``True`` (A kaiming-uniform, B zeros), ``"gaussian"``, ``False``."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        elif init_lora_weights is True or str(init_lora_weights).lower() == "gaussian":
            if init_lora_weights is not True:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"


class MultiLoRALinear(nn.Module):
    """``nn.Linear`` with several named LoRA adapters (``adapters[name].lora_A``/``lora_B``), base frozen.

    ``y = x·Wᵀ + b + Σ_a s_a·(drop_a(x_a)·A_aᵀ)·B_aᵀ`` with ``x_a`` the rows adapter ``a`` takes: set per
    batch with :func:`adapter_rows`, else every row (all adapters summed).
    """

    #: the samples' adapters inside an :func:`adapter_rows` block (None outside: every adapter, every row)
    _rows: _Rows | None = None

    def __init__(self, linear: nn.Linear, adapters: Mapping[str, LoRAOptions]) -> None:
        why = quantized_base_error(linear) or lost_behaviour(linear)
        if type(linear) is not nn.Linear and why is None:
            why = "only a plain nn.Linear base takes several adapters"
        if why is not None:
            raise TypeError(f"MultiLoRALinear cannot wrap this layer: {why}")
        if not adapters:
            raise ValueError("MultiLoRALinear needs at least one adapter")
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = linear.weight.requires_grad_(False)
        self.register_parameter("bias", linear.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        for name, options in adapters.items():
            self.add_adapter(name, options)
        self.train(linear.training)

    def add_adapter(self, name: str, options: LoRAOptions) -> LoRAAdapter:
        """A new adapter ``name`` with PEFT's options (:class:`~lora_kernels.modules.LoRAOptions`)."""
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise ValueError(
                f"an adapter name must be a non-empty str without '.', not {BASE!r}: got {name!r}"
            )
        if name in self.adapters:
            raise ValueError(f"this layer has an adapter {name!r} already")
        options = lora_options(options, "add_adapter")
        self.adapters[name] = LoRAAdapter(self.in_features, self.out_features, options, self.weight.device,
                                          self.weight.dtype)  # fmt: skip
        return self.adapters[name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"adapters.{n}.{k}": p
            for n, a in self.adapters.items()
            for k, p in a.adapter_parameters().items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.adapter_names
        terms = [AdapterTerm(a.lora_A, a.lora_B, a.scaling, a.lora_dropout) for a in self.adapters.values()]
        assignment = self._rows
        ids = None if assignment is None else assignment.groups_for(names, x)
        return multi_lora_linear(x, self.weight, self.bias, terms, adapter_ids=ids, training=self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={self.adapter_names}"
        )


class _Rows:
    """The adapter of each sample in an :func:`adapter_rows` block, and its index lists per set of names."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = [BASE if n is None else n for n in names]
        self._groups: dict[tuple, AdapterGroups] = {}

    def groups_for(self, layer_names: list[str], x: torch.Tensor) -> AdapterGroups:
        """The rows of each of ``layer_names`` in an input like ``x``: made once per block for all layers
        of one set of names and one input shape (a name a layer does not have runs its base there, as in
        PEFT's mixed batch)."""
        key = (tuple(layer_names), tuple(x.shape[:-1]), x.device)
        groups = self._groups.get(key)
        if groups is None:
            if x.dim() < 2 or x.shape[0] != len(self.names):
                raise ValueError(
                    f"adapter_rows names {len(self.names)} samples, but a layer's input has shape "
                    f"{tuple(x.shape)} (samples first)"
                )
            index = {n: i for i, n in enumerate(layer_names)}
            ids = [index.get(n, -1) for n in self.names]
            rows = math.prod(x.shape[:-1])
            groups = self._groups[key] = groups_from_names(ids, rows // len(ids), len(layer_names), x.device)
        return groups


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside, every :class:`MultiLoRALinear` of ``model`` runs adapter ``names[i]`` on sample ``i`` (the
    first dim of its input; ``None`` or ``"__base__"``: the base layer alone), as PEFT's
    ``adapter_names=``. Forward passes inside the block use it; their backward may run after it. The rows
    of each adapter are worked out once per block and input shape, for all layers.

    Raises ``ValueError`` for a name no layer of ``model`` has."""
    layers = list(multi_layers(model).values())
    known = {n for layer in layers for n in layer.adapter_names}
    unknown = sorted({n for n in names if n is not None and n != BASE and n not in known})
    if unknown:
        raise ValueError(f"the model has no adapter {', '.join(map(repr, unknown))}; it has {sorted(known)}")
    rows = _Rows(list(names))
    previous = [layer.__dict__.get("_rows") for layer in layers]
    for layer in layers:
        layer._rows = rows
    try:
        yield
    finally:
        for layer, before in zip(layers, previous, strict=True):
            if before is None:
                layer.__dict__.pop("_rows", None)
            else:
                layer._rows = before


def multi_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Every :class:`MultiLoRALinear` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def adapter_options(adapters: Sequence[str] | Mapping[str, Mapping[str, Any]], common: Mapping[str, Any]):
    """``{name: options}`` from a list of names (each with ``common``) or a dict of per-adapter overrides."""
    if isinstance(adapters, str):
        raise TypeError("adapters must be a list of names or a dict {name: options}, not a str")
    if isinstance(adapters, Mapping):
        return {
            name: lora_options({**common, **dict(opts)}, "inject_lora") for name, opts in adapters.items()
        }
    names = list(adapters)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be distinct, got {names}")
    return {name: lora_options(dict(common), "inject_lora") for name in names}
