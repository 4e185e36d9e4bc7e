"""``FusedLoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter, computed by the fused op."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import TypedDict, Unpack

from . import quant4bit
from .functional import dora_linear, dora_weight_norm, lora_linear, qdora_linear, qlora_linear


class LoRAOptions(TypedDict, total=False):
    """The adapter's keyword arguments, the same for :class:`FusedLoRALinear`, its ``from_linear`` and
    :func:`lora_kernels.inject_lora` (PEFT's ``LoraConfig`` names); each optional, defaults in
    :data:`LORA_DEFAULTS`. See :class:`FusedLoRALinear` for their meaning."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    init_lora_weights: bool | str
    adapter_dtype: torch.dtype | None
    use_dora: bool


#: The defaults of :class:`LoRAOptions` (PEFT's, but ``lora_alpha = r``: scaling 1).
LORA_DEFAULTS: LoRAOptions = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "init_lora_weights": True,
    "adapter_dtype": None,
    "use_dora": False,
}


def lora_options(options: Mapping[str, Any], caller: str) -> LoRAOptions:
    """``options`` completed with :data:`LORA_DEFAULTS` and checked: a ``TypeError`` for a name that is not
    an option (naming ``caller``) or a value of the wrong type, a ``ValueError`` for one out of range."""
    unknown = [repr(name) for name in options if name not in LORA_DEFAULTS]
    if unknown:
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {', '.join(unknown)}; the LoRA options are "
            f"{', '.join(LORA_DEFAULTS)}"
        )
    full: LoRAOptions = {**LORA_DEFAULTS, **options}
    _check_lora_args(full["r"], full["lora_alpha"], full["lora_dropout"])
    if not isinstance(full["use_dora"], bool):
        raise TypeError(
            f"use_dora must be a bool, got {full['use_dora']!r} ({type(full['use_dora']).__name__})"
        )
    return full


class FusedLoRALinear(nn.Module):
    """``nn.Linear`` plus a trainable low-rank update, with PEFT's names and semantics.

    ``y = x·Wᵀ + b + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ`` with ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``weight`` and ``bias`` are frozen; ``lora_A`` (r, in)
    and ``lora_B`` (out, r) train. Dropout on the LoRA branch is active in ``train()`` mode only.

    With ``use_dora=True`` the layer is DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a trainable
    magnitude ``lora_magnitude`` (out_features,) rescales each output row,
    ``y = (m / ‖W + s·B·A‖) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with the norm detached, and with dropout PEFT's
    form (:func:`lora_kernels.dora_linear`). ``lora_magnitude`` starts as that norm, so the layer starts as
    the base layer whatever the adapters' initialisation.

    ``state_dict()`` holds ``weight``, ``bias``, ``lora_A`` and ``lora_B`` (and ``lora_magnitude``); a merged
    layer adds ``lora_merged``, a bool tensor (its ``weight`` holds the adapter; a DoRA layer also keeps the
    norm it was merged with, ``lora_merged_norm``, which ``unmerge`` needs, as PEFT caches it): plain
    tensors, which safetensors and ``save_pretrained`` take. ``load_state_dict`` restores the saved layer
    exactly: a merged state dict makes the layer merged (no adapter applied twice), one without the flag
    (unmerged) makes it unmerged, the ``_extra_state`` dict of earlier versions still loads, and adapters
    alone loaded into a merged layer are re-merged (the old ones are taken out of ``weight``, the new ones
    put in).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.

    The adapter's options (:class:`LoRAOptions`, keyword-only, here as in :meth:`from_linear` and
    :func:`lora_kernels.inject_lora`):

        r: adapter rank (>= 1); default 8.
        lora_alpha: scale numerator; default 8.
        lora_dropout: dropout probability on the adapter's input, in [0, 1); default 0.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``; default False.
        init_lora_weights: ``True`` (the default: A kaiming-uniform, B zeros, so the layer starts as the
            base layer), ``"gaussian"`` (A normal with std 1/r, B zeros) or ``False`` (both random, for tests).
        adapter_dtype: dtype of ``lora_A``/``lora_B`` (and ``lora_magnitude``); default the base dtype.
            ``torch.float32`` on a bf16/fp16 base is PEFT's default and runs without casting copies of the
            input.
        use_dora: DoRA (see above); default False.
    """

    #: Whether ``weight`` is a 4-bit bitsandbytes ``Params4bit`` (set per layer by ``from_linear``).
    is_4bit = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Unpack[LoRAOptions],
    ) -> None:
        in_features = _check_int("in_features", in_features, 0)
        out_features = _check_int("out_features", out_features, 0)
        options = lora_options(options, type(self).__name__)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        bias_param = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        _reset_linear(weight, bias_param)
        self._setup(weight, bias_param, options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Unpack[LoRAOptions]) -> FusedLoRALinear:
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` tensors are reused (no copy) and frozen.

        A quantized ``bitsandbytes.nn.Linear4bit`` (QLoRA: NF4/FP4, double-quantized or not) works too: the
        layer keeps its 4-bit ``weight`` (a ``Params4bit``) and ``compute_dtype``, computes as
        ``Linear4bit`` does (input cast to the compute dtype, output in the input's dtype), and its
        adapters default to float32, as PEFT's. Merging into a 4-bit weight is refused (see :meth:`merge`).
        An 8-bit ``Linear8bitLt`` is a ``TypeError``, and so is an ``nn.Linear`` subclass with its own
        ``forward`` (:func:`lost_behaviour`), which the fused layer would not run.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        why = quant4bit.quantized_base_error(linear) or lost_behaviour(linear)
        if why is not None:
            raise TypeError(f"from_linear cannot wrap this layer: {why}")
        options = lora_options(options, "from_linear")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        if quant4bit.is_4bit_weight(linear.weight):
            quant4bit.describe(linear.weight)  # a clear error now for a weight the kernels cannot read
            module.compute_dtype = linear.compute_dtype
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        module._setup(linear.weight, linear.bias, options)
        module.train(linear.training)
        return module

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None, options: LoRAOptions) -> None:
        """The layer around ``weight``/``bias`` with the (checked, complete) adapter ``options``."""
        self.is_4bit = quant4bit.is_4bit_weight(weight)
        self.out_features, self.in_features = weight.quant_state.shape if self.is_4bit else weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)
        self.r = int(options["r"])
        self.lora_alpha = options["lora_alpha"]
        self.lora_dropout = float(options["lora_dropout"])
        self.use_rslora = options["use_rslora"]
        base_dtype = torch.float32 if self.is_4bit else weight.dtype  # 4-bit: PEFT's float32 adapters
        factory = {"device": weight.device, "dtype": options["adapter_dtype"] or base_dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.use_dora = options["use_dora"]
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **factory))
        self.merged = False
        # the norm a merged DoRA layer was merged with (moves with .to(); saved as lora_merged_norm when merged)
        self.register_buffer("_dora_merged_norm", None, persistent=False)
        self.reset_lora_parameters(options["init_lora_weights"])
        self.init_lora_weights = options["init_lora_weights"]

    @property
    def scaling(self) -> float:
        """PEFT's scaling of the LoRA term: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.

        Derived, not stored: setting ``lora_alpha`` or ``use_rslora`` changes it (on a merged layer, unmerge
        first: the merged delta was made with the old scaling).
        """
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise everything, as the constructor does (for ``to_empty()`` and meta-device init).

        ``weight``/``bias`` as ``nn.Linear.reset_parameters``, the adapters by the layer's
        ``init_lora_weights`` (by default A kaiming-uniform, B zeros); the layer ends unmerged.
        """
        if self.is_4bit:
            raise RuntimeError("reset_parameters() cannot re-initialise a 4-bit (bitsandbytes) base weight")
        _reset_linear(self.weight, self.bias)
        self.merged = False
        self.reset_lora_parameters(getattr(self, "init_lora_weights", True))

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise the adapters as PEFT does for ``init_lora_weights`` (a merged layer stays merged, with
        the new adapters)."""
        if self.merged:
            self.unmerge()
            try:
                self.reset_lora_parameters(init_lora_weights)
            finally:
                self.merge()
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )
        if self.use_dora:  # PEFT: the magnitude starts as the norm of W + s·B·A
            self.lora_magnitude.copy_(self.weight_norm())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of the adapter by name: ``lora_A``, ``lora_B`` and, with DoRA,
        ``lora_magnitude``."""
        params = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.use_dora:
            params["lora_magnitude"] = self.lora_magnitude
        return params

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``‖W + s·B·A‖`` per output row (float32, no autograd), of the *unmerged* weight."""
        if self.merged:
            raise RuntimeError("weight_norm() needs the unmerged weight; unmerge() first")
        return dora_weight_norm(self.dense_weight(), self.lora_A, self.lora_B, self.scaling)

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a float tensor: ``weight`` itself, or a 4-bit weight dequantized (bitsandbytes'
        values, in the original weight's dtype)."""
        if not self.is_4bit:
            return self.weight
        return quant4bit.dequantize(quant4bit.describe(self.weight))

    def delta_weight(self) -> torch.Tensor:
        """``scaling · lora_B · lora_A`` in the base weight's dtype (computed in fp32)."""
        return self._delta_weight_f32().to(self._base_dtype())

    def _base_dtype(self) -> torch.dtype:
        return self.weight.quant_state.dtype if self.is_4bit else self.weight.dtype

    def _delta_weight_f32(self) -> torch.Tensor:
        dtype = torch.promote_types(self._base_dtype(), torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (for inference); a second call warns and does nothing.

        DoRA, as PEFT merges it: ``W ← (m / n) ⊙ (W + s·B·A)`` with ``n = ‖W + s·B·A‖`` of the unmerged
        weight, computed in float32; ``n`` is kept for :meth:`unmerge`.

        A 4-bit base is refused: the merged weight would be requantized, which rounds the adapter away
        unevenly (PEFT warns about it); dequantize the model first, or merge with PEFT.
        """
        self._refuse_4bit("merge")
        if self.merged:
            warnings.warn("FusedLoRALinear is already merged; merge() did nothing", stacklevel=2)
            return
        if self.use_dora:
            # the norm the forward divides by, rounded to the magnitude's dtype (ops.torch_lora.norm_as_magnitude)
            norm = self.weight_norm()
            norm = norm.to(self.lora_magnitude.dtype).to(norm.dtype)
            factor = (self.lora_magnitude.float() / norm)[:, None]
            merged = (self.weight.float() + self._delta_weight_f32()) * factor
            self.weight.copy_(merged)
            self._dora_merged_norm = norm
        else:
            self.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``weight``; on an unmerged layer it warns and does nothing.

        DoRA: ``W ← W / (m / n) − s·B·A`` with the ``n`` :meth:`merge` used (as PEFT's cached norm).
        """
        self._refuse_4bit("unmerge")
        if not self.merged:
            warnings.warn("FusedLoRALinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        if self.use_dora:
            if self._dora_merged_norm is None:
                raise RuntimeError(
                    "this merged DoRA layer does not know the norm it was merged with, so it cannot unmerge"
                )
            factor = (self.lora_magnitude.float() / self._dora_merged_norm)[:, None]
            self.weight.copy_(self.weight.float() / factor - self._delta_weight_f32())
            self._dora_merged_norm = None
        else:
            self.weight -= self.delta_weight()
        self.merged = False

    def _refuse_4bit(self, what: str) -> None:
        if self.is_4bit:
            raise RuntimeError(
                f"{what}() is not supported on a 4-bit (bitsandbytes) base: the merged weight would have to be "
                "requantized, which rounds the adapter unevenly. Dequantize the base first (e.g. load the model "
                "in bf16 and load the adapters with lora_kernels.adapter_io.load_adapter), or merge with PEFT"
            )

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``torch.load`` of a saved module, pickle): a 4-bit weight gets its ``Params4bit`` class
        back, which ``nn.Parameter``'s pickling drops (:func:`lora_kernels.quant4bit.restore_4bit_weight`)."""
        super().__setstate__(state)
        if self.__dict__.get("is_4bit"):
            quant4bit.restore_4bit_weight(self)

    # ---------------------------------------------------------------------------------------- state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_4bit:  # the quant state under weight., as bitsandbytes' Linear4bit saves it
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()
        if self.merged:  # unmerged: the plain format, weight is the base weight (as in old state dicts)
            destination[prefix + _MERGED_KEY] = torch.tensor(True, device=self.weight.device)
            norm = self._dora_merged_norm if self.use_dora else None
            if norm is not None:
                destination[prefix + _MERGED_NORM_KEY] = norm if keep_vars else norm.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        merged_key, norm_key = prefix + _MERGED_KEY, prefix + _MERGED_NORM_KEY
        # the format of earlier versions: {"merged": bool[, "dora_weight_norm": norm]}
        old_key = prefix + _EXTRA_STATE
        has_weight = prefix + "weight" in state_dict
        has_adapters = any(prefix + name in state_dict for name in self.adapter_parameters())
        remerge = self.merged and not has_weight and has_adapters
        if remerge:  # adapters alone into a merged layer: take the old ones out of the weight first
            self.unmerge()
        errors = len(error_msgs)
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            if remerge:
                self.merge()
        for key in (merged_key, norm_key, old_key):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if has_weight and len(error_msgs) == errors:
            merged, norm = state_dict.get(merged_key), state_dict.get(norm_key)
            old = state_dict.get(old_key)
            if merged is None and isinstance(old, dict):
                merged, norm = old.get("merged", False), old.get("dora_weight_norm")
            self.merged = bool(merged) if merged is not None else False
            norm = norm if self.merged and self.use_dora else None
            self._dora_merged_norm = None if norm is None else norm.to(self.weight.device, torch.float32)
        if self.is_4bit:  # the quant state saved with a 4-bit weight (see _save_to_state_dict)
            quant_keys = [k for k in unexpected_keys if k.startswith(prefix + "weight.")]
            for key in quant_keys:
                unexpected_keys.remove(key)
            if has_weight and len(error_msgs) == errors:
                quant4bit.load_quant_state(
                    self.weight, {k: state_dict[k] for k in quant_keys}, prefix + "weight."
                )

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_4bit:
            return self._forward_4bit(x)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            return dora_linear(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling,
                self.lora_dropout, self.training,
            )  # fmt: skip
        weight, bias, lora_A, lora_B = self._lora_tensors()
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, self.lora_dropout, self.training)

    def _lora_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``weight, bias, lora_A, lora_B`` as attribute access finds them, read from ``_parameters`` where
        that is the same (attribute access goes through ``nn.Module.__getattr__``, about 0.6 µs each).

        Only on this class itself (``torch.nn.utils.parametrize`` swaps in a subclass with properties) and
        when all four are registered parameters (``torch.func.functional_call`` swaps entries of
        ``_parameters``; hook-based ``weight_norm`` and FSDP move them to plain attributes).
        """
        if type(self) is FusedLoRALinear:
            params = self._parameters
            try:
                return params["weight"], params["bias"], params["lora_A"], params["lora_B"]
            except KeyError:
                pass
        return self.weight, self.bias, self.lora_A, self.lora_B

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        quant4bit.check_still_4bit(self.weight)  # (FSDP2 re-wraps the weight without its quant state)
        if self.use_dora:
            return qdora_linear(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling,
                self.lora_dropout, self.training, compute_dtype=self.compute_dtype,
            )  # fmt: skip
        return qlora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training,
            compute_dtype=self.compute_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        if self.is_4bit:
            state = self.weight.quant_state
            quant = f"4-bit {state.quant_type}{' double-quantized' if state.nested else ''}, "
        else:
            quant = ""
        return quant + (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, {'use_dora=True, ' if self.use_dora else ''}merged={self.merged}"
        )


#: A merged layer's state dict keys besides the parameters: the flag (a bool tensor) and, with DoRA, the
#: norm it was merged with. Earlier versions wrote both as ``_extra_state``, a dict, which loads still.
_MERGED_KEY = "lora_merged"
_MERGED_NORM_KEY = "lora_merged_norm"
_EXTRA_STATE = "_extra_state"


def lost_behaviour(module: nn.Module) -> str | None:
    """Why swapping ``module`` (an ``nn.Linear``) for a :class:`FusedLoRALinear` would lose what it computes,
    or ``None``: a subclass whose own ``forward`` (an output scale, a cast, a float8 GEMM) the fused layer
    would not run, or an instance whose ``forward`` was replaced (accelerate's hooks). A subclass that keeps
    ``nn.Linear``'s forward (``NonDynamicallyQuantizableLinear``) and bitsandbytes' ``Linear4bit`` (a QLoRA
    base, computed as it computes) lose nothing. Module hooks are not a loss: :func:`lora_kernels.inject.attach_lora` moves them."""
    if "forward" in module.__dict__ or getattr(module, "_hf_hook", None) is not None:
        return "its forward was replaced on the instance (an accelerate hook?), which the fused layer would not run"
    cls = type(module)
    if cls is nn.Linear or isinstance(module, FusedLoRALinear) or quant4bit.is_linear4bit(module):
        return None
    for method in ("forward", "__call__", "_call_impl"):
        if getattr(cls, method) is not getattr(nn.Linear, method):
            return (
                f"{cls.__module__}.{cls.__qualname__} overrides nn.Linear.{method}, which the fused layer would "
                "not run; wrap the fused layer in that behaviour yourself, or use PEFT (lora_kernels.peft.fuse "
                "keeps PEFT's forward for such bases)"
            )
    return None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_lora_args(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    """Clear errors for the adapter arguments (``bool`` is not accepted as a number)."""
    _check_int("r", r, 1)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r} ({type(lora_alpha).__name__})")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(
            f"lora_dropout must be a number in [0, 1), got {lora_dropout!r} ({type(lora_dropout).__name__})"
        )
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def _reset_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """``nn.Linear``'s own initialisation."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            fan_in = weight.shape[1]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound)
