"""Backend choice: auto order, explicit requests, clear errors."""

import pytest
import torch
from helpers import HAS_TRITON, make_problem

import lora_kernels
from lora_kernels import available_backends, use_backend
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
