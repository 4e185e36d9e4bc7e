"""Static cost of the Triton kernels as the backend really launches them, compiled for a GPU without one.

    python tools/kernel_static_cost.py --shape 8192 4096 4096 16 --dropout 0.1 --arch 90 [--dora]

Runs the Triton backend's forward and backward on CPU tensors with the launcher patched to record each
launch instead of running it (tile configs as on a GPU: ``_*_config`` outside the interpreter), rebuilds
the specialisation Triton's JIT would give those arguments (divisibility by 16, integers equal to 1),
compiles each launch for ``--arch`` and prints, per kernel: the Philox multiplies (``mul.hi.u32`` in the
PTX), the SASS instruction count, registers and spill bytes (``ptxas -v`` and ``nvdisasm`` from triton's
own bundle) and the shared memory Triton allocates. Static counts, not time: a loop body counts once. Run
it without ``TRITON_INTERPRET``; it uses Triton internals (``create_function_from_signature``,
``JITFunction._pack_args``) that triton 3.6 and 3.8 share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from lora_kernels.ops import LoRAParams, triton_lora, triton_support, triton_tma

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@contextlib.contextmanager
def _recording():
    """Inside, ``triton_support._launch`` records ``(kernel, args, kwargs)`` of each launch (first config) in
    the yielded list instead of running it."""
    calls = []

    def record(kernel, grid_of, configs, args, constexprs):
        grid_of(configs[0])  # (sets the TMA kernels' host descriptor boxes for this config)
        calls.append((kernel, args, {**constexprs, **configs[0]}))
        return configs[0]

    launch, triton_support._launch = triton_support._launch, record
    try:
        yield calls
    finally:
        triton_support._launch = launch


def _problem(M: int, K: int, N: int, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    return x, w, b, torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)


def record_launches(
    M: int, K: int, N: int, r: int, dropout_p: float, dtype: torch.dtype, dora: bool = False
) -> list[tuple]:
    """``(kernel, args, kwargs)`` of every launch of one forward + backward (LoRA, or DoRA with its norm),
    nothing run."""
    with _recording() as calls:
        x, w, b, A, B = _problem(M, K, N, r, dtype)
        params = LoRAParams(2.0, dropout_p, 12345)
        if dora:
            triton_lora.dora_weight_norm(w, A, B, 2.0)
            scale = torch.ones(N)
            y, t, z = triton_lora.dora_forward(x, w, b, A, B, scale, params)
            triton_lora.dora_backward(torch.randn_like(y), x, w, A, B, t, z, scale, params, (True,) * 6)
        else:
            y, t = triton_lora.lora_forward(x, w, b, A, B, params)
            triton_lora.lora_backward(torch.randn_like(y), x, w, A, B, t, params, (True,) * 5)
    return calls


def record_tma_launches(
    M: int, K: int, N: int, r: int, dropout_p: float, dtype: torch.dtype, variant: str, num_sms: int = 132
) -> list[tuple]:
    """``(kernel, args, kwargs)`` of the forward GEMM (without dropout, so the ``*_t_fused`` variants fuse
    ``t``) and the dX GEMM, without dropout and (``dropout_p`` > 0) with its mask, of TMA ``variant``
    (:mod:`lora_kernels.ops.triton_tma`), nothing run; ``num_sms`` persistent programs (H100/H200: 132)."""
    with _recording() as calls:
        x, w, b, A, B = _problem(M, K, N, r, dtype)
        ws, fused = triton_tma.VARIANTS[variant]
        t = torch.empty(M, r)  # the forward as without dropout (with it, no variant fuses t)
        stored = triton_tma._descriptor_operands(x, w.t(), A.t() if fused else None)
        triton_tma._linear_tma(x, w.t(), t, B.t(), b, 0.0, 0, ws, stored, lora_scale=2.0, num_sms=num_sms)
        grad_y = torch.randn(M, N, dtype=dtype)
        stored = triton_tma._descriptor_operands(grad_y, w, B if fused else None)
        for p in (0.0, dropout_p) if dropout_p else (0.0,):
            triton_tma._linear_tma(
                grad_y, w, t, A, None, p, 1, ws, stored, project_scale=2.0, num_sms=num_sms
            )
    return calls


def static_cost(kernel, args: tuple, kwargs: dict, arch: int) -> dict:
    """Compile one recorded launch for ``sm_<arch>`` as Triton's JIT would, and read its resources."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)  # fmt: skip
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as handle:
            handle.write(ptx)
        ptx_target = re.search(r"\.target\s+(\S+)", ptx).group(1)
        cubin = os.path.join(tmp, "k.cubin")
        ptxas = [os.path.join(_BIN, "ptxas"), f"-arch={ptx_target}", "-v", handle.name, "-o", cubin]
        info = subprocess.run(ptxas, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), cubin], capture_output=True, text=True).stdout
    return {
        "mul.hi.u32": ptx.count("mul.hi.u32"),
        "sass": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line)),
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "shared_bytes": compiled.metadata.shared,
        # a warp-specialized loop (tl.range(warp_specialize=True)) that triton really split into partitions
        "warp_specialized": "ttg.warp_specialize" in compiled.asm["ttgir"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[8192, 4096, 4096, 16], metavar=("M", "K", "N", "r")
    )
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dora", action="store_true", help="DoRA's launches (norm, forward, backward)")
    parser.add_argument(
        "--tma",
        choices=list(triton_tma.VARIANTS),
        help="the forward and dX GEMMs of this TMA variant instead",
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    M, K, N, r = args.shape
    print(
        f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, M={M} K={K} N={N} r={r} p={args.dropout}"
        + (" DoRA" if args.dora else "")
        + (f" TMA {args.tma}" if args.tma else "")
    )
    if args.tma:
        launches = record_tma_launches(M, K, N, r, args.dropout, dtype, args.tma)
    else:
        launches = record_launches(M, K, N, r, args.dropout, dtype, args.dora)
    for kernel, call_args, kwargs in launches:
        cost = static_cost(kernel, call_args, kwargs, args.arch)
        tiles = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "num_", "EPILOGUE", "FUSE"))}
        print(f"{kernel.__name__:26s} dropout={kwargs.get('HAS_DROPOUT', False)!s:5s} "
              + " ".join(f"{k}={v}" for k, v in cost.items()) + f" {tiles}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
