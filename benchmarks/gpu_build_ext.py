"""Build the extension ``lora_kernels._C`` on the GPU machine, where nothing can be installed.

``pip install -e .`` needs a recent setuptools that the device machine may lack, so this uses torch's own
ninja builder (``torch.utils.cpp_extension.load``) on the same sources and macros as ``setup.py``, for
this GPU's architecture only (``TORCH_CUDA_ARCH_LIST``, default ``9.0``), and moves the result to
``lora_kernels/_C.so`` in one rename, so a process importing the package never sees half a file.

    python benchmarks/gpu_build_ext.py [--build-dir DIR]   # default build/gpu_ext (ignored by git)
    python benchmarks/gpu_build_ext.py --reuse             # install DIR/_C.so if it was built from these sources
    python benchmarks/gpu_build_ext.py --dry               # list what would be built (the CPU check of gpu_run.sh)

``--reuse`` is how the GPU visit's second call finds the first call's build: the build folder stays on the
warm machine between calls (it is ignored by git, so the next call's copy of the tree leaves it alone), and
``DIR/fingerprint.txt`` holds a hash of the sources, the macros, the architectures and torch's version; where
it matches, the built file is installed again (a second), else it is built (about 40 s on the H200).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACROS = ["-DLORA_KERNELS_WITH_CUDA=1"]


def _fingerprint(sources: list[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for source in sources:
        digest.update(Path(source).name.encode() + b"\0" + Path(source).read_bytes())
    for header in sorted((ROOT / "csrc").glob("*.h")) + sorted((ROOT / "csrc").glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    digest.update(" ".join([*MACROS, os.environ["TORCH_CUDA_ARCH_LIST"], torch.__version__]).encode())
    return digest.hexdigest()


def _install(built: Path) -> None:
    """``built`` to ``lora_kernels/_C.so`` in one rename."""
    staging = ROOT / "lora_kernels" / ".C.so.partial"
    shutil.copy2(built, staging)
    staging.rename(ROOT / "lora_kernels" / "_C.so")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "gpu_ext")
    parser.add_argument("--reuse", action="store_true", help="install the build in --build-dir if current")
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
    fingerprint = _fingerprint(sources)
    built, stamp = args.build_dir / "_C.so", args.build_dir / "fingerprint.txt"
    if args.reuse and built.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint:
        if not args.dry:
            _install(built)
        print(f"reused {built} (built from these sources) -> lora_kernels/_C.so")
        return 0
    if args.dry:
        print(f"would build into {args.build_dir} (fingerprint {fingerprint[:12]})")
        return 0
    from torch.utils.cpp_extension import load

    args.build_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
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
    _install(built)
    stamp.write_text(fingerprint + "\n")
    print(f"built {built} in {time.perf_counter() - started:.0f} s -> lora_kernels/_C.so")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
