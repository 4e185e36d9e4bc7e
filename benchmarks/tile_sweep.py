"""The tile-config sweep of a GPU visit (phase ``sweep``): candidate configs of the Triton backend's GEMM with
the LoRA epilogue, its skinny projection and its row reduction, one pass over dY against two, and the
projection in the GEMM's main loop against its own kernel; each checked against a float32 reference before
it is timed (:func:`gpu_rows.time_ms`), against the cuBLAS call it competes with.

    python benchmarks/gpu_run.py sweep --work DIR      # as benchmarks/gpu_run.sh calls it

Rows go to ``DIR/sweep.jsonl``: kernel, shape, the config asked for and the one that ran (a config that does
not fit falls back), ``median_ms``, ``baseline_ms``, their ratio, ``max_rel_error`` or ``error``.

The sweep reaches into the backend's private launchers and config functions; :data:`TRITON_INTERNALS` names
every one of them, and the module that holds it, in one place.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels import dropout_mask
from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce, triton_support
from lora_kernels.testing import assert_close, relative_error

from gpu_rows import DEVICE, DRY, emit, error_text, time_ms

#: The Triton backend's names that this sweep calls or replaces, each with the module that holds it: a
#: replacement is made there, where the backend's own callers look the name up. The only place they are
#: named.
TRITON_INTERNALS = {
    "_launch": triton_support,  # every kernel launch (replaced: records the config that ran)
    "_launch_guard": triton_support,  # the interpreter's lock, for launchers called directly
    "_num_sms": triton_support,
    "_block_r": triton_support,
    "_linear_config": triton_lora,  # the GEMM's config (replaced by each candidate)
    "_linear_with_lora": triton_lora,  # the GEMM with the LoRA epilogue (called)
    "_fuse_projection": triton_lora,  # whether the forward computes t in the GEMM's main loop (replaced)
    "lora_forward": triton_lora,
    "_skinny_config": triton_reduce,  # the projection's config (replaced)
    "_project": triton_reduce,  # t = s·dropout(x)·Aᵀ, or s·dY·B (called)
    "_reduce_config": triton_reduce,  # the row reduction's config (replaced)
    "_row_splits": triton_reduce,  # how many row splits it runs (replaced)
    "_reduce_rows": triton_reduce,  # dB = dYᵀ·t (+ db) (called)
    "_grad_y_pass": triton_reduce,  # what the backward takes from dY besides dX (called)
    "_single_pass_over_dy": triton_reduce,  # one pass over dY or two (replaced)
}


def _internal(name: str):
    return getattr(TRITON_INTERNALS[name], name)


@contextlib.contextmanager
def _replaced(**replacements) -> Iterator[None]:
    """Replace backend internals (by name, in the module :data:`TRITON_INTERNALS` gives) for the block."""
    saved = {name: _internal(name) for name in replacements}
    for name, value in replacements.items():
        setattr(TRITON_INTERNALS[name], name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TRITON_INTERNALS[name], name, value)


def _configs(keys: tuple[str, ...], values: list[tuple]) -> list[dict]:
    return [dict(zip(keys, v, strict=True)) for v in values]


_LINEAR_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_SKINNY_KEYS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")


def sweep_plan() -> dict:
    """Shapes and candidate configs; the first config of each list is today's choice.

    Cut to fit the visit's second call (40 rows to 26), keeping today's choice and its closest rivals in
    the H200 run (benchmarks/results/h200/raw/sweep.jsonl): GEMM 7 → 4 configs (dropped 128×128 and
    256×128, 1.43× and 1.40× F.linear there against 1.19× for 128×256, and 256×256 with 2 stages), decode
    GEMM 6 → 3 (dropped 16×128×128, 4.99× there against 4.32×, 16×16 and 2 warps), projection 6 → 3
    (dropped 64×64, 1.48× against 1.00×, 2 warps and 64×128 with 8 warps), row reduction 5 → 3 (dropped
    64×64, 1.80× against 1.33×, and BLOCK_P 32)."""
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
                (128, 256, 64, 8, 8, 4),
                (128, 256, 64, 16, 8, 3),
                (128, 256, 32, 8, 8, 4),
            ],
        ),
        linear_decode=_configs(
            _LINEAR_KEYS, [(16, 32, 256, 1, 4, 3), (16, 32, 512, 1, 4, 2), (16, 64, 256, 1, 4, 3)]
        ),
        skinny=_configs(_SKINNY_KEYS, [(32, 128, 4, 4), (16, 128, 4, 4), (32, 256, 4, 3)]),
        # (BLOCK_M, BLOCK_P, num_warps, num_stages, waves of SMs for the row splits)
        reduce=[(128, 64, 4, 3, 2), (256, 64, 8, 3, 2), (128, 64, 4, 4, 4)],
    )


def _problem(M: int, K: int, N: int, r: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def phase_sweep(work: Path) -> None:
    """Tile configs of the three kernels and the in-mainloop projection, each checked before it is timed."""
    out = work / "sweep.jsonl"
    plan = sweep_plan()
    dtype = torch.float32 if DRY else torch.bfloat16
    launched: list[dict] = []
    real_launch = _internal("_launch")

    def recording_launch(*args, **kwargs):
        cfg = real_launch(*args, **kwargs)
        launched.append(cfg)
        return cfg

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
            row["median_ms"] = time_ms(fn)
            row["baseline_ms"] = base_ms
            row["ratio_to_baseline"] = row["median_ms"] / base_ms
        except Exception as err:
            row["error"] = error_text(err)
            traceback.print_exc()
        emit(out, row)

    linear_with_lora, project = _internal("_linear_with_lora"), _internal("_project")
    block_r = _internal("_block_r")
    with _replaced(_launch=recording_launch), _internal("_launch_guard")():
        # 1. the GEMM with the LoRA epilogue (forward: y = x·Wᵀ + t·Bᵀ + b), against F.linear alone
        for label in ("large", "decode"):
            M, K, N, r = plan[label]
            p = _problem(M, K, N, r, dtype)
            t = (p["x"].float() @ p["A"].float().t()) * 2.0
            ref = F.linear(p["x"].float(), p["w"].float(), p["b"].float()) + t @ p["B"].float().t()
            base_ms = time_ms(lambda p=p: F.linear(p["x"], p["w"], p["b"]))
            for cfg in plan[f"linear_{label}"]:
                with _replaced(_linear_config=lambda *a, cfg=cfg: dict(cfg)):
                    fn = lambda p=p, t=t: linear_with_lora(p["x"], p["w"].t(), t, p["B"].t(), p["b"], 0.0, 0)
                    record(f"linear/{label}", (M, K, N, r), cfg, fn, ref, base_ms)
        # 2. the skinny projection t = s·dropout(x)·Aᵀ, against cuBLAS's x·Aᵀ (no dropout)
        M, K, N, r = plan["large"]
        p = _problem(M, K, N, r, dtype)
        base_ms = time_ms(lambda: torch.mm(p["x"], p["A"].t()))
        for dropout_p in (0.0, 0.1):
            mask = dropout_mask(7, (M, K), dropout_p).to(DEVICE) if dropout_p else None
            x_ref = p["x"].float() if mask is None else p["x"].float() * mask  # the mask holds 1/(1-p)
            ref = 2.0 * x_ref @ p["A"].float().t()
            seed = torch.full((), 7, dtype=torch.int64, device=DEVICE)  # the kernels read it on the device
            for cfg in plan["skinny"]:
                full = dict(cfg, BLOCK_R=block_r(r))
                with _replaced(_skinny_config=lambda *a, full=full: dict(full)):
                    fn = lambda dp=dropout_p, seed=seed: project(p["x"], p["A"].t(), 2.0, dp, seed)
                    record(f"project/p{dropout_p:g}", (M, K, r), cfg, fn, ref, base_ms)
        # 3. the row reduction dB = dYᵀ·t (+ dbias), against cuBLAS's dYᵀ·t
        grad_y = torch.randn(M, N, device=DEVICE, dtype=dtype)
        t = torch.randn(M, r, device=DEVICE)
        ref = grad_y.float().t() @ t
        base_ms = time_ms(lambda: torch.mm(grad_y.t(), t.to(dtype)))
        reduce_rows, num_sms = _internal("_reduce_rows"), _internal("_num_sms")
        for block_m, block_p, warps, stages, waves in plan["reduce"]:
            cfg = dict(
                BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r(r), num_warps=warps, num_stages=stages
            )

            def splits(M_, num_blocks, bm, device, waves=waves):
                if DRY:
                    return 1
                return max(1, min(-(-M_ // (bm * 4)), -(-waves * num_sms(device.index or 0) // num_blocks)))

            with _replaced(_reduce_config=lambda *a, cfg=cfg: dict(cfg), _row_splits=splits):
                fn = lambda: reduce_rows(grad_y, t, 0.0, 0, with_colsum=True)[0]
                record("reduce_rows/dB", (M, N, r), dict(cfg, waves=waves), fn, ref, base_ms)
        # 3b. what the backward takes from dY besides dX (s·dY·B, dB, db): one pass (PROJECT) against two, the
        # baseline; checked on s·dY·B, the output the single pass adds
        ref = 2.0 * grad_y.float() @ p["B"].float()
        grad_y_pass = _internal("_grad_y_pass")
        fn = lambda: grad_y_pass(grad_y, p["B"], t, 2.0, True, True)[0]
        with _replaced(_single_pass_over_dy=lambda r: False):
            base_ms = time_ms(fn)
        for single in (False, True):
            with _replaced(_single_pass_over_dy=lambda r, single=single: single):
                record("grad_y_pass", (M, N, r), {"single_pass": single}, fn, ref, base_ms)
    _sweep_fused_projection(plan, dtype, record, linear_with_lora, project)


def _sweep_fused_projection(plan: dict, dtype: torch.dtype, record, linear_with_lora, project) -> None:
    """4. The projection computed in the GEMM's main loop (FUSE_PROJECT) against the separate kernel; the
    fused dX runs last (it faulted once on an H200 in fp16: a fault ends this process, not what came before)."""
    lora_forward = _internal("lora_forward")
    problems = {}
    for label in ("large", "decode"):
        M, K, N, r = plan[label]
        p = _problem(M, K, N, r, dtype)
        p["grad_y"] = torch.randn(M, N, device=DEVICE, dtype=dtype)
        p["base_ms"] = time_ms(lambda p=p: F.linear(p["x"], p["w"], p["b"]))
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
                fn = lambda p=p: lora_forward(p["x"], p["w"], p["b"], p["A"], p["B"], LoRAParams(2.0))[0]
                ref, context = p["ref_y"], _replaced(_fuse_projection=lambda *a, f=fused: f)
            else:  # dX = dY·W + (s·dY·B)·A, s·dY·B by the skinny kernel or in the GEMM's main loop

                def fn(p=p, fused=fused):
                    grad_t = torch.empty(p["grad_y"].shape[0], p["A"].shape[0], device=DEVICE)
                    if not fused:
                        grad_t = project(p["grad_y"], p["B"], 2.0, 0.0, 0)
                    return linear_with_lora(
                        p["grad_y"], p["w"], grad_t, p["A"], None, 0.0, 0, p["B"] if fused else None, 2.0
                    )

                ref, context = (
                    p["ref_dx"],
                    _internal("_launch_guard")(),
                )  # launchers called directly: the lock
            with context:
                record(f"{which}/{label}", shape, {"FUSE_PROJECT": fused}, fn, ref, p["base_ms"])
