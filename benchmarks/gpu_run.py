"""The measurements of one GPU visit, one phase per sub-command; ``benchmarks/gpu_run.sh`` runs them.

    python benchmarks/gpu_run.py PHASE --work DIR      # PHASE: env, table, tma, qlora, overhead, sweep, sanitize, e2e, summary
    python benchmarks/gpu_run.py tuning --from RESULTS_JSON --out FILE [--stand-in provider=path,...]

The summary also writes the routing table the table phase measured, ``tuning-<device>.json`` (to commit as
``lora_kernels/tuning/<device>.json``), and compares ``auto`` with the fastest provider of every case.

Every phase appends its rows to ``DIR/<phase>.jsonl`` as it measures them (a phase killed by its timeout
keeps what it had), and an error goes into its row instead of stopping the phase. ``summary`` reads them all
and writes ``SUMMARY.md``, ``results.json`` and ``results.md`` (the fields of ``python benchmarks/report.py``'s
results, so one report tool reads both).

With ``LORA_GPU_RUN_DRY=1`` (``gpu_run.sh --dry``) every phase runs on the CPU in seconds: tiny shapes, the
Triton kernels through the interpreter, so that this script cannot rot before a GPU is at hand. Dry
numbers are no measurement of anything.

Timing: the harness's (``harness.py``, shared with ``report.py`` and ``pytest benchmarks/``): the table
phase records :func:`harness.measure` rows, the sweep and the kernels' baselines :func:`harness.median_ms`
(``triton.testing.do_bench``: CUDA events, warm-up, the L2 cache flushed before every call, median of
many calls), on random data.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import re
import statistics
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels import dora_linear, lora_linear, use_backend
from lora_kernels.dispatch import available_backends, select_backend
from lora_kernels.ops import routing
from lora_kernels.quant4bit import quiet_bitsandbytes_cpu_notice
from lora_kernels.testing import LLAMA_PROJECTIONS, assert_close, relative_error, tiny_llama

import harness

DRY = os.environ.get("LORA_GPU_RUN_DRY") == "1"
DEVICE = torch.device("cpu" if DRY else "cuda")
Case = harness.Case


def _emit(path: Path, row: dict) -> None:
    """Append one row to a JSON-lines file and print it: nothing measured is lost if the phase dies."""
    with path.open("a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut off by a kill
            rows.append(json.loads(line))
    return rows


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], object]) -> float:
    return harness.median_ms(lambda: fn(), DEVICE, quick=True)


# ----------------------------------------------------------------------------------------------- env


def phase_env(work: Path) -> None:
    info = {"versions": harness.versions(), "device": harness.device_name(DEVICE), "dry": DRY}
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(
            sms=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            backends=available_backends(DEVICE),
        )
    else:
        info["backends"] = available_backends(DEVICE)
    _emit(work / "env.jsonl", info)


# ----------------------------------------------------------------------------------------------- table


def table_cases() -> list[Case]:
    """The timing table of the GPU visit (bf16 unless said)."""
    if DRY:
        return [
            Case(64, 96, 80, 8, 0.0, "fp32", "fwd"),
            Case(64, 96, 80, 8, 0.1, "fp32", "fwd_bwd"),
            Case(8, 96, 80, 8, 0.0, "fp16", "fwd"),
            Case(64, 96, 80, 8, 0.0, "fp16", "fwd_bwd", adapter_dtype="fp32"),
            Case(64, 96, 80, 8, 0.0, "fp32", "fwd_bwd", dora=True),
            Case(64, 96, 80, 8, 0.1, "fp32", "fwd_bwd", dora=True),
        ]
    square = [Case(8192, 4096, 4096, 16, p, "bf16", mode) for mode in ("fwd", "fwd_bwd") for p in (0.0, 0.1)]
    # DoRA (issue 15's targets: fwd+bwd at most 1.25x our LoRA above, at least 2x faster than PEFT's DoRA)
    dora = [Case(8192, 4096, 4096, 16, p, "bf16", "fwd_bwd", dora=True) for p in (0.0, 0.1)]
    mlp = [
        Case(4096, k, n, r, 0.0, "bf16", "fwd_bwd")
        for k, n in ((4096, 11008), (11008, 4096))
        for r in (16, 64)
    ]
    return [
        *square,
        *dora,
        *mlp,
        Case(512, 4096, 4096, 16, 0.0, "bf16", "fwd_bwd"),
        Case(16, 4096, 4096, 16, 0.0, "bf16", "fwd"),
        Case(8192, 4096, 4096, 16, 0.0, "fp16", "fwd_bwd"),
        Case(8192, 4096, 4096, 16, 0.0, "bf16", "fwd_bwd", adapter_dtype="fp32"),
    ]


def table_providers(case: Case) -> list[str]:
    names = harness.providers(case.mode, DEVICE, case.dora, case.quant)
    if DRY and "triton" in available_backends(DEVICE) and case.dtype != "bf16":
        # the interpreter: runs the code (and, through the paths, the routing table's writer), measures nothing
        names += ["triton"] if case.dora else harness.path_providers(["triton"], DEVICE)
    if harness.peft_import_error():
        names.remove(harness.PEFT_DORA if case.dora else "peft")
    return names


def phase_table(work: Path) -> None:
    _measure_table(work / "table.jsonl", table_cases(), table_providers)


def _measure_table(out: Path, cases: list[Case], providers_of: Callable[[Case], list[str]]) -> None:
    """One :func:`harness.measure` row per case × provider, emitted as measured; a provider that cannot run
    here (a missing optional package) gets a row with its reason."""
    env = {"device": harness.device_name(DEVICE), "versions": harness.versions()}
    for case in cases:
        for order, provider in enumerate(providers_of(case)):
            row = {"provider": provider, **harness.case_fields(case), "order": order, **env}
            if reason := harness.skip_reason(case, provider):
                _emit(out, {**row, "skipped": reason})
                continue
            started = time.perf_counter()
            try:
                row.update(harness.measure(provider, case, DEVICE, quick=True))
            except Exception as err:  # recorded in its row; the table goes on
                row["error"] = _error(err)
                traceback.print_exc()
            row["wall_s"] = round(time.perf_counter() - started, 2)
            _emit(out, row)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- qlora


def qlora_cases() -> list[Case]:
    """Issue 23's QLoRA cases (NF4 bases): 4096² and 4096→11008, M = 16, 512, 4096, r = 16, dropout 0 and
    0.1, fwd+bwd, and the decode forward at M = 16."""
    if DRY:
        return [Case(16, 128, 96, 8, 0.0, "fp32", "fwd_bwd", quant="nf4")]
    return harness.qlora_cases("cuda")


def qlora_providers(case: Case) -> list[str]:
    names = harness.providers(case.mode, DEVICE, case.dora, case.quant)
    if DRY and "triton" in available_backends(DEVICE):
        names += list(harness.QLORA_TRITON)  # the interpreter: runs the code, measures nothing
    return names


def phase_qlora(work: Path) -> None:
    """The QLoRA table: ``base`` (dense F.linear), ``peft_qlora``, ours on both paths. Without bitsandbytes
    (not installed on the GPU machine yet) every row says so instead of a time."""
    _measure_table(work / "qlora.jsonl", qlora_cases(), qlora_providers)


# ----------------------------------------------------------------------------------------------- overhead


def phase_overhead(work: Path) -> None:
    """Host time of one eager call (forward + backward), on a problem too small to keep the GPU busy.

    The calls are queued without synchronising; on a tiny problem the GPU finishes each kernel before the
    host has issued the next, so wall time / calls is the host's cost per call: Python, dispatch, launches.
    """
    case = Case(16, 256, 256, 8, 0.0, "bf16" if DEVICE.type == "cuda" else "fp32", "fwd_bwd")
    calls, repeats = (5, 2) if DRY else (200, 3)
    ours = available_backends(DEVICE)
    providers = [*harness.BASELINES, "auto", *ours, *harness.path_providers(ours, DEVICE)]
    if DRY:  # the interpreter's time is not host overhead
        providers = [p for p in providers if not p.startswith("triton") and p != "auto"]
    for provider in providers:
        if provider == "peft" and harness.peft_import_error():
            continue
        row = {"provider": provider, **harness.case_fields(case), "calls": calls}
        try:
            step = harness.make_step(provider, case, harness.make_inputs(case, DEVICE))
            for _ in range(3 if DRY else 10):
                step()
            _sync()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                _sync()
                samples.append((time.perf_counter() - start) / calls * 1e6)
            row["host_us_per_call"] = round(statistics.median(samples), 1)
        except Exception as err:
            row["error"] = _error(err)
            traceback.print_exc()
        _emit(work / "overhead.jsonl", row)


# ----------------------------------------------------------------------------------------------- sweep


def _configs(keys: tuple[str, ...], values: list[tuple]) -> list[dict]:
    return [dict(zip(keys, v, strict=True)) for v in values]


_LINEAR_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_SKINNY_KEYS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")


def sweep_plan() -> dict:
    """Shapes and candidate configs; the first config of each list is today's choice."""
    if DRY:
        return dict(
            large=(64, 96, 80, 8),
            decode=(8, 96, 80, 8),
            linear_large=_configs(_LINEAR_KEYS, [(64, 64, 32, 1, 4, 1), (32, 128, 64, 1, 4, 1)]),
            linear_decode=_configs(_LINEAR_KEYS, [(16, 128, 128, 1, 4, 1), (16, 32, 64, 1, 4, 1)]),
            skinny=_configs(_SKINNY_KEYS, [(64, 64, 4, 1), (32, 128, 4, 1)]),
            reduce=[(64, 64, 4, 1, 1), (32, 128, 4, 1, 1)],
        )
    return dict(
        large=(8192, 4096, 4096, 16),
        decode=(16, 4096, 4096, 16),
        linear_large=_configs(
            _LINEAR_KEYS,
            [
                (128, 256, 64, 8, 8, 3),
                (128, 128, 64, 8, 8, 3),
                (128, 256, 64, 8, 8, 4),
                (128, 256, 64, 16, 8, 3),
                (256, 128, 64, 8, 8, 3),
                (128, 256, 32, 8, 8, 4),
                (256, 256, 64, 8, 8, 2),
            ],
        ),
        linear_decode=_configs(
            _LINEAR_KEYS,
            [
                (16, 32, 256, 1, 4, 3),
                (16, 128, 128, 1, 4, 4),
                (16, 32, 512, 1, 4, 2),
                (16, 16, 256, 1, 4, 3),
                (16, 32, 256, 1, 2, 4),
                (16, 64, 256, 1, 4, 3),
            ],
        ),
        skinny=_configs(
            _SKINNY_KEYS,
            [
                (32, 128, 4, 4),
                (64, 64, 4, 3),
                (16, 128, 4, 4),
                (32, 256, 4, 3),
                (32, 128, 2, 4),
                (64, 128, 8, 4),
            ],
        ),
        # (BLOCK_M, BLOCK_P, num_warps, num_stages, waves of SMs for the row splits)
        reduce=[
            (128, 64, 4, 3, 2),
            (64, 64, 4, 3, 2),
            (256, 64, 8, 3, 2),
            (128, 32, 4, 3, 2),
            (128, 64, 4, 4, 4),
        ],
    )


@contextlib.contextmanager
def _patched(module, **replacements) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def phase_sweep(work: Path) -> None:
    """Tile configs of the three kernels and the in-mainloop projection, each checked before it is timed."""
    from lora_kernels.ops import LoRAParams
    from lora_kernels.ops import triton_lora as tl_ops

    out = work / "sweep.jsonl"
    plan = sweep_plan()
    dtype = torch.float32 if DRY else torch.bfloat16
    launched: list[dict] = []
    real_launch = tl_ops._launch

    def recording_launch(*args, **kwargs):
        cfg = real_launch(*args, **kwargs)
        launched.append(cfg)
        return cfg

    def problem(M, K, N, r):
        g = torch.Generator(device=DEVICE).manual_seed(0)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=g, device=DEVICE) * std).to(dtype)

        return dict(
            x=rand(M, K),
            w=rand(N, K, std=K**-0.5),
            b=rand(N),
            A=rand(r, K, std=K**-0.5),
            B=rand(N, r, std=r**-0.5),
        )

    def record(
        kind: str, shape: tuple, cfg: dict, fn: Callable[[], torch.Tensor], ref: torch.Tensor, base_ms
    ):
        row = {"kernel": kind, "shape": "x".join(map(str, shape)), "config": cfg}
        try:
            launched.clear()
            result = fn()
            row["ran_config"] = launched[-1] if launched else None
            row["max_rel_error"] = relative_error(result, ref)
            assert_close(result, ref, dtype, kind)  # the test suite's tolerance for this dtype
            row["median_ms"] = _time_ms(fn)
            row["baseline_ms"] = base_ms
            row["ratio_to_baseline"] = row["median_ms"] / base_ms
        except Exception as error:
            row["error"] = _error(error)
            traceback.print_exc()
        _emit(out, row)

    with _patched(tl_ops, _launch=recording_launch), tl_ops._launch_guard():
        # 1. the GEMM with the LoRA epilogue (forward: y = x·Wᵀ + t·Bᵀ + b), against F.linear alone
        for label in ("large", "decode"):
            M, K, N, r = plan[label]
            p = problem(M, K, N, r)
            t = (p["x"].float() @ p["A"].float().t()) * 2.0
            ref = F.linear(p["x"].float(), p["w"].float(), p["b"].float()) + t @ p["B"].float().t()
            base_ms = _time_ms(lambda p=p: F.linear(p["x"], p["w"], p["b"]))
            for cfg in plan[f"linear_{label}"]:
                with _patched(tl_ops, _linear_config=lambda *a, cfg=cfg: dict(cfg)):
                    fn = lambda p=p, t=t: tl_ops._linear_with_lora(
                        p["x"], p["w"].t(), t, p["B"].t(), p["b"], 0.0, 0
                    )
                    record(f"linear/{label}", (M, K, N, r), cfg, fn, ref, base_ms)
        # 2. the skinny projection t = s·dropout(x)·Aᵀ, against cuBLAS's x·Aᵀ (no dropout)
        M, K, N, r = plan["large"]
        p = problem(M, K, N, r)
        base_ms = _time_ms(lambda: torch.mm(p["x"], p["A"].t()))
        for dropout_p in (0.0, 0.1):
            mask = None
            if dropout_p:
                from lora_kernels import dropout_mask

                mask = dropout_mask(7, (M, K), dropout_p).to(DEVICE)
            x_ref = p["x"].float() if mask is None else p["x"].float() * mask  # the mask holds 1/(1-p)
            ref = 2.0 * x_ref @ p["A"].float().t()
            for cfg in plan["skinny"]:
                full = dict(cfg, BLOCK_R=tl_ops._block_r(r))
                with _patched(tl_ops, _skinny_config=lambda *a, full=full: dict(full)):
                    seed = torch.full(
                        (), 7, dtype=torch.int64, device=DEVICE
                    )  # the kernels read it on the device
                    fn = lambda dp=dropout_p, seed=seed: tl_ops._project(p["x"], p["A"].t(), 2.0, dp, seed)
                    record(f"project/p{dropout_p:g}", (M, K, r), cfg, fn, ref, base_ms)
        # 3. the row reduction dB = dYᵀ·t (+ dbias), against cuBLAS's dYᵀ·t
        grad_y = torch.randn(M, N, device=DEVICE, dtype=dtype)
        t = torch.randn(M, r, device=DEVICE)
        ref = grad_y.float().t() @ t
        base_ms = _time_ms(lambda: torch.mm(grad_y.t(), t.to(dtype)))
        for block_m, block_p, warps, stages, waves in plan["reduce"]:
            cfg = dict(BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=tl_ops._block_r(r), num_warps=warps,
                       num_stages=stages)  # fmt: skip

            def splits(M_, num_blocks, bm, device, waves=waves):
                if DRY:
                    return 1
                sms = tl_ops._num_sms(device.index or 0)
                return max(1, min(-(-M_ // (bm * 4)), -(-waves * sms // num_blocks)))

            with _patched(tl_ops, _reduce_config=lambda *a, cfg=cfg: dict(cfg), _row_splits=splits):
                fn = lambda: tl_ops._reduce_rows(grad_y, t, 0.0, 0, with_colsum=True)[0]
                record("reduce_rows/dB", (M, N, r), dict(cfg, waves=waves), fn, ref, base_ms)
        # 3b. what the backward takes from dY besides dX (s·dY·B, dB, db): one pass (PROJECT) against two, the
        # baseline; checked on s·dY·B, the output the single pass adds
        ref = 2.0 * grad_y.float() @ p["B"].float()
        fn = lambda: tl_ops._grad_y_pass(grad_y, p["B"], t, 2.0, True, True)[0]
        with _patched(tl_ops, _single_pass_over_dy=lambda r: False):
            base_ms = _time_ms(fn)
        for single in (False, True):
            with _patched(tl_ops, _single_pass_over_dy=lambda r, single=single: single):
                record("grad_y_pass", (M, N, r), {"single_pass": single}, fn, ref, base_ms)
    # 4. the projection computed in the GEMM's main loop (FUSE_PROJECT) against the separate kernel; the
    # fused dX runs last (it faulted once on an H200 in fp16: a fault ends this process, not what came before)
    problems = {}
    for label in ("large", "decode"):
        M, K, N, r = plan[label]
        p = problem(M, K, N, r)
        p["grad_y"] = torch.randn(M, N, device=DEVICE, dtype=dtype)
        p["base_ms"] = _time_ms(lambda p=p: F.linear(p["x"], p["w"], p["b"]))
        p["ref_y"] = F.linear(p["x"].float(), p["w"].float(), p["b"].float()) + 2.0 * (
            p["x"].float() @ p["A"].float().t() @ p["B"].float().t()
        )
        p["ref_dx"] = p["grad_y"].float() @ p["w"].float() + 2.0 * (
            p["grad_y"].float() @ p["B"].float() @ p["A"].float()
        )
        problems[label] = (p, (M, K, N, r))
    for fused, which in ((False, "forward"), (False, "dx"), (True, "forward"), (True, "dx")):
        for label, (p, shape) in problems.items():
            if which == "forward":  # lora_forward, with the rule forced either way
                fn = lambda p=p: tl_ops.lora_forward(p["x"], p["w"], p["b"], p["A"], p["B"], LoRAParams(2.0))[
                    0
                ]
                ref, context = p["ref_y"], _patched(tl_ops, _fuse_projection=lambda *a, f=fused: f)
            else:  # dX = dY·W + (s·dY·B)·A, s·dY·B by the skinny kernel or in the GEMM's main loop

                def fn(p=p, fused=fused):
                    grad_t = torch.empty(p["grad_y"].shape[0], p["A"].shape[0], device=DEVICE)
                    if not fused:
                        grad_t = tl_ops._project(p["grad_y"], p["B"], 2.0, 0.0, 0)
                    project = p["B"] if fused else None
                    return tl_ops._linear_with_lora(
                        p["grad_y"], p["w"], grad_t, p["A"], None, 0.0, 0, project, 2.0
                    )

                ref, context = p["ref_dx"], tl_ops._launch_guard()  # launchers called directly: the lock
            with context:
                record(f"{which}/{label}", shape, {"FUSE_PROJECT": fused}, fn, ref, p["base_ms"])


# ----------------------------------------------------------------------------------------------- sanitize


def phase_tma(work: Path) -> None:
    """Issue 21's decision sweep (benchmarks/tma_sweep.py): today's fused kernel, the TMA persistent
    variants and the split path against ``F.linear``, forward and dX; ``tma_table.json`` holds
    ``{case key: {candidate: ms}}`` for the routing table."""
    import tma_sweep

    tma_sweep.run_all(work)


def phase_sanitize(work: Path) -> None:
    """One forward and backward of every kernel variant on odd shapes (run under compute-sanitizer)."""
    dtypes = [torch.float32] if DRY else [torch.bfloat16, torch.float32]
    backends = [b for b in available_backends(DEVICE) if b != "torch"]
    for backend in backends:
        for dtype in dtypes:
            for dropout_p in (0.0, 0.1):
                for lead in ((3, 37), (1,)):
                    x = torch.randn(*lead, 67, device=DEVICE, dtype=dtype, requires_grad=True)
                    w = torch.randn(45, 67, device=DEVICE, dtype=dtype) / 8
                    b = torch.randn(90, device=DEVICE, dtype=dtype)[::2]  # a strided bias
                    A = (torch.randn(5, 67, device=DEVICE, dtype=dtype) / 8).requires_grad_()
                    B = (torch.randn(45, 5, device=DEVICE, dtype=dtype) / 2).requires_grad_()
                    m = (torch.rand(45, device=DEVICE, dtype=dtype) + 0.5).requires_grad_()
                    for dora in (False, True) if lead != (1,) else (False,):  # DoRA on the odd shape only
                        row = {"backend": backend, "dtype": str(dtype), "dropout": dropout_p, "lead": lead,
                               "dora": dora}  # fmt: skip
                        try:
                            with use_backend(backend):
                                if dora:
                                    y = dora_linear(x, w, b, A, B, m, 2.0, dropout_p, True, dropout_seed=3)
                                else:
                                    y = lora_linear(
                                        x, w, b, A, B, 2.0, dropout_p, training=True, dropout_seed=3
                                    )
                                y.float().square().sum().backward()
                            _sync()
                            row["ok"] = bool(torch.isfinite(y).all())
                        except Exception as err:
                            row["error"] = _error(err)
                        _emit(work / "sanitize.jsonl", row)
    print("sanitizer run done", flush=True)


# ----------------------------------------------------------------------------------------------- e2e


def phase_e2e(work: Path) -> None:
    """A training step of a small Llama-style model: PEFT against PEFT + ``lora_kernels.peft.fuse``."""
    from peft import LoraConfig, get_peft_model

    import lora_kernels.peft

    if DRY:
        dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        dtype, batch, seq, vocab, steps = torch.float32, 2, 16, 128, 1
    else:
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        dtype, batch, seq, vocab, steps = torch.bfloat16, 4, 1024, 32000, 10
    torch.manual_seed(0)
    base = tiny_llama(**dims, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=max(seq, 64))
    base = base.to(DEVICE, dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    for use_dora, dropout_p in ((False, 0.0), (False, 0.05), (True, 0.05)):
        for variant in ("peft", "peft+fuse"):
            row = {"variant": variant, "dora": use_dora, "dropout": dropout_p, "layers": 2,
                   "hidden": dims["hidden_size"], "tokens": batch * seq, "r": 16, "dtype": str(dtype)}  # fmt: skip
            try:
                torch.manual_seed(1)
                model = get_peft_model(
                    copy.deepcopy(base),
                    LoraConfig(
                        r=16,
                        lora_alpha=32,
                        target_modules=LLAMA_PROJECTIONS,
                        lora_dropout=dropout_p,
                        use_dora=use_dora,
                    ),
                )
                with torch.no_grad():  # the same non-zero B in both variants, so the adapters do work
                    gen = torch.Generator().manual_seed(2)
                    for name, param in model.named_parameters():
                        if "lora_B" in name:
                            param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
                if variant == "peft+fuse":
                    row["fused_layers"] = lora_kernels.peft.fuse(model)
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)

                def step(model=model, opt=opt) -> float:
                    opt.zero_grad(set_to_none=True)
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    return loss.detach()

                row["first_loss"] = float(step())
                step()
                _sync()
                if DEVICE.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    _sync()
                    times.append((time.perf_counter() - start) * 1e3)
                row["step_ms"] = round(statistics.median(times), 2)
                if DEVICE.type == "cuda":
                    row["peak_above_model_MiB"] = round(
                        (torch.cuda.max_memory_allocated() - before) / 2**20, 1
                    )
                del model, opt, params
            except Exception as err:
                row["error"] = _error(err)
                traceback.print_exc()
            _emit(work / "e2e.jsonl", row)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- summary


def _md_table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


_OUTCOME = re.compile(r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
_TEST_ID = re.compile(r"(tests/\S+::\S+)")


def _log_lines(log: Path, title: str) -> list[str]:
    """Outcomes read from a ``pytest -v`` log, for a run cut off before it wrote its junit XML."""
    if not log.exists():
        return [f"## {title}", "", "did not run", ""]
    outcomes: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        test, outcome = _TEST_ID.search(line), _OUTCOME.search(line)
        if test and outcome:
            outcomes[test.group(1)] = outcome.group(1)
    counts = collections.Counter(outcomes.values())
    lines = [f"## {title}", "", f"no junit XML: the run was cut off; from its log, {len(outcomes)} tests reported: "
             + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())), ""]  # fmt: skip
    lines += [
        f"- {outcome.lower()}: `{test}`"
        for test, outcome in outcomes.items()
        if outcome in ("FAILED", "ERROR")
    ]
    crashed = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if "node down" in ln]
    lines += [f"- worker crash: {ln}" for ln in crashed]
    return [*lines, ""]


def _junit_lines(path: Path, title: str, log: Path) -> list[str]:
    if not path.exists():
        return _log_lines(log, title)
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [f"## {title}", "", f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped (`{path.name}`)", ""]  # fmt: skip
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            lines.append(f"- {bad.tag}: `{case.get('classname')}::{case.get('name')}` {message}")
    return [*lines, ""]


def phase_summary(work: Path, out: Path) -> int:
    """Write SUMMARY.md, results.json and results.md; returns how many rows hold an error."""
    env = (_read(work / "env.jsonl") or [{}])[-1]
    lines = ["# GPU run", ""]
    if DRY:
        lines += ["**Dry run** (CPU, interpreter, tiny shapes): checks the script, measures nothing.", ""]
    lines += [f"Device: {env.get('device')}; versions: {env.get('versions')}",
              f"SMs {env.get('sms')}, L2 {env.get('l2_MiB')} MiB, memory {env.get('memory_GiB')} GiB; "
              f"backends {env.get('backends')}", ""]  # fmt: skip
    phases = work / "phases.tsv"
    if phases.exists():
        lines += ["## Phases", "", "| phase | status | seconds |", "|---|---|---|"]
        lines += ["| " + " | ".join(line.split("\t")) + " |" for line in phases.read_text().splitlines()]
        lines.append("")
    lines += _junit_lines(work / "junit-gpu.xml", "Tests marked cuda (run first)", work / "tests-gpu.log")
    if not DRY:
        lines += _junit_lines(out / "junit.xml", "The other tests, on the device", work / "tests.log")
    lines += _junit_lines(
        out / "junit-cuda-ext.xml", "Tests of the cuda backend (extension built there)", work / "cuda-ext.log"
    )

    rows = _read(work / "table.jsonl")
    harness.add_ratios(rows)
    if rows:
        lines += routing_lines(rows, out, env.get("device") or harness.device_name(DEVICE))
    environment = {"device": env.get("device"), "versions": env.get("versions") or {}, "notes": []}
    if DRY:
        environment["notes"].append(
            "dry run: CPU, Triton interpreter, tiny shapes; the times measure nothing"
        )
    results = {"environment": environment}
    results["results"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if rows:
        (out / "results.md").write_text(harness.format_markdown(rows, results["environment"]))
        lines += [
            "## Timing table",
            "",
            *harness.format_markdown(rows, results["environment"]).splitlines()[6:],
        ]
        errors = [r for r in rows if r.get("error")]
        lines += [f"- {r['provider']} {r['mode']} {r['shape']} M={r['M']}: {r['error']}" for r in errors]
        lines.append("")
    for name, title, columns in (
        ("overhead", "Host time per eager fwd+bwd call (tiny problem)", ["provider", "host_us_per_call", "error"]),
        ("sweep", "Tile-config sweep", ["kernel", "shape", "config", "ran_config", "median_ms", "baseline_ms",
                                        "ratio_to_baseline", "max_rel_error", "error"]),
        ("tma", "Decision sweep: GEMM paths, forward and dX (benchmarks/tma_sweep.py)",
         ["case", "candidate", "ms", "max_rel_error", "skipped", "error"]),
        ("sanitize", "compute-sanitizer workload", ["backend", "dtype", "dropout", "lead", "dora", "ok", "error"]),
        ("qlora", "QLoRA (NF4 base; issue 23)", ["mode", "shape", "M", "dropout", "provider", "median_ms",
                                                 "saved_bytes", "peak_bytes", "max_rel_error", "skipped", "error"]),
        ("e2e", "End-to-end training step (Llama-style, 2 layers)", ["variant", "dora", "dropout", "hidden", "tokens",
                                                                  "fused_layers", "first_loss", "step_ms",
                                                                  "peak_above_model_MiB", "error"]),
    ):  # fmt: skip
        phase_rows = _read(work / f"{name}.jsonl")
        if phase_rows:
            lines += [f"## {title}", "", *_md_table(phase_rows, columns), ""]
    sanitizer_log = work / "sanitize.log"
    if sanitizer_log.exists():
        verdicts = [
            ln for ln in sanitizer_log.read_text().splitlines() if "ERROR SUMMARY" in ln or "skipped" in ln
        ]
        lines += [
            "compute-sanitizer: " + ("; ".join(verdicts[-3:]) or "no verdict line (see sanitize.log)"),
            "",
        ]
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    errors = [r for name in ("table", "overhead", "sweep", "tma", "sanitize", "e2e", "qlora") for r in _read(work / f"{name}.jsonl")
              if r.get("error")]  # fmt: skip
    return len(errors)


# ----------------------------------------------------------------------------------------------- routing


def routing_table(rows: list[dict], device: str, stand_ins: dict[str, str] | None = None, **notes) -> dict:
    """The routing table of ``device`` (``lora_kernels/tuning/<device>.json``, read by
    :mod:`lora_kernels.ops.routing`) from timing rows: for each LoRA case (DoRA is not routed), the median
    ms of every path, from the providers ``backend:path`` of the backend ``auto`` selects for the case's
    dtype and rank. Rows with an error, a failed check included, are left out: the fastest *correct*
    path wins. ``stand_ins`` instead maps provider names to the path whose time they stand in for (a run
    that measured backends, not paths); ``notes`` are written into the file as they are."""
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("dora") or row.get("mode") not in ("fwd", "fwd_bwd") or row.get("error"):
            continue
        if not isinstance(row.get("median_ms"), int | float):
            continue
        dtype = harness._DTYPES_BY_NAME[row["dtype"]]
        if stand_ins is not None:
            path = stand_ins.get(row["provider"])
        else:
            backend, _, path = row["provider"].partition(":")
            with use_backend("auto"):
                wanted = select_backend(torch.device(DEVICE.type), dtype, row["r"])
            path = path if backend == wanted else ""
        if not path:
            continue
        key = routing.case_key(
            row["mode"], row["dtype"], row.get("adapter_dtype") or row["dtype"], row["dropout"] > 0,
            row["M"], row["out_features"], row["in_features"], row["r"],
        )  # fmt: skip
        cases.setdefault(key, {})[path] = round(float(row["median_ms"]), 4)
    return {"format": routing.TABLE_FORMAT, "device": device, **notes, "cases": dict(sorted(cases.items()))}


def write_routing_table(table: dict, file: Path) -> str:
    """Write ``table`` to ``file`` and read it back through the routing's own loader; a line that says
    what it holds (or why the loader refused it)."""
    file.write_text(json.dumps(table, indent=1) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = routing._load_table.__wrapped__(str(file), table["device"])
    if caught or loaded is None:
        return f"{file.name}: refused by the loader: {[str(w.message) for w in caught]}"
    winners = collections.Counter(min(times, key=times.__getitem__) for times in loaded.cases.values())
    return f"{file.name}: {len(loaded.cases)} cases, winners {dict(winners)}"


def routing_lines(rows: list[dict], out: Path, device: str) -> list[str]:
    """The summary's routing section: the table this run measured (``out/tuning-<device>.json``, to commit
    as ``lora_kernels/tuning/<device>.json``) and, per case, ``auto`` against the fastest provider."""
    table = routing_table(
        rows, device, written_by="benchmarks/gpu_run.sh (the table phase's backend:path providers)",
        versions=next((r.get("versions") for r in rows if r.get("versions")), None),
    )  # fmt: skip
    if DRY:
        table["note"] = "dry run: CPU, Triton interpreter, tiny shapes; the times measure nothing"
    lines = [
        "## Routing",
        "",
        write_routing_table(table, out / f"tuning-{routing.device_slug(device)}.json"),
        "",
    ]
    by_case, labels = collections.defaultdict(dict), {}
    for row in rows:
        if (
            isinstance(row.get("median_ms"), int | float)
            and not row.get("error")
            and row["provider"] != "base"
        ):
            by_case[harness.case_key(row)][row["provider"]] = row["median_ms"]
            labels[harness.case_key(row)] = (
                f"{row['mode']}{'+dora' if row.get('dora') else ''} {row['dtype']}"
                f"{'/' + row['adapter_dtype'] if row.get('adapter_dtype') not in (None, row['dtype']) else ''}"
                f" {row['shape']} M={row['M']} r={row['r']} p={row['dropout']:g}"
            )
    lines += ["| case | auto ms | fastest provider | its ms | auto / fastest |", "|---|---|---|---|---|"]
    for key, times in by_case.items():  # the fastest of every provider but F.linear, PEFT included
        if "auto" in times:
            best = min(times, key=times.__getitem__)
            cells = [labels[key], f"{times['auto']:.3f}", best, f"{times[best]:.3f}",
                     f"{times['auto'] / times[best]:.3f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def tuning_from_results(results: Path, out: Path, stand_ins: str | None, note: str | None) -> int:
    """``tuning``: a routing table from a committed ``results.json`` (see :func:`routing_table`)."""
    data = json.loads(results.read_text())
    mapping = dict(item.split("=", 1) for item in stand_ins.split(",")) if stand_ins else None
    device = data["environment"]["device"]
    notes = {"written_by": f"python benchmarks/gpu_run.py tuning --from {results}"
                           + (f" --stand-in {stand_ins}" if stand_ins else "")}  # fmt: skip
    if note:
        notes["note"] = note
    notes["versions"] = data["environment"].get("versions")
    print(write_routing_table(routing_table(data["results"], device, mapping, **notes), out))
    return 0


PHASES = {
    "env": phase_env,
    "table": phase_table,
    "qlora": phase_qlora,
    "overhead": phase_overhead,
    "sweep": phase_sweep,
    "tma": phase_tma,
    "sanitize": phase_sanitize,
    "e2e": phase_e2e,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=[*PHASES, "summary", "tuning"])
    parser.add_argument(
        "--work", type=Path, help="folder of the raw per-phase files (every phase but tuning)"
    )
    parser.add_argument(
        "--out", type=Path, help="where summary writes SUMMARY.md and the results; tuning: the file"
    )
    parser.add_argument("--from", dest="results", type=Path, help="tuning: the results.json to read")
    parser.add_argument(
        "--stand-in", help="tuning: provider=path,... (a run that measured backends, not paths)"
    )
    parser.add_argument("--note", help="tuning: a note written into the table")
    args = parser.parse_args(argv)
    quiet_bitsandbytes_cpu_notice()
    if args.phase == "tuning":
        if not (args.results and args.out):
            parser.error("tuning needs --from RESULTS_JSON and --out FILE")
        return tuning_from_results(args.results, args.out, args.stand_in, args.note)
    if args.work is None:
        parser.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "summary":
        errors = phase_summary(args.work, args.out or args.work)
        return 1 if errors and DRY else 0  # on the GPU, errors are results; in a dry run, rot
    else:
        PHASES[args.phase](args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
