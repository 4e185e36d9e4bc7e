"""Property tests: random shapes, ranks, dtypes, strides, bias and dropout against the float64 reference.

Every backend (the ``backend`` fixture of conftest.py: each on the device it runs on) draws its own cases;
through Triton's interpreter the shapes are kept smaller, and bf16 is drawn only where the backend runs it.
"""

import torch
from helpers import assert_close, make_problem, reference_outputs, run_op
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kernels import dropout_mask, use_backend

PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    # the backend fixture is a constant (name, device): sharing it between examples is what is meant
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def lora_cases(draw, max_dim, dtypes):
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
        dtype=draw(st.sampled_from(dtypes)),
        bias=draw(st.sampled_from([None, "contiguous", "strided"])),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2])),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def check_case(case, backend):
    device = backend.device
    problem = make_problem(
        case["lead"],
        case["in_features"],
        case["out_features"],
        case["r"],
        case["dtype"],
        device=device,
        bias=case["bias"] is not None,
    )
    if case["transposed"]:  # same values, features strided instead of contiguous
        problem.x = problem.x.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()
    if case["bias"] == "strided":  # same values, every other element of a buffer twice as long
        buffer = torch.zeros(2 * case["out_features"], dtype=case["dtype"], device=device)
        buffer[::2] = problem.bias.detach()
        problem.bias = buffer[::2].requires_grad_()
    p, seed = case["dropout_p"], case["seed"]
    grad_y = torch.randn(*case["lead"], case["out_features"], device=device).to(case["dtype"])
    with use_backend(backend.name):
        y, grads = run_op(problem, grad_y, dropout_p=p, training=p > 0, dropout_seed=seed)
    mask = dropout_mask(seed, problem.x.shape, p, device=device) if p > 0 else None
    y_ref, grads_ref = reference_outputs(problem, grad_y, mask)
    # Tolerance grows with the reduction length (sqrt of it, rounding errors of a sum of random terms).
    depth = max(case["in_features"], case["out_features"], problem.x.numel() // case["in_features"])
    slack = max(1.0, (depth / 64) ** 0.5) * (1.0 if case["dtype"] == torch.float32 else 2.0)
    assert_close(y, y_ref, case["dtype"], "y", slack)
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], case["dtype"], f"d{name}", 2 * slack)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_matches_reference(backend, data):
    # bf16 only where it runs correctly: not through the interpreter (helpers.INTERPRETER_BF16)
    dtypes = [torch.float32, torch.float16] + ([] if backend.interpreted else [torch.bfloat16])
    # The interpreter's cost grows with programs × loop trips: smaller problems there.
    case = data.draw(lora_cases(max_dim=150 if backend.interpreted else 300, dtypes=dtypes), label="case")
    check_case(case, backend)
