"""Property tests: random shapes, ranks, dtypes, strides, bias and dropout against the float64 reference."""

import pytest
import torch
from helpers import HAS_TRITON, assert_close, make_problem, reference_outputs, run_op
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kernels import dropout_mask, use_backend

PROPERTY_SETTINGS = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def lora_cases(draw, max_dim):
    return dict(
        # one or two leading dims, at most max_dim rows in all
        lead=draw(
            st.one_of(
                st.tuples(st.integers(1, max_dim)), st.tuples(st.integers(1, 3), st.integers(1, max_dim // 3))
            )
        ),
        in_features=draw(st.integers(1, max_dim)),
        out_features=draw(st.integers(1, max_dim)),
        r=draw(st.integers(1, min(64, max_dim))),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        bias=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2])),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def check_case(case, backend):
    problem = make_problem(
        case["lead"], case["in_features"], case["out_features"], case["r"], case["dtype"], bias=case["bias"]
    )
    if case["transposed"]:  # same values, features strided instead of contiguous
        problem.x = problem.x.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()
    p, seed = case["dropout_p"], case["seed"]
    grad_y = torch.randn(*case["lead"], case["out_features"]).to(case["dtype"])
    with use_backend(backend):
        y, grads = run_op(problem, grad_y, dropout_p=p, training=p > 0, dropout_seed=seed)
    mask = dropout_mask(seed, 0, problem.x.shape, p) if p > 0 else None
    y_ref, grads_ref = reference_outputs(problem, grad_y, mask)
    # Tolerance grows with the reduction length (sqrt of it, rounding errors of a sum of random terms).
    depth = max(case["in_features"], case["out_features"], problem.x.numel() // case["in_features"])
    slack = max(1.0, (depth / 64) ** 0.5) * (2.0 if case["dtype"] == torch.float16 else 1.0)
    assert_close(y, y_ref, case["dtype"], "y", slack)
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], case["dtype"], f"d{name}", 2 * slack)


@PROPERTY_SETTINGS
@given(case=lora_cases(max_dim=300))
def test_torch_path_matches_reference(case):
    check_case(case, "torch")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@PROPERTY_SETTINGS
@given(case=lora_cases(max_dim=150))
def test_triton_path_matches_reference(case):
    check_case(case, "triton")
