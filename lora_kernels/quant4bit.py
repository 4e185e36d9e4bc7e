"""A 4-bit bitsandbytes base weight (QLoRA), described for the kernels; bitsandbytes stays optional.

:class:`Weight4bit` holds what the kernels read from a ``bitsandbytes.nn.Params4bit`` (the weight of a
``bitsandbytes.nn.Linear4bit``): the packed codes, the absmax per ``blocksize`` elements, the 16-entry code
book (NF4 or FP4) and, with double quantization (``compress_statistics``), the 8-bit absmax with its own
absmax, code book and offset. :func:`describe` builds it from a layer's weight and checks everything the
kernels rely on, with errors a user can act on.

The layout, as bitsandbytes' ``quantize_4bit``/``dequantize_4bit`` define it: ``W`` (N, K) is read
row-major as one flat sequence; element ``i`` sits in byte ``i // 2`` of the packed weight (viewed as uint8,
whatever ``quant_storage``), in its high nibble for even ``i``, low for odd; its value is
``code[nibble] · absmax[i // blocksize]`` computed in float32 and rounded to the original weight's dtype
(``quant_state.dtype``). Double-quantized, ``absmax[b] = code2[qabsmax[b]] · absmax2[b // blocksize2] +
offset`` in float32 (bitsandbytes' ``dequantize_blockwise`` followed by ``+= offset``).

:func:`dequantize` is the torch path: bitsandbytes' own ``dequantize_4bit``, except where bitsandbytes 0.50's
AVX-512 CPU kernel is wrong (rows of ``K`` not a multiple of ``blocksize``: it assumes blocks do not
straddle rows, measured), where the same formula runs in torch ops (:func:`dequantize_torch`, which equals
bitsandbytes' reference implementation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

EXTRA_HINT = "install the extra: pip install 'lora_kernels[qlora]' (bitsandbytes >= 0.50)"
QUANT_TYPES = ("nf4", "fp4")


def bnb_module():
    """``bitsandbytes``, or ``None`` when it is not installed (or fails to import)."""
    try:
        import bitsandbytes
    except Exception:  # ImportError, or a broken native library
        return None
    return bitsandbytes


#: The logger of bitsandbytes' CPU backend, which on import (with an AVX-512-bf16 CPU) tries to fetch a
#: kernel from the network through the ``kernels`` package and warns "Failed to load CPU gemm_4bit_forward
#: from kernels-community: ... could not verify publisher trust status" when it cannot; bitsandbytes then
#: uses its own CPU code, and nothing of lora_kernels depends on that kernel.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_bitsandbytes_cpu_notice() -> None:
    """Hide that warning of bitsandbytes' CPU backend (errors still show): for scripts, called before
    ``peft`` or ``bitsandbytes`` is imported (the demo, ``python -m lora_kernels``, the benchmarks). The
    library never changes logging on import."""
    logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)


def _class_names(obj) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(obj).__mro__}


def is_4bit_weight(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Params4bit`` (checked by class name: no import needed)."""
    return any(
        name.startswith("bitsandbytes.") and name.endswith(".Params4bit") for name in _class_names(weight)
    )


def check_still_4bit(weight) -> None:
    """A ``NotImplementedError`` naming the upstream limit where the weight of a 4-bit layer is no longer a
    ``Params4bit``: FSDP2's ``fully_shard`` (or anything that re-wraps parameters) makes it a DTensor or a
    plain ``Parameter``, and bitsandbytes' quant state (absmax, code, shape), an attribute of the
    ``Params4bit`` object, is neither sharded nor gathered with it, so no kernel can dequantize the result."""
    if not is_4bit_weight(weight):
        raise NotImplementedError(
            f"the 4-bit base weight is now a {type(weight).__name__}, not a bitsandbytes Params4bit: FSDP2 "
            "(fully_shard) shards the packed bytes but not bitsandbytes' quant state (QuantState, an attribute "
            "of the Params4bit object), an upstream limit of bitsandbytes under FSDP2, so the weight cannot "
            "be dequantized. Keep the 4-bit layers out of fully_shard (shard the other modules), or "
            "train QLoRA with DDP"
        )


def is_8bit_weight(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Int8Params`` (the weight of ``Linear8bitLt``)."""
    return any(
        name.startswith("bitsandbytes.") and name.endswith(".Int8Params") for name in _class_names(weight)
    )


def is_linear4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (or ``LinearNF4``/``LinearFP4``)."""
    return any(n.startswith("bitsandbytes.") and n.endswith(".Linear4bit") for n in _class_names(module))


def quantized_base_error(module) -> str | None:
    """Why ``module`` (an ``nn.Linear`` subclass) cannot be a fused base, or ``None`` if it can: an 8-bit
    base, or a weight that is not floating point and not 4-bit."""
    weight = getattr(module, "weight", None)
    if weight is None or is_4bit_weight(weight):
        return None
    if is_8bit_weight(weight) or "Linear8bitLt" in type(module).__name__:
        return (
            f"{type(module).__name__} is an 8-bit bitsandbytes base: only 4-bit bases (Linear4bit, NF4/FP4) "
            "run fused; keep PEFT's layer for it"
        )
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return f"{type(module).__name__} has a {weight.dtype} weight, neither floating point nor bitsandbytes 4-bit"
    return None


#: The attributes of a ``Params4bit`` beyond its data (its constructor's keyword arguments).
_PARAMS4BIT_FIELDS = (
    "quant_state", "blocksize", "compress_statistics", "quant_type", "quant_storage", "module", "bnb_quantized",
)  # fmt: skip


def restore_4bit_weight(module) -> None:
    """Give ``module.weight`` its ``Params4bit`` class back where pickling lost it (no copy of the data).

    ``torch.save(module)`` and pickle rebuild a parameter through ``nn.Parameter.__reduce_ex__``, which keeps
    its attributes (``quant_state``, ``blocksize``, ...) but not its subclass: a ``Params4bit`` comes back as a
    plain ``Parameter``. bitsandbytes' ``Linear4bit`` reads the attributes and still runs; the fused kernels
    check the class (:func:`describe`), so :class:`~lora_kernels.FusedLoRALinear` calls this as it unpickles
    and :mod:`lora_kernels.peft` before it reads a ``Linear4bit`` base. Anything else is left as it is."""
    params = getattr(module, "_parameters", None)
    weight = params.get("weight") if params is not None else None
    if weight is None or is_4bit_weight(weight) or getattr(weight, "quant_state", None) is None:
        return
    bnb = bnb_module()
    if bnb is None:
        return
    state = weight.__dict__
    restored = bnb.nn.Params4bit(
        weight.data,
        requires_grad=weight.requires_grad,
        **{k: state[k] for k in _PARAMS4BIT_FIELDS if k in state},
    )
    restored.__dict__.update({k: v for k, v in state.items() if k not in restored.__dict__})
    params["weight"] = restored


@dataclass(frozen=True, eq=False)
class Weight4bit:
    """What the kernels read of one 4-bit weight (see the module docstring). Tensors are views, not copies."""

    packed: torch.Tensor  # uint8, 1-D, (N·K + 1) // 2 bytes
    absmax: torch.Tensor  # float32 (nblocks,), or uint8 when nested
    code: torch.Tensor  # float32 (16,)
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # the original weight's dtype: values are rounded to it, then to the compute dtype
    absmax2: torch.Tensor | None = None  # nested: float32
    code2: torch.Tensor | None = None  # nested: float32 (256,)
    offset: torch.Tensor | None = None  # nested: float32 scalar tensor
    blocksize2: int = 0
    param: object = None  # the Params4bit described (for bitsandbytes' own dequantize_4bit)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device


def _require_bnb():
    bnb = bnb_module()
    if bnb is None:
        raise ImportError(
            f"a 4-bit (bitsandbytes) base layer needs bitsandbytes, which is not installed: {EXTRA_HINT}"
        )
    return bnb


def describe(weight) -> Weight4bit:
    """The :class:`Weight4bit` of a quantized ``Params4bit``; a clear error for anything the kernels cannot
    read exactly (not quantized yet, unknown quant type, quant state on another device, bad sizes)."""
    _require_bnb()
    if not is_4bit_weight(weight):
        raise TypeError(f"expected a bitsandbytes Params4bit weight, got {type(weight).__name__}")
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise ValueError(
            "the 4-bit weight is not quantized yet: bitsandbytes quantizes a Linear4bit when it is moved to a "
            "device (layer.to('cuda') or .to('cpu'))"
        )
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "bitsandbytes has repacked this 4-bit weight for its own CPU inference kernel (Linear4bit.forward "
            "in eval mode without gradients, on an AVX-512-bf16 CPU): a different layout, its absmax rounded "
            "to bf16, which bitsandbytes' inverse does not fully restore. Quantize the layer again (and run it "
            "in train mode or with gradients before fusing)"
        )
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(
            f"unknown 4-bit quant type {state.quant_type!r}: the fused kernels read {QUANT_TYPES}"
        )
    shape = tuple(state.shape) if state.shape is not None else ()
    if len(shape) != 2:
        raise ValueError(f"the 4-bit weight's quant state has shape {shape}, not (out_features, in_features)")
    if state.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the 4-bit weight's dequantized dtype {state.dtype} is not fp16, bf16 or fp32")
    packed = weight.data.reshape(-1).view(torch.uint8)
    device = packed.device
    n = math.prod(shape)
    blocks = -(-n // state.blocksize)
    tensors = {"absmax": state.absmax, "code (quant_map)": state.code}
    if state.nested:
        tensors.update(
            {"nested absmax": state.state2.absmax, "nested code": state.state2.code, "offset": state.offset}
        )
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device != device:
            where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"the 4-bit weight is on {device} but its quant state's {name} is on {where}; move the layer "
                "with .to(device) so bitsandbytes moves both"
            )
    if packed.numel() != (n + 1) // 2 or state.absmax.numel() != blocks or state.code.numel() != 16:
        raise ValueError(
            f"the 4-bit weight's sizes do not match its quant state: {packed.numel()} bytes, "
            f"{state.absmax.numel()} absmax values, {state.code.numel()} codes for shape {shape}, "
            f"blocksize {state.blocksize}"
        )
    if state.nested:
        absmax, code = state.absmax, state.code.float()
        if absmax.dtype != torch.uint8 or state.state2.code.numel() != 256:
            raise ValueError("a double-quantized 4-bit weight needs a uint8 absmax with a 256-entry code")
        return Weight4bit(
            packed, absmax, code, shape, int(state.blocksize), state.quant_type, state.dtype,
            absmax2=state.state2.absmax.float(), code2=state.state2.code.float(),
            offset=state.offset.float().reshape(()), blocksize2=int(state.state2.blocksize), param=weight,
        )  # fmt: skip
    return Weight4bit(
        packed, state.absmax.float(), state.code.float(), shape, int(state.blocksize), state.quant_type,
        state.dtype, param=weight,
    )  # fmt: skip


def absmax_float(w: Weight4bit) -> torch.Tensor:
    """The float32 absmax per block (for a nested weight, as bitsandbytes computes it: blockwise then offset)."""
    if not w.nested:
        return w.absmax
    blocks = torch.arange(w.absmax.numel(), device=w.device) // w.blocksize2
    return (w.code2[w.absmax.long()] * w.absmax2[blocks]).add_(w.offset)


def dequantize_torch(w: Weight4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W`` (N, K) in ``w.dtype`` (then ``dtype``), by the formula of the module docstring in torch ops."""
    n = math.prod(w.shape)
    idx = torch.arange(n, device=w.device)
    byte = w.packed[idx >> 1].to(torch.int32)
    nibble = torch.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    values = (w.code[nibble] * absmax_float(w)[idx // w.blocksize]).to(w.dtype).reshape(w.shape)
    return values if dtype is None else values.to(dtype)


def dequantize(w: Weight4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W`` (N, K) as bitsandbytes' ``dequantize_4bit`` gives it (``w.dtype``), then in ``dtype``. See the
    module docstring for the CPU shapes done in torch ops."""
    weight = w.param
    if weight is None or (w.device.type == "cpu" and w.shape[1] % w.blocksize != 0):
        return dequantize_torch(w, dtype)
    import bitsandbytes.functional as bnb_functional

    values = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return values if dtype is None or values.dtype == dtype else values.to(dtype)


def load_quant_state(weight, state_dict, prefix: str) -> None:
    """Give ``weight`` (a ``Params4bit`` whose packed data was just loaded) the quant state saved under
    ``prefix`` (``<module>.weight.``: ``absmax``, ``quant_map``, ``quant_state.bitsandbytes__nf4``...), as
    ``Linear4bit`` saves it; a state dict without it keeps the current quant state."""
    items = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not items:
        return
    from bitsandbytes.functional import QuantState

    weight.quant_state = QuantState.from_dict(dict(items), device=weight.device)
    describe(weight)  # the loaded state must fit the packed data
