"""Compile the QLoRA Triton kernels (lora_kernels/ops/triton_nf4.py) for real GPU targets, without a GPU.

    python tools/compile_qlora_kernels.py --arch 80 90 [--quick]

As ``tools/compile_kernels.py`` does for the LoRA kernels: lowers ``_qlora_linear_kernel`` (with and without
dropout) and ``_dequant_4bit_kernel`` for each original-weight dtype (fp16, bf16, fp32), plain and
double-quantized (compiled without fp contraction, as the launcher asks), to cubin, one ``ok`` line each.
``--quick``: half-precision dtypes and the dropout variant only. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_kernels.ops import triton_nf4

QDTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def _signature(kernel, constexprs: dict, pointers: dict, floats: set) -> dict:
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    return signature


def compile_variant(name: str, dtype: str, nested: bool, dropout: bool, arch: int) -> None:
    kernel = getattr(triton_nf4, name)
    options = {"num_warps": 4, "num_stages": 3}
    if nested:
        options["enable_fp_fusion"] = False
    pointers = {
        "packed_ptr": "u8", "absmax_ptr": "u8" if nested else "fp32", "code_ptr": "fp32",
        "absmax2_ptr": "fp32", "code2_ptr": "fp32", "offset_ptr": "fp32", "out_ptr": dtype,
    }  # fmt: skip
    constexprs = dict(NESTED=nested, QDTYPE=QDTYPES[dtype])
    floats: set[str] = set()
    if name == "_qlora_linear_kernel":
        pointers.update(a_ptr=dtype, t_ptr="fp32", u_ptr="fp32", bias_ptr=dtype, seed_ptr="i64")
        constexprs.update(
            HAS_BIAS=True, HAS_DROPOUT=dropout, LORA_FP32=dtype == "fp16", INPUT_PRECISION="tf32",
            BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16,
        )  # fmt: skip
        floats = {"lora_scale", "dropout_scale"}
    else:
        constexprs["BLOCK"] = 1024
    source = ASTSource(
        fn=kernel, signature=_signature(kernel, constexprs, pointers, floats), constexprs=constexprs
    )
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--quick", action="store_true", help="fp16/bf16 and dropout only")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    print(f"triton {triton.__version__}")
    dtypes = ("fp16", "bf16") if args.quick else tuple(QDTYPES)
    dropouts = (True,) if args.quick else (False, True)
    failures = 0
    for arch in args.arch:
        for dtype in dtypes:
            for nested in (False, True):
                jobs = [("_qlora_linear_kernel", d) for d in dropouts] + [("_dequant_4bit_kernel", False)]
                for name, dropout in jobs:
                    what = f"sm_{arch} {name} {dtype} nested={nested} dropout={dropout}"
                    try:
                        compile_variant(name, dtype, nested, dropout, arch)
                        print(f"ok {what}", flush=True)
                    except Exception as err:  # report every failure, not just the first
                        failures += 1
                        print(f"FAILED {what}: {type(err).__name__}: {err}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
