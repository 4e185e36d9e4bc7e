"""Compile every Triton kernel of lora_kernels for real GPU targets, on a machine with no GPU.

    python tools/compile_kernels.py --arch 80 90

Lowers each kernel (fp16, bf16, fp32 inputs; with and without dropout) to PTX and cubin through
``triton.compile`` for the given compute capabilities and prints one ``ok`` line per compile. This
catches code that runs under the interpreter but does not compile (the interpreter is more lenient).
Run it without ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import argparse
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_kernels.ops import triton_lora

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


def compile_kernel(name: str, dtype: str, dropout: bool, variant: dict, arch: int) -> None:
    kernel = getattr(triton_lora, name)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    print(f"triton {triton.__version__}")
    failures = 0
    for arch in args.arch:
        for name, spec in KERNELS.items():
            for variant in spec[-1]:
                for dtype in ("fp16", "bf16", "fp32"):
                    kernel = getattr(triton_lora, name)
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
