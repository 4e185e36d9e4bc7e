"""Test set-up: without a GPU, the Triton kernels run on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before triton is imported, so this happens before any package import.
An explicit ``TRITON_INTERPRET=0`` wins (``setdefault``): it simulates a GPU machine's setting, where the
Triton backend cannot take CPU tensors and the tests that need it skip.

Fixtures: ``backend`` (every backend with the device it runs on, see :func:`helpers.backend_on_device`;
narrow it with ``@pytest.mark.parametrize("backend", ["triton"], indirect=True)``) and ``device`` (the
device of backend-independent tests).
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after TRITON_INTERPRET is set
from lora_kernels.dispatch import BACKENDS


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A :class:`helpers.Backend` ``(name, device)``: tensors go to ``backend.device``, skipped where the
    backend cannot run here (the reason says why)."""
    from helpers import backend_on_device

    return backend_on_device(request.param)


# Count every launch of the Triton kernels in the session, so the log shows which kernels really ran
# (and whether through the interpreter), not only which tests passed.
_KERNEL_LAUNCHES: dict[str, int] = {}


@pytest.fixture(autouse=True, scope="session")
def _count_triton_launches():
    try:
        from lora_kernels.ops import triton_support
    except ImportError:  # no triton: nothing to count
        yield
        return
    launch = triton_support._launch

    def counting_launch(kernel, grid_of, configs, args, constexprs):
        name = getattr(kernel, "__name__", "")
        if name.endswith("_kernel"):
            _KERNEL_LAUNCHES[name] = _KERNEL_LAUNCHES.get(name, 0) + 1
        return launch(kernel, grid_of, configs, args, constexprs)

    triton_support._launch = counting_launch
    yield
    triton_support._launch = launch


def pytest_terminal_summary(terminalreporter):
    if _KERNEL_LAUNCHES:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        where = "through the interpreter (TRITON_INTERPRET=1)" if interpreted else "on the GPU"
        counts = ", ".join(f"{name} ×{count}" for name, count in sorted(_KERNEL_LAUNCHES.items()))
        terminalreporter.write_line(f"Triton kernels launched {where}: {counts}")


# ------------------------------------------------------------------ the PEFT test files' models and counters


def _counted(monkeypatch, name: str) -> list:
    """The calls of ``lora_kernels.peft.<name>`` from now on (one entry a call: its positional arguments)."""
    import lora_kernels.peft as lk_peft

    calls = []
    op = getattr(lk_peft, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return op(*args, **kwargs)

    monkeypatch.setattr(lk_peft, name, counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by ``lora_kernels.peft``'s fused forward."""
    return _counted(monkeypatch, "lora_linear")


@pytest.fixture
def dora_calls(monkeypatch):
    """Counts the calls of the fused DoRA op made by ``lora_kernels.peft``'s fused forward."""
    return _counted(monkeypatch, "dora_linear")


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts the grouped op's calls made by ``lora_kernels.peft`` (several adapters, a mixed batch, or a
    base layer called as a module)."""
    return _counted(monkeypatch, "multi_lora_linear")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """``lora_kernels.peft`` warns once per reason and process: start from none warned."""
    import lora_kernels.peft as lk_peft

    monkeypatch.setattr(lk_peft, "_warned", set())


@pytest.fixture(scope="module")
def base_model():
    """The PEFT tests' tiny Llama (2 layers, width 64, vocabulary 128; seeded), one per test module."""
    import torch

    from lora_kernels.testing import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128)


@pytest.fixture
def ids():
    """Token ids for :func:`base_model`: 2 sequences of 12."""
    import torch

    return torch.randint(0, 128, (2, 12))
