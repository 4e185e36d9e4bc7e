"""Build script: the pure-Python package, plus the optional C++/CUDA extension ``lora_kernels._C``.

Package metadata lives in pyproject.toml; this file only adds the extension. Install into an environment
that already has torch, without build isolation::

    pip install --no-build-isolation -e .

What gets built:

* ``CUDAExtension`` (csrc/*.cpp + csrc/*.cu) when torch is a CUDA build and a CUDA toolkit is found;
* else (or with ``LORA_KERNELS_CPU_ONLY=1``) ``CppExtension`` (csrc/*.cpp: the CPU implementation);
* nothing when ``LORA_KERNELS_SKIP_EXT=1``, or when the build fails: the failure is printed and the
  pure-Python package still installs (every backend falls back to Triton or the torch composite).

Environment: ``CUDA_HOME`` (else found from torch, ``nvcc`` on PATH, wrapper scripts, ``/usr/local/cuda*``),
``TORCH_CUDA_ARCH_LIST`` (default ``8.0;8.6;8.9;9.0``), ``MAX_JOBS`` (parallel compile jobs, read by
torch's ninja build), ``LORA_KERNELS_SKIP_EXT``, ``LORA_KERNELS_CPU_ONLY``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "lora_kernels._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"
# Headers that torch's CUDA headers include but a bare toolkit (nvcc + cudart) may lack; pip's
# nvidia-* wheels ship them.
LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _log(message: str) -> None:
    print(f"[lora_kernels setup] {message}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------------------
# Finding the CUDA toolkit
# ---------------------------------------------------------------------------------------------------------


def _is_toolkit(path: str | os.PathLike | None) -> bool:
    """A directory with a real ``bin/nvcc`` and the CUDA runtime headers."""
    if not path:
        return False
    home = Path(path)
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _homes_from_nvcc(nvcc: str) -> list[str]:
    """Toolkit candidates behind an ``nvcc`` found on PATH, which may be a symlink or a wrapper script."""
    candidates = [str(Path(nvcc).parent.parent), str(Path(nvcc).resolve().parent.parent)]
    try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(nvcc, "rb") as handle:
            head = handle.read(65536)
        if head.startswith(b"#!"):
            for match in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
                candidates.append(match.group(1).decode(errors="replace"))
    except OSError:
        pass
    try:  # nvcc reports its own directory in a dry run: "#$ _HERE_=/usr/local/cuda-13.0/bin"
        result = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for line in (result.stdout + result.stderr).splitlines():
            match = re.match(r"#\$ _HERE_=(.+)$", line.strip())
            if match:
                candidates.append(str(Path(match.group(1)).parent))
    except (OSError, subprocess.SubprocessError):
        pass
    return candidates


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_cuda_home() -> str | None:
    """The CUDA toolkit to compile with, or None.

    Order: $CUDA_HOME / $CUDA_PATH; the directory torch would guess (the parent of ``nvcc`` on PATH);
    the toolkit a symlinked or wrapper ``nvcc`` points at; /usr/local/cuda, then /usr/local/cuda-* (newest).
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.extend(_homes_from_nvcc(nvcc))
    candidates.append("/usr/local/cuda")
    candidates.extend(
        str(p) for p in sorted(Path("/usr/local").glob("cuda-*"), key=_version_key, reverse=True)
    )
    for candidate in candidates:
        if _is_toolkit(candidate):
            return str(Path(candidate).resolve())
    if candidates:
        _log(f"no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) among {candidates}")
    return None


def _site_dirs() -> list[Path]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    seen: list[Path] = []
    for entry in dirs:
        if entry and Path(entry).is_dir() and Path(entry) not in seen:
            seen.append(Path(entry))
    return seen


def library_include_dirs(cuda_home: str, cuda_version: str) -> list[str]:
    """pip ``nvidia`` header dirs supplying what the toolkit lacks (cuBLAS, cuSPARSE, cuSOLVER)."""
    missing = [h for h in LIBRARY_HEADERS if not (Path(cuda_home) / "include" / h).is_file()]
    if not missing:
        return []
    major = cuda_version.split(".")[0]
    layouts = [f"nvidia/cu{major}/include", "nvidia/cu13/include", "nvidia/cu12/include"]
    layouts += [f"nvidia/{lib}/include" for lib in ("cublas", "cusparse", "cusolver")]  # cu12-era wheels
    found: list[str] = []
    for site in _site_dirs():
        for layout in layouts:
            include = site / layout
            provides = [h for h in missing if (include / h).is_file()]
            if provides and str(include) not in found:
                found.append(str(include))
                missing = [h for h in missing if h not in provides]
        if not missing:
            break
    if missing:
        _log(f"warning: no headers found for {missing}; the CUDA build will likely fail")
    return found


# ---------------------------------------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------------------------------------


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def build_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension is skipped or cannot be configured."""
    if _env_flag("LORA_KERNELS_SKIP_EXT"):
        _log("LORA_KERNELS_SKIP_EXT is set: installing the pure-Python package only")
        return [], {}
    try:
        import torch
    except ImportError as err:
        _log(f"torch is not importable ({err}): installing the pure-Python package only")
        return [], {}

    cpu_only = _env_flag("LORA_KERNELS_CPU_ONLY")
    cuda_home = find_cuda_home() if torch.version.cuda and not cpu_only else None
    if cuda_home:
        # torch.utils.cpp_extension fixes CUDA_HOME when first imported; its own guess (the parent of nvcc
        # on PATH) is wrong for a wrapper script, so hand it the toolkit before that import.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    cxx_flags = ["-O3"]
    if cuda_home:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources=_sources("*.cpp") + _sources("*.cu"),
            define_macros=[("LORA_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
        # Appended after torch's own include dirs, so the toolkit's headers win where both have one.
        ext.include_dirs.extend(library_include_dirs(cuda_home, torch.version.cuda))
        _log(
            f"building the CUDA extension: CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ.get('MAX_JOBS')}"
        )
    else:
        if cpu_only:
            why = "LORA_KERNELS_CPU_ONLY is set"
        elif not torch.version.cuda:
            why = "torch is a CPU-only build"
        else:
            why = "no CUDA toolkit was found"
        ext = cpp_extension.CppExtension(
            EXT_NAME, sources=_sources("*.cpp"), extra_compile_args={"cxx": cxx_flags}
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
