"""Build the extension ``lora_kernels._C`` on the GPU machine, where nothing can be installed.

``pip install -e .`` needs a recent setuptools that the device machine may lack, so this uses torch's own
ninja builder (``torch.utils.cpp_extension.load``) on the same sources and macros as ``setup.py``, for
this GPU's architecture only (``TORCH_CUDA_ARCH_LIST``, default ``9.0``), and moves the result to
``lora_kernels/_C.so`` in one rename, so a process importing the package never sees half a file.

    python benchmarks/gpu_build_ext.py --build-dir DIR
    python benchmarks/gpu_build_ext.py --dry      # list what would be built (the CPU check of gpu_run.sh)
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACROS = ["-DLORA_KERNELS_WITH_CUDA=1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "ext-jit")
    parser.add_argument("--dry", action="store_true")
    args = parser.parse_args()
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cpp")) + sorted(
        str(p) for p in (ROOT / "csrc").glob("*.cu")
    )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", "8")
    print(
        f"sources: {[Path(s).name for s in sources]}; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    if not sources or not any(s.endswith(".cu") for s in sources):
        raise SystemExit("no CUDA sources under csrc/")
    if args.dry:
        return 0
    from torch.utils.cpp_extension import load

    args.build_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load(
        name="_C",
        sources=sources,
        extra_cflags=["-O3", *MACROS],
        extra_cuda_cflags=["-O3", "-lineinfo", *MACROS],
        build_directory=str(args.build_dir),
        is_python_module=False,
        verbose=True,
    )
    built = args.build_dir / "_C.so"
    staging = ROOT / "lora_kernels" / ".C.so.partial"
    shutil.copy2(built, staging)
    staging.rename(ROOT / "lora_kernels" / "_C.so")
    print(f"built {built} in {time.perf_counter() - started:.0f} s -> lora_kernels/_C.so")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
