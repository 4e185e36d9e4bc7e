"""Backend choice: auto order, explicit requests, clear errors; bf16 kept off Triton's interpreter."""

import pytest
import torch
from helpers import HAS_TRITON, assert_close, make_problem, reference_outputs, run_op

import lora_kernels
from lora_kernels import available_backends, lora_linear, use_backend
from lora_kernels.dispatch import ENV_VAR, select_backend


def test_torch_is_always_available():
    assert "torch" in available_backends("cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_makes_triton_available_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends("cpu")[0] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends("cpu")
    assert select_backend(torch.device("cpu"), torch.float32) == "torch"


def test_context_manager_overrides_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    with use_backend("torch"):
        assert select_backend(torch.device("cpu"), torch.float32) == "torch"


def test_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_backend(torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        select_backend(torch.device("cpu"), torch.float32)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"), use_backend("cutlass"):
        pass


def test_requesting_a_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    problem = make_problem((3,), 4, 5, 2)
    args = (problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, 1.0)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was requested"):
        lora_kernels.lora_linear(*args)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lora_kernels.lora_linear(*args)


def test_float64_falls_back_to_torch_under_auto():
    assert select_backend(torch.device("cpu"), torch.float64) == "torch"
    with use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        select_backend(torch.device("cpu"), torch.float64)


def test_ranks_above_256_fall_back_to_torch_under_auto(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu"), torch.float32, 257) == "torch"
    with use_backend("triton"), pytest.raises(RuntimeError, match="ranks up to 256, not 257"):
        select_backend(torch.device("cpu"), torch.float32, 257)
    problem = make_problem((5,), 6, 4, 300)
    y = lora_kernels.lora_linear(problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, 0.5)
    expected = lora_kernels.lora_linear_reference(
        problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, 0.5
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_an_override_is_reusable_reentrant_and_restored_on_errors(monkeypatch):
    """use_backend's context manager (dispatch.override) may be entered again while active, and every exit,
    an exception's included, restores what was asked before."""
    from lora_kernels.dispatch import requested_backend

    monkeypatch.delenv(ENV_VAR, raising=False)
    torch_backend = use_backend(" Torch ")
    with torch_backend:
        with use_backend("triton"):
            with torch_backend:
                assert requested_backend() == "torch"
            assert requested_backend() == "triton"
        assert requested_backend() == "torch"
    assert requested_backend() == "auto"
    with pytest.raises(KeyError), torch_backend:
        raise KeyError("inside")
    assert requested_backend() == "auto"


# ----------------------------------------------------------------------- bf16 under the interpreter


def test_auto_keeps_bf16_off_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert select_backend(cpu, torch.float32, 8) == "triton"
    assert select_backend(cpu, torch.float16, 8) == "triton"
    assert select_backend(cpu, torch.bfloat16, 8) == "torch"
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"interpreter.*bf16"):
        select_backend(cpu, torch.bfloat16, 8)
    # and through the op: the result is right (the interpreter's bf16 dot was off by 1e10)
    problem = make_problem((9,), 32, 24, 4, torch.bfloat16)
    y, _ = run_op(problem, torch.zeros(9, 24, dtype=torch.bfloat16))
    y_ref, _ = reference_outputs(problem, torch.zeros(9, 24))
    assert_close(y, y_ref, torch.bfloat16, "y")
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"interpreter.*bf16"):
        lora_linear(problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling)


def test_bf16_stays_on_triton_on_a_gpu(monkeypatch):
    """The rule is the interpreter's: a (simulated) Hopper without TRITON_INTERPRET keeps bf16 on Triton."""
    pytest.importorskip("triton")
    from lora_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dispatch._unavailable_reason("triton", torch.device("cuda", 0), torch.bfloat16, 16) is None
