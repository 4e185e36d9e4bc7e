"""Helpers to check a LoRA layer: the tolerance of each dtype, the comparison, and saved-memory accounting.

The test suite, ``python -m lora_kernels check``, the benchmarks and the example scripts all judge results
with these, so "correct" means the same everywhere:

- :data:`TOLERANCE` and :func:`assert_close`: an output (or gradient) in ``dtype`` against its float64
  reference (:func:`lora_kernels.lora_linear_reference` with ``upcast=True``);
- :func:`relative_error`: the figure reports print, ``max|actual - expected| / max|expected|``;
- :class:`SavedTensorCounter`: the bytes autograd keeps for backward inside a ``with`` block;
- :func:`tiny_llama`: a small randomly initialised Llama (needs ``transformers``; nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

__all__ = [
    "LLAMA_PROJECTIONS",
    "TOLERANCE",
    "SavedTensor",
    "SavedTensorCounter",
    "assert_close",
    "relative_error",
    "tiny_llama",
    "to_4bit",
]

#: Relative tolerance of each dtype against the float64 reference. :func:`assert_close` scales it by the
#: magnitude of the reference; ``slack`` widens it for results with longer reductions (gradients).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``, computed in float64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).abs().max()
    return (diff / expected.abs().max().clamp_min(1e-12)).item()


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    name: str = "result",
    slack: float = 1.0,
) -> None:
    """Raise ``AssertionError`` unless ``actual`` (computed in ``dtype``) matches the float64 ``expected``.

    Elementwise, ``|actual - expected| <= tol·max(max|expected|, 1e-3) + tol·|expected|`` with
    ``tol = TOLERANCE[dtype] · slack``: an absolute part scaled by the result's magnitude (cancellation makes
    small entries as inexact as large ones) and a relative part. Shapes must match.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double()
    tol = TOLERANCE[dtype] * slack
    scale = max(expected.abs().max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(),
        expected,
        atol=tol * scale,
        rtol=tol,
        msg=lambda m: f"{name} ({dtype}, relative error {relative_error(actual, expected):.2e}): {m}",
    )


# --------------------------------------------------------------------------------------------------------
# What autograd keeps for backward
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SavedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes of its storage; 0 when the storage was already counted
    kind: str  # "input" (shares a storage with an input/parameter) or "activation" (new memory)


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the ``with`` block.

    A saved tensor whose storage is that of one of ``known`` (inputs and parameters, possibly a view or a
    reshape of them) costs nothing and is ``kind="input"``; every other storage is new activation memory,
    counted once however many nodes save it::

        with SavedTensorCounter([x, *model.parameters()]) as saved:
            loss = model(x).sum()
        print(saved.activation_bytes)
    """

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        self._known = {_storage_key(t) for t in known if t is not None}
        self._seen: set[tuple] = set()
        self.saved: list[SavedTensor] = []

    @property
    def activation_bytes(self) -> int:
        """Bytes of new memory held for backward (storages not shared with an input or parameter)."""
        return sum(s.nbytes for s in self.saved if s.kind == "activation")

    def activations(self) -> list[SavedTensor]:
        return [s for s in self.saved if s.kind == "activation"]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        kind = "input" if key in self._known else "activation"
        nbytes = 0
        if kind == "activation" and key not in self._seen:
            self._seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
        self.saved.append(SavedTensor(tuple(tensor.shape), tensor.dtype, nbytes, kind))
        return tensor

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())


# --------------------------------------------------------------------------------------------------------
# A small model
# --------------------------------------------------------------------------------------------------------

#: The projections of a Llama decoder layer, the usual LoRA ``target_modules``.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 128,
    **config,
) -> torch.nn.Module:
    """A randomly initialised ``transformers.LlamaForCausalLM`` (in eval mode) with these dimensions.

    Built from a config, so nothing is downloaded; seed with ``torch.manual_seed`` first for repeatable
    weights. Other ``LlamaConfig`` fields pass through ``config``. Needs ``transformers``.
    """
    import transformers

    llama_config = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        **config,
    )
    return transformers.LlamaForCausalLM(llama_config).eval()


def to_4bit(
    linear: torch.nn.Linear,
    *,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int | None = None,
) -> torch.nn.Module:
    """A quantized ``bitsandbytes.nn.Linear4bit`` with ``linear``'s weight and bias, on ``linear``'s device
    (bitsandbytes quantizes when the layer is moved there): a QLoRA base for tests and benchmarks, as
    ``BitsAndBytesConfig(load_in_4bit=True)`` would load it. Needs bitsandbytes (``lora_kernels[qlora]``)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage,
    )  # fmt: skip
    if blocksize is not None:
        layer.weight.blocksize = blocksize
    layer.weight.data = linear.weight.detach().clone()
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return layer.to(linear.weight.device)
