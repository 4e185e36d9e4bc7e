"""Shared test helpers: backends on their devices, random LoRA problems and their float64 references.

The tolerance of each dtype and the comparison are :mod:`lora_kernels.testing`'s (``TOLERANCE``,
``assert_close``), the ones ``python -m lora_kernels check`` and the benchmarks use; re-exported here.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from lora_kernels.reference import lora_linear_reference
from lora_kernels.testing import TOLERANCE, assert_close  # noqa: F401  (re-exported for the tests)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


# ------------------------------------------------------------------------------- backends and their devices


class Backend(NamedTuple):
    """A backend and the device whose tensors it runs on in these tests (see :func:`backend_on_device`)."""

    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """True when this is Triton on CPU tensors, i.e. its kernels run through Triton's interpreter."""
        return self.name == "triton" and self.device != "cuda"


def backend_on_device(name: str) -> Backend:
    """``name`` with the device it runs on here, from :func:`lora_kernels.available_backends`; else skip.

    CUDA first: on a GPU machine ``triton``, ``cuda`` and ``torch`` all get CUDA tensors (``torch`` too, as
    that is where ``auto`` sends CUDA inputs the kernels do not take, and so that backends can be compared
    on the same tensors). Without a GPU: ``triton`` on CPU tensors under the interpreter
    (``TRITON_INTERPRET=1``, set by conftest.py), ``torch`` on the CPU; ``cuda`` cannot run and is skipped.
    """
    from lora_kernels import available_backends, dispatch

    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        if name in available_backends(device):
            return Backend(name, device)
    reason = getattr(dispatch, "_unavailable_reason", lambda name, device: "not in available_backends()")
    why = "; ".join(f"on {d}: {reason(name, torch.device(d))}" for d in devices)
    pytest.skip(f"backend {name!r} cannot run here ({why})")


#: Why bf16 is not run through the interpreter (see :func:`skip_unless_dtype_runs`).
INTERPRETER_BF16 = (
    "Triton's interpreter gets bf16 tl.dot wrong (numpy has no bfloat16; errors of 1e10 with triton 3.8): "
    "bf16 through the Triton kernels is checked on CUDA only"
)


def skip_unless_dtype_runs(backend: Backend, dtype: torch.dtype) -> None:
    """Skip a ``dtype`` case that ``backend`` cannot be checked with on its device."""
    if dtype == torch.bfloat16 and backend.interpreted:
        pytest.skip(INTERPRETER_BF16)


@dataclass
class LoRAProblem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def leaves(self) -> list[torch.Tensor]:
        """The tensors that take gradients, in (x, weight, bias, lora_A, lora_B) order."""
        return [t for t in (self.x, self.weight, self.bias, self.lora_A, self.lora_B) if t is not None]


def make_problem(
    lead: tuple[int, ...],
    in_features: int,
    out_features: int,
    r: int,
    dtype: torch.dtype = torch.float32,
    adapter_dtype: torch.dtype | None = None,
    device: str = "cpu",
    bias: bool = True,
    weight_requires_grad: bool = False,
    scaling: float = 2.0,
) -> LoRAProblem:
    """A LoRA problem whose output is of order one; adapters non-zero so every gradient is exercised."""

    def rand(*shape, std=1.0, dt=dtype, grad=True):
        return (torch.randn(*shape, dtype=torch.float64) * std).to(device, dt).requires_grad_(grad)

    adapter_dtype = adapter_dtype or dtype
    return LoRAProblem(
        x=rand(*lead, in_features),
        weight=rand(out_features, in_features, std=1 / math.sqrt(in_features), grad=weight_requires_grad),
        bias=rand(out_features) if bias else None,
        lora_A=rand(r, in_features, std=1 / math.sqrt(in_features), dt=adapter_dtype),
        lora_B=rand(out_features, r, std=1 / math.sqrt(r), dt=adapter_dtype),
        scaling=scaling,
    )


def reference_outputs(problem: LoRAProblem, grad_y: torch.Tensor, mask: torch.Tensor | None = None):
    """Float64 reference output and gradients, as ``(y, {"x": dx, "weight": dW, "bias": db, ...})``."""
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    tensors = [getattr(problem, n) for n in names]
    t64 = {
        n: t.detach().double().requires_grad_() for n, t in zip(names, tensors, strict=True) if t is not None
    }
    y = lora_linear_reference(
        t64["x"],
        t64["weight"],
        t64.get("bias"),
        t64["lora_A"],
        t64["lora_B"],
        problem.scaling,
        mask,
        upcast=True,
    )
    grads = torch.autograd.grad(y, list(t64.values()), grad_y.double())
    return y.detach(), dict(zip(t64.keys(), grads, strict=True))


def run_op(problem: LoRAProblem, grad_y: torch.Tensor, **kwargs):
    """Output and gradients of every leaf that requires grad, through ``lora_kernels.lora_linear``."""
    from lora_kernels import lora_linear

    p = problem
    y = lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, **kwargs)
    names = [n for n in ("x", "weight", "bias", "lora_A", "lora_B") if getattr(p, n) is not None]
    leaves = {n: getattr(p, n) for n in names if getattr(p, n).requires_grad}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y) if leaves and y.requires_grad else ()
    return y.detach(), dict(zip(leaves.keys(), grads, strict=True))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class _BenchmarksFinder(importlib.abc.MetaPathFinder):
    """Finds ``benchmarks/<name>.py`` for a top-level name, as the folder's scripts import each other; never
    its tests (``test_*``, ``conftest``)."""

    def find_spec(self, fullname, path, target=None):
        file = BENCHMARKS / f"{fullname}.py"
        if "." in fullname or fullname.startswith(("test_", "conftest")) or not file.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def benchmarks_module(name: str):
    """``benchmarks/<name>.py`` (``report``, ``harness``, ``gpu_summary``, ...), imported as its scripts import
    each other, with the siblings it imports.

    Not by putting ``benchmarks/`` on ``sys.path``: its ``test_lora_linear.py`` would shadow
    ``tests/test_lora_linear.py``; a finder of the folder's modules is on ``sys.meta_path`` while it imports.
    """
    finder = _BenchmarksFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)


# ---------------------------------------------------------------------------------- spawned CPU ranks


#: A spawned group still running after this is hung (a collective one rank never reached, a build lock left
#: behind): it is killed and the test fails, instead of holding the run until CI's own limit.
RANKS_TIMEOUT_S = 900


def run_ranks(target, world: int, *args):
    """Run ``target(rank, world, *args)`` on ``world`` spawned CPU processes in one gloo group; returns
    rank 0's result (through a file). ``target`` must be a module-level function (spawn pickles it by name).
    A rank's exception fails the call; so does a group still running after :data:`RANKS_TIMEOUT_S`.
    """
    import os
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        group = mp.spawn(_rank_main, args=(world, out_dir, target, args), nprocs=world, join=False)
        deadline = time.monotonic() + RANKS_TIMEOUT_S
        while not group.join(timeout=5):  # raises when a rank failed
            if time.monotonic() > deadline:
                for process in group.processes:
                    process.kill()
                raise TimeoutError(
                    f"{world} ranks of {target.__name__} still running after {RANKS_TIMEOUT_S} s: a hang"
                )
        return torch.load(os.path.join(out_dir, "result.pt"), weights_only=False)


def _rank_main(rank: int, world: int, out_dir: str, target, args: tuple) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A rendezvous file, not a TCP port: no race for a free port between choosing it and binding it.
    init_method = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        result = target(rank, world, *args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        del result
        # every rank leaves its collectives before any tears gloo down (see tests/test_distributed.py)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: gloo's threads could still abort a rank in C++ static
    # destructors after everything above succeeded. Failures above still raise, and reach mp.spawn.
    os._exit(0)
