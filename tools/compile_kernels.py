"""Compile every Triton kernel of lora_kernels for real GPU targets, on a machine with no GPU.

    python tools/compile_kernels.py --arch 80 90

Lowers each kernel (fp16, bf16, fp32 inputs; with and without dropout) to PTX and cubin through
``triton.compile`` for the given compute capabilities and prints one ``ok`` line per compile. This
catches code that runs under the interpreter but does not compile (the interpreter is more lenient).
For sm_90 and newer it also compiles the TMA persistent variants (lora_kernels/ops/triton_tma.py) as their
launchers would launch them (the forward GEMM, dX without and with the dropout mask; plus the decode-sized
config)
and prints each one's registers, spills and shared memory; one that needs more shared memory than an
sm_90 SM has (227 KiB) fails, and so does a warp-specialized build that triton left unspecialized. Run it
without ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton
from kernel_static_cost import record_tma_launches, static_cost
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_kernels.ops import triton_dora, triton_lora, triton_reduce, triton_tma

#: Per kernel: pointer args ("in" = the input dtype, else a fixed type), float scalars, constexprs, options
#: and the variants (extra constexprs) to compile.
KERNELS = {
    "_lora_linear_kernel": (
        {
            "a_ptr": "in",
            "b_ptr": "in",
            "t_ptr": "fp32",
            "u_ptr": "fp32",
            "p_ptr": "fp32",
            "bias_ptr": "in",
            "out_ptr": "in",
            "a2_ptr": "in",
            "a_scale_ptr": "fp32",
            "out_scale_ptr": "fp32",
            "z_ptr": "in",
            "seed_ptr": "i64",
        },
        {"project_scale", "lora_scale", "dropout_scale"},
        {
            "HAS_BIAS": True,
            "SCALE_A": False,
            "SECOND": 0,
            "DORA_OUT": False,
            "FUSE_PROJECT": False,
            "BLOCK_M": 128,
            "BLOCK_N": 128,
            "BLOCK_K": 64,
            "BLOCK_R": 16,
            "GROUP_M": 8,
        },
        {"num_warps": 8, "num_stages": 3},
        # LoRA (t by its own kernel, or fused), then DoRA: forward without / with dropout, dX without / with
        (
            {},
            {"FUSE_PROJECT": True},
            {"FUSE_PROJECT": True, "DORA_OUT": True},
            {"SECOND": 1, "DORA_OUT": True},
            {"SCALE_A": True},
            {"SECOND": 2},
        ),
    ),
    "_lora_project_kernel": (
        {"a_ptr": "in", "b_ptr": "fp32", "out_ptr": "fp32", "dropped_ptr": "in", "seed_ptr": "i64"},
        {"scale", "dropout_scale"},
        {"STORE_DROPPED": False, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 64},
        {"num_warps": 4, "num_stages": 3},
        ({}, {"STORE_DROPPED": True}),  # DoRA with dropout: x̃ stored beside t
    ),
    "_lora_reduce_rows_kernel": (
        {
            "a_ptr": "in",
            "c_ptr": "fp32",
            "out_ptr": "fp32",
            "colsum_ptr": "fp32",
            "z_ptr": "in",
            "prodsum_ptr": "fp32",
            "b_ptr": "fp32",
            "proj_ptr": "fp32",
            "seed_ptr": "i64",
        },
        {"scale"},
        {
            "HAS_COLSUM": True,
            "HAS_PRODSUM": False,
            "PROJECT": False,
            "BLOCK_M": 64,
            "BLOCK_P": 64,
            "BLOCK_R": 32,
        },
        {"num_warps": 4, "num_stages": 3},
        # DoRA: Σ_rows dY ⊙ z on dB's loads; the backward's single pass over dY (s·dY·B too, never dropout)
        (
            {},
            {"HAS_PRODSUM": True},
            {"PROJECT": True, "HAS_DROPOUT": False},
            {"PROJECT": True, "HAS_DROPOUT": False, "HAS_PRODSUM": True},
        ),
    ),
    "_dora_norm_kernel": (  # DoRA's ‖W + s·B·A‖ (no dropout, no input precision: one variant per dtype)
        {"w_ptr": "in", "a_ptr": "fp32", "b_ptr": "fp32", "out_ptr": "fp32"},
        {"scale"},
        {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 16},
        {"num_warps": 4, "num_stages": 3},
        ({},),
    ),
}


def _kernel(name: str):
    """The ``@triton.jit`` kernel ``name`` of :data:`KERNELS`, from the module that defines it."""
    for module in (triton_lora, triton_reduce, triton_dora):
        kernel = getattr(module, name, None)
        if kernel is not None:
            return kernel
    raise KeyError(f"no Triton kernel {name!r} in lora_kernels.ops")


def compile_kernel(name: str, dtype: str, dropout: bool, variant: dict, arch: int) -> None:
    kernel = _kernel(name)
    pointers, floats, constexprs, options, _ = KERNELS[name]
    constexprs = {**constexprs, **variant}
    if "HAS_DROPOUT" in kernel.arg_names:
        constexprs.update(HAS_DROPOUT=dropout, INPUT_PRECISION="tf32")
    if "LORA_FP32" in kernel.arg_names and "LORA_FP32" not in variant:
        constexprs["LORA_FP32"] = dtype == "fp16"  # as the launcher sets it: the fp16 epilogue runs in TF32
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + (dtype if pointers[arg] == "in" else pointers[arg])
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


#: The most shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SM90_MAX_SHARED = 227 * 1024
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _tf32():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def compile_tma(arch: int) -> int:
    """Compile every TMA variant's launches for ``sm_<arch>``, print one line each; returns the failures."""
    failures = 0
    for variant in triton_tma.VARIANTS:
        for dtype in ("fp16", "bf16", "fp32"):
            # M = 256: the large-M configs (chosen by M > 64, dtype, variant, mask); M = 16: the decode one
            for M in (256, 16) if variant == "tma" else (256,):
                with _tf32():  # fp32 takes the TMA kernels only where TF32 is allowed
                    launches = record_tma_launches(M, 256, 512, 16, 0.1, _TORCH_DTYPES[dtype], variant)
                for (kernel, args, kwargs), what in zip(launches, ("fwd", "dX", "dX+dropout"), strict=True):
                    tiles = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "num_", "EPILOGUE"))}
                    label = f"sm_{arch} {kernel.__name__} {variant} {dtype} M={M} {what} {tiles}"
                    try:
                        cost = static_cost(kernel, args, kwargs, arch)
                    except Exception as err:
                        failures += 1
                        print(f"FAIL {label}: {type(err).__name__}: {err}")
                        continue
                    resources = " ".join(f"{k}={v}" for k, v in cost.items() if k != "mul.hi.u32")
                    if cost["shared_bytes"] > SM90_MAX_SHARED:
                        failures += 1
                        print(f"FAIL {label}: {resources}: more shared memory than an SM has")
                    elif kwargs["WARP_SPECIALIZE"] and not cost["warp_specialized"]:
                        failures += 1
                        print(f"FAIL {label}: {resources}: triton left the loop unspecialized")
                    else:
                        print(f"ok {label} {resources}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--tma-only", action="store_true", help="only the TMA variants (sm_90 and newer)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    print(f"triton {triton.__version__}")
    failures = 0
    for arch in args.arch:
        for name, spec in KERNELS.items() if not args.tma_only else ():
            for variant in spec[-1]:
                for dtype in ("fp16", "bf16", "fp32"):
                    kernel = _kernel(name)
                    # with and without dropout, unless the variant is launched with one only
                    dropouts = (False, True) if "HAS_DROPOUT" in kernel.arg_names else (False,)
                    for dropout in (variant["HAS_DROPOUT"],) if "HAS_DROPOUT" in variant else dropouts:
                        what = f"sm_{arch} {name} {dtype} dropout={dropout} {variant or ''}"
                        try:
                            compile_kernel(name, dtype, dropout, variant, arch)
                            print(f"ok {what}")
                        except Exception as err:  # report every failure, not just the first
                            failures += 1
                            print(f"FAIL {what}: {type(err).__name__}: {err}")
        if arch >= 90:
            failures += compile_tma(arch)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
