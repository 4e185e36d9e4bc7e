"""Build script: the pure-Python package, plus the optional C++/CUDA extension ``lora_kernels._C``.

Package metadata lives in pyproject.toml; this file only adds the extension. Install into an environment
that already has torch, without build isolation::

    pip install --no-build-isolation -e .

What gets built, as flash-attn and torchao do it, from torch's own build helpers:

* ``CUDAExtension`` (csrc/*.cpp + csrc/*.cu) when torch is a CUDA build and torch finds a CUDA toolkit
  (``CUDA_HOME``, else ``nvcc`` on PATH);
* else, or with ``LORA_KERNELS_CPU_ONLY=1``, ``CppExtension`` (csrc/*.cpp: the CPU implementation);
* nothing with ``LORA_KERNELS_SKIP_EXT=1``, or when the build fails: the failure is printed and the
  pure-Python package still installs (the backends fall back to Triton or the torch composite).

Environment: ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;8.6;8.9;9.0``), ``MAX_JOBS``,
``LORA_KERNELS_SKIP_EXT``, ``LORA_KERNELS_CPU_ONLY``. Headers the toolkit lacks (a bare toolkit without
cuBLAS, say) come in through the compilers' own ``CPATH``; ``scripts/setup_env.sh`` sets both for the
machines it knows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "lora_kernels._C"


def _log(message: str) -> None:
    print(f"[lora_kernels setup] {message}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob(pattern))


def build_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension is skipped or cannot be configured."""
    if _env_flag("LORA_KERNELS_SKIP_EXT"):
        _log("LORA_KERNELS_SKIP_EXT is set: installing the pure-Python package only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        _log(f"torch is not importable ({err}): installing the pure-Python package only")
        return [], {}

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = bool(torch.version.cuda) and not _env_flag("LORA_KERNELS_CPU_ONLY")
    with_cuda = with_cuda and cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").is_file()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources=_sources("*.cpp") + _sources("*.cu"),
            define_macros=[("LORA_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
        _log(
            f"building the CUDA extension: CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ.get('MAX_JOBS')}"
        )
    else:
        why = "LORA_KERNELS_CPU_ONLY is set" if _env_flag("LORA_KERNELS_CPU_ONLY") else (
            "torch is a CPU-only build" if not torch.version.cuda else f"no CUDA toolkit (CUDA_HOME={cuda_home})"
        )  # fmt: skip
        ext = cpp_extension.CppExtension(
            EXT_NAME, sources=_sources("*.cpp"), extra_compile_args={"cxx": ["-O3"]}
        )
        _log(f"building the CPU-only extension ({why})")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, except that a failed build leaves a working pure-Python install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # any compiler or linker failure
                _log(f"building {EXT_NAME} failed: {err!r}")
                _log("installing the pure-Python package without it (set LORA_KERNELS_SKIP_EXT=1 to skip)")
                self.extensions = []
                self.distribution.ext_modules = []

    return [ext], {"build_ext": OptionalBuildExt}


try:
    ext_modules, cmdclass = build_extensions()
except Exception as err:  # a broken torch / toolkit install must not break the pure-Python install
    _log(f"configuring {EXT_NAME} failed: {err!r}; installing the pure-Python package only")
    ext_modules, cmdclass = [], {}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
