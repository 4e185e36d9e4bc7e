"""The benchmark harness: cases, providers, checks, memory, timing, ratios and tables, in one place.

Every benchmark entry point runs its measurements through :func:`measure` (one row: check against the
float64 reference, saved bytes, the median time from :func:`time_calls`, CUDA peak memory):

- ``python benchmarks/report.py``: the report (``results.json``, ``results.md``, ``speedup.png``, ``log.txt``);
- ``pytest benchmarks/ --benchmark-only``: pytest-benchmark, one benchmark per case × provider
  (``test_lora_linear.py`` hands the harness's per-call times to pytest-benchmark, it times nothing itself);
- ``benchmarks/gpu_run.sh``: a GPU visit, whose timing table (``gpu_tables.py``) records these rows too (its
  sweeps time single kernels with :func:`median_ms`).

So the same case gives the same kind of number, from the same loop, in all three.

Providers, all computing ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` from the same tensors:

``base``       ``F.linear(x, W, b)`` without LoRA: the floor no LoRA layer can beat.
``peft``       ``peft.tuners.lora.Linear`` around an ``nn.Linear`` (what users run today).
``composite``  the best unfused PyTorch: ``out = x·Wᵀ; out.addmm_(x·Aᵀ, Bᵀ, alpha=s)`` with a hand-written
               backward (as Unsloth does) and a boolean dropout mask saved for backward.
``auto``       ours as a user gets it: :func:`lora_kernels.lora_linear` with nothing forced (the backend
               of :mod:`lora_kernels.dispatch`, the path of :mod:`lora_kernels.ops.routing`).
``triton``, ``cuda``, ``torch``  ours on that backend (its path chosen by the routing).
``triton:fused``, ``triton:split``, …  ours on that backend and path, one provider per path of a backend
               that has more than one (LoRA cases only: DoRA is not routed). ``gpu_summary.py`` turns their
               times into the routing table (``lora_kernels/tuning/<device>.json``).
``ours``       (merged mode only) :class:`~lora_kernels.FusedLoRALinear` after ``merge()``.

QLoRA cases (``Case.quant = "nf4"``): the base weight is a bitsandbytes ``Linear4bit`` (NF4, double-quantized,
compute dtype the case's; ``W`` in the other providers is its dequantized value, so all compute the same
function). ``peft_qlora`` is PEFT's ``lora.bnb.Linear4bit`` (its ratios are ``ratio_to_peft``); ours are
:func:`lora_kernels.functional.qlora_linear` on ``triton_fused`` (the base GEMMs dequantize in registers),
``triton_dequant`` (dequantize once, then the fused LoRA path), ``torch`` (bitsandbytes' dequantization, then
the torch backend); ``base`` stays the dense ``F.linear``. Needs bitsandbytes (``lora_kernels[qlora]``):
:func:`qlora_import_error` says why not, and callers skip these cases with it.

DoRA cases (``Case.dora``) compute PEFT's DoRA (:func:`lora_kernels.dora_linear`) instead, with the same
names: ``composite`` is then :func:`~lora_kernels.ops.torch_lora.dora_linear_composite` (plain torch ops
under autograd), ``triton``/``cuda``/``torch`` run :func:`lora_kernels.dora_linear`, and PEFT's DoRA layer
is ``peft_dora`` (its ratios are ``ratio_to_peft``). ``ratio_to_lora`` is a DoRA row's time over the same
provider's time on the same case without DoRA, when the run has it.

Modes: ``fwd`` (forward under ``no_grad``, dropout active as in training), ``fwd_bwd`` (forward and
backward, ``W``/``b`` frozen, gradients for ``x``, ``A``, ``B``), ``merged`` (inference after merging the
adapter into ``W``; PEFT after its ``merge()``).

Needs the ``bench`` extra (``pip install -e '.[bench]'``) for PEFT and the plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels
from lora_kernels import (
    FusedLoRALinear,
    available_backends,
    dora_linear,
    dora_linear_reference,
    lora_linear,
    lora_linear_reference,
    use_backend,
)
from lora_kernels.ops import LoRAParams
from lora_kernels.ops.routing import offered_paths, use_path
from lora_kernels.ops.torch_lora import dora_linear_composite
from lora_kernels.reference import dora_weight_norm_reference
from lora_kernels.testing import SavedTensorCounter, assert_close, relative_error

MODES = ("fwd", "fwd_bwd", "merged")
BASELINES = ("base", "peft", "composite")
MERGED_OURS = "ours"
PEFT_DORA = "peft_dora"
PEFT_QLORA = "peft_qlora"
#: Ours on a 4-bit base, by path (lora_kernels.ops.qlora), on the Triton backend.
QLORA_TRITON = {"triton_fused": "fused", "triton_dequant": "dequant"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


# --------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem: ``x`` is ``(M, in_features)``, the layer ``in_features → out_features``."""

    M: int
    in_features: int
    out_features: int
    r: int
    dropout: float
    dtype: str  # "fp32", "fp16", "bf16"
    mode: str  # one of MODES
    bias: bool = False
    adapter_dtype: str | None = None  # e.g. "fp32" adapters on a "bf16" base (PEFT's default); None: dtype
    dora: bool = False  # PEFT's use_dora
    quant: str | None = None  # "nf4": a 4-bit bitsandbytes base (QLoRA)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES_BY_NAME[self.dtype]

    @property
    def shape(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    @property
    def label(self) -> str:
        """A compact, unique, pytest-id-safe name."""
        adapters = f"-A{self.adapter_dtype}" if self.adapter_dtype else ""
        dora = "-dora" if self.dora else ""
        quant = f"-{self.quant}" if self.quant else ""
        return f"{self.mode}{dora}{quant}-{self.dtype}{adapters}-{self.shape}-M{self.M}-r{self.r}-p{self.dropout:g}"


def _grid(
    shapes: Iterable[tuple[int, int]],
    tokens: Iterable[int],
    ranks: Iterable[int],
    dropouts: Iterable[float],
    dtypes: Iterable[str],
    modes: Iterable[str] = MODES,
    dora: bool = False,
) -> list[Case]:
    """Every combination; ``merged`` only without dropout (merged inference has no dropout)."""
    cases = []
    for mode in modes:
        for dtype in dtypes:
            for in_f, out_f in shapes:
                for r in ranks:
                    for p in dropouts:
                        if mode == "merged" and p > 0:
                            continue
                        cases.extend(Case(M, in_f, out_f, r, p, dtype, mode, dora=dora) for M in tokens)
    return cases


def gpu_cases() -> list[Case]:
    """LLaMA-style projections (q/o, up/gate, down, a 70B-class square), decode to long-prefill tokens."""
    return (
        _grid(
            shapes=[(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)],
            tokens=[16, 512, 4096, 16384],
            ranks=[8, 16, 64],
            dropouts=[0.0, 0.1],
            dtypes=["bf16", "fp16"],
        )
        + _grid([(4096, 4096)], [16, 512, 8192], [16], [0.0, 0.1], ["bf16"], dora=True)
        + qlora_cases("cuda")
    )


def qlora_cases(device_type: str) -> list[Case]:
    """QLoRA (issue 23): NF4 bases, fp32 adapters as PEFT keeps them; on a GPU the shapes and M of the issue
    (fwd+bwd, and the decode forward at M = 16), on a CPU one small fp32 shape."""
    if device_type != "cuda":
        return [
            Case(M, 512, 1024, 16, p, "fp32", "fwd_bwd", quant="nf4") for M in (16, 256) for p in (0.0, 0.1)
        ]
    cases = [
        Case(M, k, n, 16, p, "bf16", "fwd_bwd", adapter_dtype="fp32", quant="nf4")
        for k, n in ((4096, 4096), (4096, 11008))
        for M in (16, 512, 4096)
        for p in (0.0, 0.1)
    ]
    decode = [
        Case(16, k, n, 16, 0.0, "bf16", "fwd", adapter_dtype="fp32", quant="nf4")
        for k, n in ((4096, 4096), (4096, 11008))
    ]
    return cases + decode


def cpu_cases() -> list[Case]:
    """A handful of fp32 shapes small enough for a 2-core CPU: M sweep at r=16, r sweep at M=256.

    M stays at or below 1024: the torch backend draws its dropout mask with Philox in int64 torch ops
    where the extension is not built, about 0.2 s per million elements on a 2-core CPU (1.5 s before
    issue 12 item 4), twice per training step.
    """
    return (
        _grid([(1024, 1024)], [16, 256, 1024], [16], [0.0, 0.1], ["fp32"])
        + _grid([(512, 1024)], [256], [8, 64], [0.0, 0.1], ["fp32"])
        + _grid([(1024, 1024)], [256, 1024], [16], [0.0, 0.1], ["fp32"], ("fwd", "fwd_bwd"), dora=True)
        + qlora_cases("cpu")
    )


def quick_cases(device: torch.device) -> list[Case]:
    """A tiny set for ``bench --quick``: seconds on a CPU, a minute on a GPU."""
    if device.type == "cuda":
        return _grid([(4096, 4096)], [16, 512, 4096], [16], [0.0, 0.1], ["bf16"])
    return _grid([(256, 512)], [16, 64, 256], [8], [0.0, 0.1], ["fp32"])


def default_cases(device: torch.device) -> list[Case]:
    return gpu_cases() if device.type == "cuda" else cpu_cases()


# --------------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------------


class CompositeLoRAFunction(torch.autograd.Function):
    """The best unfused LoRA in plain PyTorch: two GEMMs into one output buffer, a hand-written backward.

    Saves ``x`` (as ``nn.Linear`` does), the ``(M, r)`` product ``t = dropout(x)·Aᵀ`` and, with dropout, the
    boolean keep-mask (one byte per element of ``x``); the dropped ``x`` is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
        x2d = x.reshape(-1, x.shape[-1])
        ctx.adapter_dtype = lora_A.dtype
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # fp32 adapters on a half base: cast them
        keep = None
        x_lora = x2d
        if dropout_p > 0.0:
            keep = torch.empty_like(x2d, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            x_lora = x2d * keep * (1.0 / (1.0 - dropout_p))
        t = torch.mm(x_lora, lora_A.t())
        out = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
        out.addmm_(t, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, keep)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, t, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = None
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        if need_B:
            grad_B = torch.mm(g.t(), t).mul_(s)
        if need_x or need_A:
            grad_t = torch.mm(g, lora_B).mul_(s)
            if need_A:
                x_lora = x2d if keep is None else x2d * keep * (1.0 / (1.0 - p))
                grad_A = torch.mm(grad_t.t(), x_lora)
            if need_x:
                grad_x = torch.mm(g, weight)
                if keep is None:
                    grad_x.addmm_(grad_t, lora_A)
                else:
                    grad_x.add_(torch.mm(grad_t, lora_A).mul_(keep).mul_(1.0 / (1.0 - p)))
                grad_x = grad_x.reshape(x.shape)
        grad_A = None if grad_A is None else grad_A.to(ctx.adapter_dtype)
        grad_B = None if grad_B is None else grad_B.to(ctx.adapter_dtype)
        return grad_x, None, None, grad_A, grad_B, None, None


@dataclasses.dataclass
class Inputs:
    """The tensors of one case; every provider starts from these (copies where a module needs its own)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA cases
    linear4bit: nn.Module | None = None  # QLoRA cases: the bitsandbytes Linear4bit whose value ``weight`` is

    def known(self) -> list[torch.Tensor]:
        """Tensors whose storage is the caller's, not the layer's: saving them costs no memory."""
        tensors = (self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude)
        return [t for t in tensors if t is not None]


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> Inputs:
    """Random inputs with outputs of order one; non-zero ``B`` so both adapter GEMMs do real work."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    adapter_dtype = _DTYPES_BY_NAME[case.adapter_dtype] if case.adapter_dtype else dtype

    def rand(*shape: int, std: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

    K, N = case.in_features, case.out_features
    inputs = Inputs(
        x=rand(case.M, K),
        weight=rand(N, K, std=K**-0.5),
        bias=rand(N) if case.bias else None,
        lora_A=rand(case.r, K, std=K**-0.5, dt=adapter_dtype),
        lora_B=rand(N, case.r, std=case.r**-0.5, dt=adapter_dtype),
        grad_y=rand(case.M, N),
        scaling=2.0,  # lora_alpha = 2r
    )
    if case.quant:  # W becomes the value of its 4-bit form, so that every provider computes the same function
        from lora_kernels import quant4bit
        from lora_kernels.testing import to_4bit

        inputs.linear4bit = to_4bit(_linear(inputs), compress_statistics=True, compute_dtype=dtype)
        inputs.weight = quant4bit.dequantize(quant4bit.describe(inputs.linear4bit.weight), dtype)
    if case.dora:  # the initial magnitude (the norm), off by up to 10 % per row as after some training
        norm = dora_weight_norm_reference(inputs.weight, inputs.lora_A, inputs.lora_B, inputs.scaling)
        jitter = 1 + 0.1 * torch.rand(N, generator=gen, device=device, dtype=torch.float32)
        inputs.magnitude = (norm.float() * jitter).to(adapter_dtype)
    return inputs


def providers(
    mode: str, device: torch.device | str, dora: bool = False, quant: str | None = None
) -> list[str]:
    """Provider names for ``mode`` on ``device``; ``base`` first and ``peft`` (``peft_dora`` for DoRA
    cases, ``peft_qlora`` for QLoRA cases) second (the references).

    On the CPU only the ``torch`` backend is ours: Triton there needs the interpreter, which is no speed
    measurement (``TRITON_INTERPRET=1`` is never set by the benchmarks).
    """
    device = torch.device(device)
    if quant:
        triton = "triton" in available_backends(device) and device.type == "cuda"
        return ["base", PEFT_QLORA, *(QLORA_TRITON if triton else ()), "torch"]
    peft = PEFT_DORA if dora else "peft"
    if mode == "merged":
        return ["base", peft, MERGED_OURS]
    ours = available_backends(device) if device.type == "cuda" else ["torch"]
    return ["base", peft, "composite", "auto", *ours, *([] if dora else path_providers(ours, device))]


def path_providers(backends: Iterable[str], device: torch.device | str) -> list[str]:
    """``backend:path`` for every path of each of ``backends`` that offers more than one on ``device``."""
    names = []
    for backend in backends:
        paths = offered_paths(backend, device)
        if len(paths) > 1:
            names += [f"{backend}:{path}" for path in paths]
    return names


def split_provider(provider: str) -> tuple[str, str]:
    """``(backend, path)`` a provider of ours forces: ``auto`` and ``triton`` leave the path to the routing."""
    backend, _, path = provider.partition(":")
    return backend, path or "auto"


@functools.cache
def peft_import_error() -> str | None:
    """``None`` if ``peft`` imports, else why not (the ``peft`` provider is then skipped with a note)."""
    try:
        import peft.tuners.lora  # noqa: F401
    except ImportError as err:
        return f"peft is not installed ({err}); pip install peft"
    return None


@functools.cache
def qlora_import_error() -> str | None:
    """``None`` if bitsandbytes imports, else why not (QLoRA cases are then skipped with this note)."""
    from lora_kernels import quant4bit

    if quant4bit.bnb_module() is None:
        return f"bitsandbytes is not installed: {quant4bit.EXTRA_HINT}"
    return None


def skip_reason(case: Case, provider: str) -> str | None:
    """Why ``provider`` cannot run ``case`` here (a missing optional package), or ``None``."""
    if case.quant and qlora_import_error():
        return qlora_import_error()
    if provider in ("peft", PEFT_DORA, PEFT_QLORA):
        return peft_import_error()
    return None


def _linear(inputs: Inputs) -> nn.Linear:
    """A fresh ``nn.Linear`` holding copies of the frozen base weight and bias."""
    N, K = inputs.weight.shape
    linear = nn.Linear(
        K, N, bias=inputs.bias is not None, device=inputs.weight.device, dtype=inputs.weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(inputs.weight)
        if inputs.bias is not None:
            linear.bias.copy_(inputs.bias)
    linear.requires_grad_(False)
    return linear


def make_peft_layer(case: Case, inputs: Inputs) -> nn.Module:
    """A real PEFT LoRA ``Linear`` with the adapters of ``inputs`` (copied) in the base dtype."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    alpha = inputs.scaling * case.r
    options = dict(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout, use_dora=case.dora)
    config = LoraConfig(target_modules=["base"], **options)
    layer = PeftLoraLinear(_linear(inputs), "default", config=config, **options)
    layer.to(inputs.weight.dtype)
    layer.lora_A.to(inputs.lora_A.dtype)  # fp32 adapters on a half base stay fp32, as PEFT's default
    layer.lora_B.to(inputs.lora_B.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inputs.lora_A)
        layer.lora_B["default"].weight.copy_(inputs.lora_B)
        if case.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(inputs.magnitude)
    layer.base_layer.requires_grad_(False)
    if not math.isclose(layer.scaling["default"], inputs.scaling):
        raise AssertionError(f"PEFT scaling {layer.scaling['default']} != {inputs.scaling}")
    return layer


def make_peft_qlora_layer(case: Case, inputs: Inputs) -> nn.Module:
    """PEFT's ``lora.bnb.Linear4bit`` around a copy of the case's 4-bit base, with its adapters (copied)."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    options = dict(r=case.r, lora_alpha=inputs.scaling * case.r, lora_dropout=case.dropout)
    config = LoraConfig(target_modules=["base"], **options)
    layer = PeftLinear4bit(copy.deepcopy(inputs.linear4bit), "default", config=config, **options)
    layer.lora_A.to(device=inputs.x.device, dtype=inputs.lora_A.dtype)
    layer.lora_B.to(device=inputs.x.device, dtype=inputs.lora_B.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inputs.lora_A)
        layer.lora_B["default"].weight.copy_(inputs.lora_B)
    layer.base_layer.requires_grad_(False)
    return layer


def _qlora_forward_fn(provider: str, case: Case, inputs: Inputs) -> tuple[Callable, list]:
    from lora_kernels.functional import qlora_linear
    from lora_kernels.ops.qlora import use_qlora_path

    if provider == PEFT_QLORA:
        layer = make_peft_qlora_layer(case, inputs)
        layer.train()
        return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    base, A, B, s, p = inputs.linear4bit, inputs.lora_A, inputs.lora_B, inputs.scaling, case.dropout
    backend, path = ("triton", QLORA_TRITON[provider]) if provider in QLORA_TRITON else (provider, "auto")

    def ours(x: torch.Tensor) -> torch.Tensor:
        with use_backend(backend), use_qlora_path(path):
            return qlora_linear(x, base.weight, base.bias, A, B, s, p, True, compute_dtype=base.compute_dtype)

    return ours, [A, B]


def _forward_fn(
    provider: str, case: Case, inputs: Inputs
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list]:
    """``(forward(x) -> y, trainable adapter tensors)`` for ``provider``; modules are built here, once."""
    training = case.mode != "merged"
    p = case.dropout if training else 0.0
    if provider == "base":
        weight, bias = inputs.weight, inputs.bias
        return (lambda x: F.linear(x, weight, bias)), []
    if case.quant:
        return _qlora_forward_fn(provider, case, inputs)
    if provider in ("peft", PEFT_DORA):
        layer = make_peft_layer(case, inputs)
        if case.mode == "merged":
            layer.merge()
        layer.train(training)
        adapters = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if case.dora:
            adapters.append(layer.lora_magnitude_vector["default"].weight)
        return layer, adapters
    w, b, A, B, m, s = (
        inputs.weight,
        inputs.bias,
        inputs.lora_A,
        inputs.lora_B,
        inputs.magnitude,
        inputs.scaling,
    )
    trained = [A, B, m] if case.dora else [A, B]
    if provider == "composite" and case.dora:
        return (lambda x: dora_linear_composite(x, w, b, A, B, m, LoRAParams(s, p, seed=0))), trained
    if provider == "composite":
        return (lambda x: CompositeLoRAFunction.apply(x, w, b, A, B, s, p)), trained
    if provider == MERGED_OURS:
        layer = FusedLoRALinear.from_linear(
            _linear(inputs), r=case.r, lora_alpha=s * case.r, init_lora_weights=False, use_dora=case.dora,
            adapter_dtype=A.dtype,
        )  # fmt: skip
        with torch.no_grad():
            for name, tensor in zip(("lora_A", "lora_B", "lora_magnitude"), trained, strict=False):
                getattr(layer, name).copy_(tensor)
        layer.merge()
        layer.eval()
        return layer, []

    # ours on one backend (and path); both are fixed at forward time and recorded for backward.
    backend, path = split_provider(provider)

    def ours(x: torch.Tensor) -> torch.Tensor:
        with use_backend(backend), use_path(path):
            if case.dora:
                return dora_linear(x, w, b, A, B, m, s, p, training=training)
            return lora_linear(x, w, b, A, B, s, p, training=training)

    return ours, trained


def make_step(provider: str, case: Case, inputs: Inputs) -> Callable[[], None]:
    """One untimed-setup, timed-call step of ``provider`` in ``case.mode`` (no synchronisation here)."""
    forward, adapters = _forward_fn(provider, case, inputs)
    if case.mode in ("fwd", "merged"):

        def step() -> None:
            with torch.no_grad():
                forward(inputs.x)

        return step
    x = inputs.x.detach().requires_grad_()
    for tensor in adapters:
        tensor.requires_grad_()
    wrt = [x, *adapters]
    grad_y = inputs.grad_y

    def step() -> None:
        y = forward(x)
        torch.autograd.grad(y, wrt, grad_y)

    return step


def check_provider(provider: str, case: Case, inputs: Inputs) -> float:
    """``provider``'s output against the float64 reference: raises ``AssertionError`` beyond the tolerance of
    the case's dtype (:func:`lora_kernels.testing.assert_close`), else returns the relative error.

    Keeps the benchmarks honest: every provider must compute the same function before it is timed (cases
    without dropout: the providers draw different masks).
    """
    forward, _ = _forward_fn(provider, case, inputs)
    with torch.no_grad():
        y = forward(inputs.x)
        if provider == "base":
            ref = F.linear(inputs.x.double(), inputs.weight.double(), _double(inputs.bias))
        elif case.dora:
            i = inputs
            ref = dora_linear_reference(i.x, i.weight, i.bias, i.lora_A, i.lora_B, i.magnitude, i.scaling)
        else:
            ref = lora_linear_reference(
                inputs.x,
                inputs.weight,
                inputs.bias,
                inputs.lora_A,
                inputs.lora_B,
                inputs.scaling,
                upcast=True,
            )
    assert_close(y, ref, case.torch_dtype, f"{provider} on {case.label}")
    return relative_error(y, ref)


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


# --------------------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------------------


def saved_bytes(provider: str, case: Case, inputs: Inputs) -> SavedTensorCounter:
    """Run ``provider``'s forward with gradients once and return what it saved for backward."""
    training_case = dataclasses.replace(case, mode="fwd_bwd")
    forward, adapters = _forward_fn(provider, training_case, inputs)
    x = inputs.x.detach().requires_grad_()
    for tensor in adapters:
        tensor.requires_grad_()
    known = [x, *inputs.known(), *adapters]
    if provider in ("peft", PEFT_DORA, PEFT_QLORA):
        known += [p for p in forward.parameters()]  # type: ignore[union-attr]
    with SavedTensorCounter(known) as counter:
        forward(x)
    return counter


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory of one ``step`` above what was allocated before it; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _l2_flush_buffer(device_index: int) -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=torch.device("cuda", device_index))


def flush_l2(device: torch.device) -> None:
    """Overwrite a 256 MiB buffer so the next call finds no weights in the GPU's L2 cache."""
    if device.type == "cuda":
        _l2_flush_buffer(device.index or 0).zero_()
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[], None], device: torch.device, quick: bool = False) -> list[float]:
    """Per-call times of ``step`` in milliseconds, after warm-up: the one timing loop of every benchmark.

    CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed before each call, CUDA events around each call;
    as many calls as fit 100 ms, 40 with ``quick``), or a CUDA-event loop with the same flush when triton is
    missing; the events time the work on the device, not the host's launch or synchronisation. CPU:
    ``time.perf_counter`` around each call after one warm-up call; as many calls as fit 0.5 s (0.1 s with
    ``quick``), at least 5 (3), at most 200.
    """
    if device.type == "cuda":
        warmup, rep = (10, 40) if quick else (25, 100)
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_times(step, device, 5 if quick else 10, 20 if quick else 50)
        times = do_bench(step, warmup=warmup, rep=rep, return_mode="all")
        return [float(t) for t in times] if isinstance(times, (list, tuple)) else [float(times)]
    budget, min_calls = (0.1, 3) if quick else (0.5, 5)
    step()  # warm-up: allocator, first-call dispatch
    times = []
    start_all = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start_all < budget and len(times) < 200):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(step: Callable[[], None], device: torch.device, quick: bool = False) -> float:
    """The median of :func:`time_calls`: the number every benchmark reports."""
    return statistics.median(time_calls(step, device, quick))


def _cuda_event_times(step: Callable[[], None], device: torch.device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return times


# --------------------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------------------


def measure(
    provider: str,
    case: Case,
    device: torch.device,
    quick: bool = False,
    *,
    timed: bool = True,
    samples: list[float] | None = None,
) -> dict:
    """One row: check, time, and measure ``provider`` on ``case`` (what every entry point records).

    ``max_rel_error`` (cases without dropout; beyond the dtype's tolerance this raises), ``saved_bytes``
    (``fwd_bwd``), ``median_ms`` (:func:`median_ms`; ``None`` with ``timed=False``, which runs the step
    once instead) and ``peak_bytes`` (CUDA). The per-call times behind ``median_ms`` are appended to
    ``samples`` when given.
    """
    inputs = make_inputs(case, device)
    row = {"provider": provider, **case_fields(case)}
    if case.dropout == 0.0:
        row["max_rel_error"] = check_provider(provider, case, inputs)
    step = make_step(provider, case, inputs)
    row["saved_bytes"] = (
        saved_bytes(provider, case, inputs).activation_bytes if case.mode == "fwd_bwd" else None
    )
    if timed:
        times = time_calls(step, device, quick=quick)
        row["median_ms"] = statistics.median(times)
        if samples is not None:
            samples.extend(times)
    else:
        step()
        row["median_ms"] = None
    row["peak_bytes"] = peak_memory_bytes(step, device)
    return row


# --------------------------------------------------------------------------------------------------------
# Environment and ratios
# --------------------------------------------------------------------------------------------------------


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cpu_load_note() -> str | None:
    """A warning when other processes compete for the CPU (timings, CPU ones above all, are then noisy)."""
    with contextlib.suppress(OSError, AttributeError):
        load = os.getloadavg()[0]
        cores = os.cpu_count() or 1
        if load > cores:
            return (
                f"the machine was busy: 1-minute load average {load:.1f} on {cores} cores; "
                "timings are contended and not trustworthy"
            )
    return None


def device_slug(device: torch.device | str) -> str:
    """Folder name for a device's results: ``cpu`` or the GPU name, lower-case and dashed."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@functools.cache
def versions() -> dict[str, str | None]:
    """Versions of everything that shapes a number, plus the git commit when run from a checkout."""

    def version_of(module: str) -> str | None:
        # the installed distribution's version, without importing it (peft imports bitsandbytes, seconds)
        try:
            return importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version_of("triton"),
        "numpy": version_of("numpy"),
        "transformers": version_of("transformers"),
        "peft": version_of("peft"),
        "bitsandbytes": version_of("bitsandbytes"),
        "lora_kernels": lora_kernels.__version__,
        "git": commit,
        "python": platform.python_version(),
    }


def case_fields(case: Case) -> dict:
    return {
        "dtype": case.dtype,
        "shape": case.shape,
        "in_features": case.in_features,
        "out_features": case.out_features,
        "M": case.M,
        "r": case.r,
        "dropout": case.dropout,
        "bias": case.bias,
        "mode": case.mode,
        "adapter_dtype": case.adapter_dtype or case.dtype,
        "dora": case.dora,
        "quant": case.quant,
    }


def case_key(row: dict) -> tuple:
    """Rows of one case (all providers) share this key; ratios are taken within it."""
    return tuple(
        row.get(k)
        for k in (
            "device",
            "dtype",
            "adapter_dtype",
            "in_features",
            "out_features",
            "M",
            "r",
            "dropout",
            "mode",
            "quant",
            "dora",  # last: ratio_to_lora replaces it
        )
    )


def add_ratios(rows: Sequence[dict]) -> None:
    """Add ``ratio_to_base``/``ratio_to_peft``/``ratio_to_composite`` (time / that provider's time on the same
    case in the same run: below 1 is faster; PEFT's DoRA is ``peft`` for DoRA cases), ``speedup_over_peft``
    (peft time / time) and, to DoRA rows, ``ratio_to_lora`` (time / the same provider's time on the case
    without DoRA) to each row."""
    refs: dict[tuple, dict[str, float]] = {}
    times: dict[tuple, float] = {}
    for row in rows:
        name = "peft" if row["provider"] in (PEFT_DORA, PEFT_QLORA) else row["provider"]
        if row.get("median_ms") and name in BASELINES:
            refs.setdefault(case_key(row), {})[name] = row["median_ms"]
        if row.get("median_ms"):
            times[(*case_key(row), row["provider"])] = row["median_ms"]
    for row in rows:
        ms = row.get("median_ms")
        ref = refs.get(case_key(row), {})
        for name in BASELINES:
            row[f"ratio_to_{name}"] = ms / ref[name] if ms and name in ref else None
        row["speedup_over_peft"] = ref["peft"] / ms if ms and "peft" in ref else None
        ours = row.get("dora") and row["provider"] not in ("base", PEFT_DORA)
        lora = times.get((*case_key(row)[:-1], False, row["provider"])) if ours else None
        row["ratio_to_lora"] = ms / lora if ms and lora else None


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.2f}"


TABLE_COLUMNS = [
    "mode",
    "dtype",
    "shape",
    "M",
    "r",
    "dropout",
    "provider",
    "median_ms",
    "ratio_to_base",
    "ratio_to_peft",
    "ratio_to_composite",
    "ratio_to_lora",
    "peak_MiB",
    "saved_MiB",
]


def _sortable(values: Iterable) -> list[tuple]:
    """Numbers before strings before None, so rows of mixed or missing fields still sort."""
    return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values]


def _dtype_label(row: dict) -> str:
    """``bf16``, or ``bf16/A fp32`` for adapters of another dtype than the base."""
    adapters = row.get("adapter_dtype")
    return row["dtype"] if adapters in (None, row["dtype"]) else f"{row['dtype']}/A {adapters}"


def table_rows(rows: Sequence[dict]) -> list[list[str]]:
    """Rows as strings, in TABLE_COLUMNS order, grouped by case."""
    out = []
    for row in sorted(
        rows,
        key=lambda r: (
            MODES.index(r["mode"]),
            bool(r.get("dora")),
            *_sortable(case_key(r)[1:8]),
            r.get("order", 0),
        ),
    ):
        out.append(
            [
                row["mode"] + ("+dora" if row.get("dora") else ""),
                _dtype_label(row),
                row["shape"],
                str(row["M"]),
                str(row["r"]),
                f"{row['dropout']:g}",
                row["provider"],
                _fmt(row.get("median_ms"), ".4f"),
                _fmt(row.get("ratio_to_base"), ".2f"),
                _fmt(row.get("ratio_to_peft"), ".2f"),
                _fmt(row.get("ratio_to_composite"), ".2f"),
                _fmt(row.get("ratio_to_lora"), ".2f"),
                _mib(row.get("peak_bytes")),
                _mib(row.get("saved_bytes")),
            ]
        )
    return out


def format_text_table(rows: Sequence[dict]) -> str:
    body = table_rows(rows)
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(TABLE_COLUMNS)] if body else []
    lines = ["  ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict], env: dict) -> str:
    lines = [
        f"# LoRA linear benchmark: {env['device']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        "`median_ms`: median time of one call (forward, or forward + backward in `fwd_bwd`). "
        "`ratio_to_base` / `ratio_to_peft` / `ratio_to_composite`: that time divided by the time of `base` "
        "(`F.linear`, no LoRA) / `peft` / `composite` (cuBLAS GEMM + `addmm_` of the LoRA term) on the same "
        "case in the same run; below 1 is faster (`mode` +dora: PEFT's DoRA, `peft` is PEFT's DoRA layer; "
        "`ratio_to_lora`: time over the same provider's on the case without DoRA). `peak_MiB`: peak CUDA memory of one "
        "call above the inputs (– on CPU). `saved_MiB`: new memory autograd keeps for backward (`fwd_bwd`).",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    if env.get("notes"):
        lines += ["", *(f"- {note}" for note in env["notes"])]
    return "\n".join(lines) + "\n"
