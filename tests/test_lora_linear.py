"""Parity of the fused LoRA linear (every backend, on the device it runs on) against the float64 reference.

The ``backend`` fixture (conftest.py) gives each backend its device: on a GPU machine ``triton``, ``cuda``
and ``torch`` all get CUDA tensors; on a CPU machine ``triton`` runs through Triton's interpreter and
``cuda`` is skipped. The ``path`` fixture runs every test on each path its backend offers
(:mod:`lora_kernels.ops.routing`: the Triton backend's ``split`` and ``fused``; the others are ``split``).
"""

import pytest
import torch
from helpers import (
    HAS_TRITON,
    assert_close,
    make_problem,
    reference_outputs,
    requires_cuda,
    run_op,
    skip_unless_dtype_runs,
)

import lora_kernels
from lora_kernels import dropout_mask, use_backend
from lora_kernels.ops.routing import offered_paths, use_path

TRITON_ONLY = pytest.mark.parametrize("backend", ["triton"], indirect=True)
#: A test of the fused GEMM's own kernels and launches: run on the ``fused`` path only.
FUSED_ONLY = pytest.mark.fused_path


@pytest.fixture(autouse=True, params=["split", "fused"])
def path(request):
    """Run the test on path ``split`` or ``fused`` of its backend (skipped where the backend has no such
    path); tests without a backend run once, on ``auto``."""
    name = request.param
    if "backend" not in request.fixturenames:
        if name != "split":
            pytest.skip("no backend: runs once")
        yield "auto"
        return
    backend = request.getfixturevalue("backend")
    if request.node.get_closest_marker("fused_path") and name != "fused":
        pytest.skip("a test of the fused path's kernels")
    if name not in offered_paths(backend.name, backend.device):
        pytest.skip(f"the {backend.name} backend has no {name!r} path")
    with use_path(name):
        yield name


def check_parity(problem, backend: str, dtype, *, dropout_p=0.0, seed=1234, slack=1.0, grad_slack=2.0):
    """Output and every gradient of backend ``backend`` (a name) against the float64 reference, dropout
    included; the problem's tensors are already on the backend's device."""
    grad_y = torch.randn(*problem.x.shape[:-1], problem.weight.shape[0], device=problem.x.device).to(dtype)
    training = dropout_p > 0.0
    with use_backend(backend):
        y, grads = run_op(problem, grad_y, dropout_p=dropout_p, training=training, dropout_seed=seed)
    mask = dropout_mask(seed, problem.x.shape, dropout_p, device=problem.x.device) if training else None
    y_ref, grads_ref = reference_outputs(problem, grad_y, mask)
    assert y.dtype == problem.x.dtype
    assert_close(y, y_ref, dtype, "y", slack)
    for name, grad in grads.items():
        assert grad.dtype == getattr(problem, name).dtype, name
        assert_close(grad, grads_ref[name], dtype, f"d{name}", grad_slack)
    return grads


SHAPES = [
    # (leading dims of x, in_features, out_features, r): none of them a multiple of a block size
    ((37,), 70, 45, 5),
    ((3, 13), 33, 129, 7),
    ((1,), 17, 1, 1),
    ((5,), 1, 9, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
def test_parity(backend, dtype, shape):
    lead, k, n, r = shape
    check_parity(make_problem(lead, k, n, r, dtype, device=backend.device), backend.name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_exactly(backend, dtype):
    problem = make_problem((2, 21), 70, 45, 6, dtype, device=backend.device)
    check_parity(problem, backend.name, dtype, dropout_p=0.3)


@TRITON_ONLY
@FUSED_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [((3, 50), 70, 45, 5), ((130,), 150, 140, 20), ((9,), 33, 1, 2)])
def test_projection_fused_into_the_gemm(monkeypatch, backend, dtype, dropout_p, shape):
    """The in-mainloop variant of the skinny projection (forward without dropout, and dX) is exact too."""
    from lora_kernels.ops import triton_lora

    monkeypatch.setattr(triton_lora, "_fuse_projection", lambda M, N, K, r: True)
    lead, k, n, r = shape
    problem = make_problem(lead, k, n, r, dtype, device=backend.device)
    check_parity(problem, backend.name, dtype, dropout_p=dropout_p)


def test_large_rank_and_no_bias(backend):
    problem = make_problem((19,), 40, 36, 256, device=backend.device, bias=False)
    check_parity(problem, backend.name, torch.float32)


def test_fp32_adapters_on_fp16_base(backend):
    problem = make_problem(
        (23,), 48, 40, 8, torch.float16, adapter_dtype=torch.float32, device=backend.device
    )
    check_parity(problem, backend.name, torch.float16)


def test_weight_grad_when_weight_trains(backend):
    problem = make_problem((29,), 35, 27, 4, device=backend.device, weight_requires_grad=True)
    grads = check_parity(problem, backend.name, torch.float32)
    assert set(grads) == {"x", "weight", "bias", "lora_A", "lora_B"}


def test_non_contiguous_input(backend):
    problem = make_problem((6, 11), 40, 33, 4, device=backend.device)
    base = torch.randn(40, 11, 6, dtype=torch.float32, device=backend.device)
    problem.x = base.permute(2, 1, 0).requires_grad_()  # (6, 11, 40) with the features strided
    assert not problem.x.is_contiguous()
    check_parity(problem, backend.name, torch.float32)


def test_strided_rows(backend):
    """Every other row of a larger matrix: a 2-D view that the kernels read through its strides."""
    problem = make_problem((30,), 24, 20, 3, device=backend.device)
    problem.x = torch.randn(60, 24, device=backend.device)[::2].requires_grad_()
    check_parity(problem, backend.name, torch.float32)


def test_empty_batch(backend):
    device = backend.device
    problem = make_problem((0,), 16, 8, 2, device=device)
    problem.x = torch.zeros(2, 0, 16, device=device, requires_grad=True)
    with use_backend(backend.name):
        y, grads = run_op(problem, torch.zeros(2, 0, 8, device=device))
    assert y.shape == (2, 0, 8)
    assert grads["x"].shape == (2, 0, 16)
    assert torch.count_nonzero(grads["lora_A"]) == 0 and torch.count_nonzero(grads["lora_B"]) == 0
    assert torch.count_nonzero(grads["bias"]) == 0


def test_backends_agree(backend):
    """Same seed, same dropout mask, same numbers on every backend (against torch on the same tensors)."""
    problem = make_problem((17,), 40, 24, 4, device=backend.device)
    grad_y = torch.randn(17, 24, device=backend.device)
    with use_backend("torch"), use_path("auto"):
        expected = run_op(problem, grad_y, dropout_p=0.25, training=True, dropout_seed=99)
    with use_backend(backend.name):
        actual = run_op(problem, grad_y, dropout_p=0.25, training=True, dropout_seed=99)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_eval_mode_ignores_dropout(device):
    problem = make_problem((9,), 12, 10, 2, device=device)
    args = (problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, problem.scaling)
    plain = lora_kernels.lora_linear(*args)
    assert torch.equal(lora_kernels.lora_linear(*args, dropout_p=0.5, training=False), plain)
    assert not torch.equal(lora_kernels.lora_linear(*args, dropout_p=0.5, training=True), plain)


def test_gradcheck_torch_path_float64():
    problem = make_problem((4, 3), 6, 5, 2, torch.float64)
    with use_backend("torch"):
        for p in (0.0, 0.4):

            def fn(x, b, a, bb, p=p):
                return lora_kernels.lora_linear(
                    x, problem.weight, b, a, bb, problem.scaling, p, training=True, dropout_seed=7
                )

            assert torch.autograd.gradcheck(fn, (problem.x, problem.bias, problem.lora_A, problem.lora_B))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [((3, 333), 515, 771, 16), ((1000,), 4096, 1000, 64), ((7,), 256, 4096, 8)])
def test_parity_cuda(backend, dtype, shape):
    lead, k, n, r = shape
    problem = make_problem(lead, k, n, r, dtype, device=backend.device)
    check_parity(problem, backend.name, dtype, slack=2.0, grad_slack=4.0)
    check_parity(problem, backend.name, dtype, dropout_p=0.1, slack=2.0, grad_slack=4.0)


def test_bf16_base_with_fp32_adapters(backend):
    skip_unless_dtype_runs(backend, torch.bfloat16)
    problem = make_problem(
        (257,), 384, 320, 16, torch.bfloat16, adapter_dtype=torch.float32, device=backend.device
    )
    check_parity(problem, backend.name, torch.bfloat16, slack=2.0, grad_slack=4.0)


@TRITON_ONLY
@FUSED_ONLY
@pytest.mark.parametrize("r", [12, 40])
def test_triton_runs_every_kernel_over_several_tiles(monkeypatch, backend, r):
    """Forward and backward launch all three kernels, over several tiles, K-steps and row splits; r = 12
    takes the backward's single pass over dY (``s·dY·B`` beside dB, over two column blocks), r = 40 two."""
    from lora_kernels.ops import triton_lora, triton_reduce

    launches = {}
    for module, name in ((triton_lora, "_lora_linear_kernel"), (triton_reduce, "_lora_project_kernel"),
                         (triton_reduce, "_lora_reduce_rows_kernel")):  # fmt: skip
        kernel = getattr(module, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches[self.name] = launches.get(self.name, 0) + 1
                return self.kernel[grid]

        monkeypatch.setattr(module, name, Counting(kernel, name))
    monkeypatch.setattr(triton_reduce, "_row_splits", lambda M, num_blocks, block_m, device: 3)
    problem = make_problem((300,), 260, 200, r, device=backend.device)
    check_parity(problem, backend.name, torch.float32, dropout_p=0.2)
    # forward: project (t) + linear; backward: linear (dX) + reduce (dA) + reduce (dB, dbias and, r = 12,
    # s·dY·B) or, r = 40, project (s·dY·B)
    projects = 1 if r <= 16 else 2
    assert launches == {
        "_lora_project_kernel": projects,
        "_lora_linear_kernel": 2,
        "_lora_reduce_rows_kernel": 2,
    }
    print("Triton kernel launches:", launches, "interpreter:", triton_lora.interpreting())


@TRITON_ONLY
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_backward_reads_grad_y_once_besides_dx(monkeypatch, backend, dora):
    """``s·dY·B``, dB, db (and DoRA's ``Σ dY ⊙ z``) come from one launch that reads dY, the dX GEMM from the
    only other one (before: three), here over 2 column blocks × 3 row splits; the result is bitwise the
    same from run to run (partial sums added in a fixed order, no atomics) and matches the two passes'."""
    from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce, triton_support

    M, K, N, r = 300, 40, 200, 12
    x, w, b = (torch.randn(*shape, device=backend.device) for shape in ((M, K), (N, K), (N,)))
    A, B = torch.randn(r, K, device=backend.device) / 4, torch.randn(N, r, device=backend.device) / 4
    grad_y = torch.randn(M, N, device=backend.device)
    params, col_scale = LoRAParams(2.0), torch.rand(N, device=backend.device) + 0.5
    if dora:
        _, t, z = triton_lora.dora_forward(x, w, b, A, B, col_scale, params)
    else:
        _, t = triton_lora.lora_forward(x, w, b, A, B, params)
    monkeypatch.setattr(triton_reduce, "_row_splits", lambda M, num_blocks, block_m, device: 3)
    launch, reads = triton_support._launch, []

    def recording_launch(kernel, grid_of, configs, args, constexprs):
        if any(arg is grad_y for arg in args):
            reads.append(kernel.__name__)
        return launch(kernel, grid_of, configs, args, constexprs)

    monkeypatch.setattr(triton_support, "_launch", recording_launch)

    def backward():
        reads.clear()
        if dora:
            return triton_lora.dora_backward(grad_y, x, w, A, B, t, z, col_scale, params, (True,) * 6), reads[
                :
            ]
        return triton_lora.lora_backward(grad_y, x, w, A, B, t, params, (True,) * 5), reads[:]

    (first, launches), (second, _) = backward(), backward()
    assert sorted(launches) == ["_lora_linear_kernel", "_lora_reduce_rows_kernel"]
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one, two)
    monkeypatch.setattr(triton_reduce, "_single_pass_over_dy", lambda r: False)
    two_passes, launches = backward()
    assert sorted(launches) == ["_lora_linear_kernel", "_lora_project_kernel", "_lora_reduce_rows_kernel"]
    for name, one, two in zip(("dx", "dA", "dB", "db", "dm")[: len(first)], first, two_passes, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6 * float(two.abs().max()), msg=name)


@TRITON_ONLY
@pytest.mark.parametrize("M", [16, 100])
def test_single_pass_over_grad_y_with_the_gpu_tiles(monkeypatch, backend, M):
    """The single pass's GPU tile configs (decode: 16×64, else 64×256: several column blocks of N = 300)
    give the two passes' gradients, through the interpreter too."""
    from lora_kernels.ops import LoRAParams, triton_lora, triton_reduce

    reduce_config = triton_reduce._reduce_config

    def gpu_config(*args):
        with monkeypatch.context() as patch:
            patch.setattr(triton_reduce, "interpreting", lambda: False)
            return reduce_config(*args)

    monkeypatch.setattr(triton_reduce, "_reduce_config", gpu_config)
    K, N, r = 24, 300, 16
    x, w = torch.randn(M, K, device=backend.device), torch.randn(N, K, device=backend.device)
    A, B = torch.randn(r, K, device=backend.device) / 4, torch.randn(N, r, device=backend.device) / 4
    grad_y, params = torch.randn(M, N, device=backend.device), LoRAParams(2.0)
    _, t = triton_lora.lora_forward(x, w, None, A, B, params)
    one_pass = triton_lora.lora_backward(grad_y, x, w, A, B, t, params, (True,) * 5)
    assert gpu_config(M, N, r, True)["BLOCK_P"] == (64 if M <= 64 else 256)
    monkeypatch.setattr(triton_reduce, "_single_pass_over_dy", lambda r: False)
    two_passes = triton_lora.lora_backward(grad_y, x, w, A, B, t, params, (True,) * 5)
    for name, one, two in zip(("dx", "dA", "dB", "db"), one_pass, two_passes, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6 * float(two.abs().max()), msg=name)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launch_falls_back_to_a_config_that_fits():
    """A config the GPU cannot hold (OutOfResources at load) is skipped for the next smaller one, once."""
    from triton.runtime.errors import OutOfResources

    from lora_kernels.ops import triton_support

    launched, refused = [], []

    class SmallGPUKernel:  # refuses tiles over a budget, as a GPU with little shared memory does
        def __getitem__(self, grid):
            def run(*args, **cfg):
                if cfg["BLOCK_N"] * cfg["num_stages"] > 128:
                    refused.append(cfg)
                    raise OutOfResources(cfg["BLOCK_N"] * cfg["num_stages"], 128, "shared memory")
                launched.append((grid, cfg))

            return run

    preferred = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3)
    configs = triton_support._smaller_configs(preferred, ("BLOCK_N", "BLOCK_M", "BLOCK_K"))
    assert configs[0] == preferred and configs[-1] == dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_stages=2)
    kernel, args = SmallGPUKernel(), (torch.zeros(1),)
    cfg = triton_support._launch(kernel, lambda c: (c["BLOCK_N"],), configs, args, {"FLAG": True})
    assert cfg == dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_stages=2)
    assert launched == [((64,), {"FLAG": True, **cfg})] and len(refused) == 2
    triton_support._launch(kernel, lambda c: (c["BLOCK_N"],), configs, args, {"FLAG": True})
    assert len(refused) == 2  # the second launch starts from the config that fitted


# --------------------------------------------------------------------------- what a GPU runs, everywhere
# Each case below runs on every backend: through the interpreter on a CPU machine (small shapes: its cost
# grows with programs × loop trips), over several tiles on a GPU. bf16 is skipped on the interpreter only.

DROPOUT = pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)


def _sizes(backend, gpu, cpu):
    """``gpu`` sizes on CUDA tensors (several tiles), ``cpu`` sizes on CPU tensors (cheap to interpret)."""
    return gpu if backend.device == "cuda" else cpu


@DROPOUT
@pytest.mark.parametrize("r", [1, 16, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_at_every_rank_tile(backend, dtype, r, dropout_p):
    """bf16 (and fp16) at r = 1 and 16 (BLOCK_R 16), 128 and 256 (the largest rank the kernels take)."""
    skip_unless_dtype_runs(backend, dtype)
    lead, k, n = _sizes(backend, gpu=((3, 111), 200, 300), cpu=((37,), 40, 36))
    problem = make_problem(lead, k, n, r, dtype, device=backend.device)
    check_parity(problem, backend.name, dtype, dropout_p=dropout_p, slack=2.0, grad_slack=4.0)


def _strided_x(layout: str, m: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """An (m, k) view the kernels must read through its strides (2-D, so no copy is made on the way)."""

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device, dtype)

    if layout == "transposed":  # column-major: strides (1, m)
        return rand(k, m).t()
    if layout == "every_other_row":  # strides (2k, 1)
        return rand(2 * m, k)[::2]
    assert layout == "every_other_feature"  # strides (2k, 2)
    return rand(m, 2 * k)[:, ::2]


@DROPOUT
@DTYPES
@pytest.mark.parametrize("layout", ["transposed", "every_other_row", "every_other_feature"])
def test_strided_and_transposed_x(backend, layout, dtype, dropout_p):
    skip_unless_dtype_runs(backend, dtype)
    m, k, n, r = _sizes(backend, gpu=(300, 200, 260, 16), cpu=(45, 40, 36, 8))
    problem = make_problem((m,), k, n, r, dtype, device=backend.device)
    problem.x = _strided_x(layout, m, k, dtype, backend.device).requires_grad_()
    assert problem.x.shape == (m, k) and not problem.x.is_contiguous()
    check_parity(problem, backend.name, dtype, dropout_p=dropout_p, slack=2.0, grad_slack=4.0)


@DROPOUT
def test_fp32_rank_256_over_many_rows(backend, dropout_p, monkeypatch):
    """fp32 at r = 256 over M >= 200 rows: on a GPU the preferred tiles do not fit in shared memory, so
    ``triton_support._launch`` falls back to smaller ones (``_smaller_configs``); the result must not change."""
    fallbacks = []
    if backend.name == "triton":
        from lora_kernels.ops import triton_support

        launch = triton_support._launch

        def recording_launch(kernel, grid_of, configs, args, constexprs):
            cfg = launch(kernel, grid_of, configs, args, constexprs)
            if cfg != configs[0]:
                fallbacks.append((getattr(kernel, "__name__", "?"), cfg))
            return cfg

        monkeypatch.setattr(triton_support, "_launch", recording_launch)
    lead, k, n = _sizes(backend, gpu=((2, 150), 320, 288), cpu=((203,), 48, 40))
    problem = make_problem(lead, k, n, 256, device=backend.device)
    check_parity(problem, backend.name, torch.float32, dropout_p=dropout_p)
    print(f"{backend}: launches that fell back to smaller tiles: {fallbacks}")


def _strided_bias(view: str, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A bias of n elements that is a view with stride != 1 (nn.Linear accepts any such bias)."""

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device, dtype)

    if view == "every_other":  # stride 2
        return rand(2 * n)[::2]
    if view == "column":  # a column of a 2-D tensor: stride 3
        return rand(n, 3)[:, 1]
    assert view == "expanded"  # one value broadcast: stride 0
    return rand(1).expand(n)


@DROPOUT
@DTYPES
@pytest.mark.parametrize("view", ["every_other", "column", "expanded"])
def test_strided_bias(backend, view, dtype, dropout_p):
    """The kernels read bias through its stride; its gradient is that of the view."""
    skip_unless_dtype_runs(backend, dtype)
    lead, k, n, r = _sizes(backend, gpu=((2, 100), 160, 300, 8), cpu=((2, 9), 24, 20, 4))
    problem = make_problem(lead, k, n, r, dtype, device=backend.device)
    problem.bias = _strided_bias(view, n, dtype, backend.device).requires_grad_()
    assert problem.bias.shape == (n,) and problem.bias.stride(0) != 1
    check_parity(problem, backend.name, dtype, dropout_p=dropout_p, slack=2.0, grad_slack=4.0)
