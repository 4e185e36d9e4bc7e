"""Where the dropout seed comes from (issue 20): drawn on the input's device, read by the kernels from a
tensor, never baked into a launch, a compiled graph or a CUDA graph.

* eager: the default seed is a draw from the input device's generator (``torch.manual_seed`` repeats it);
  an explicit ``dropout_seed`` (int or tensor) gives exactly ``dropout_mask(seed, ...)``, and a seed tensor
  is read when the call runs;
* ``torch.compile(fullgraph=True)``: no graph break and no recompile across steps, for LoRA and DoRA, with
  and without a seed per step (the ``eager`` and ``inductor`` backends, CPU, small shapes);
* CUDA graphs (GPU only): each replay draws a fresh seed and applies exactly its mask, also under
  ``torch.compile(mode="reduce-overhead")``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from helpers import assert_close, make_problem, requires_cuda
from torch import nn

from lora_kernels import FusedLoRALinear, dora_linear, lora_linear, lora_linear_reference, use_backend
from lora_kernels.dropout import draw_seed, dropout_mask
from lora_kernels.reference import dora_linear_reference

P = 0.5


def _reference(p, x, mask, magnitude=None):
    args = (x.double(), p.weight.detach().double(), p.bias.detach().double())
    adapters = (p.lora_A.detach().double(), p.lora_B.detach().double())
    if magnitude is None:
        return lora_linear_reference(*args, *adapters, p.scaling, mask)
    return dora_linear_reference(*args, *adapters, magnitude.detach().double(), p.scaling, mask)


def _mask(seed, x):
    return dropout_mask(seed, x.shape, P, device=x.device, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ eager


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_default_seed_is_a_draw_on_the_input_device(backend, dora):
    """Without ``dropout_seed`` the mask is ``dropout_mask`` of one ``draw_seed(x.device)`` from the generator
    of x's device: ``torch.manual_seed`` makes it repeatable, and two calls draw two masks."""
    p = make_problem((3, 5), 16, 12, 4, device=backend.device)
    magnitude = torch.rand(12, device=backend.device) + 0.5
    call = (lambda: dora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, P, True)) if (
        dora
    ) else (lambda: lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True))  # fmt: skip
    with use_backend(backend.name):
        torch.manual_seed(7)
        y1, y2 = call(), call()
        torch.manual_seed(7)
        again = call()
    torch.manual_seed(7)
    seed = draw_seed(p.x.device)
    assert seed.device == p.x.device and seed.dtype == torch.int64 and seed.shape == ()
    assert_close(y1, _reference(p, p.x, _mask(seed, p.x), magnitude if dora else None), p.x.dtype, "y")
    assert torch.equal(y1, again)
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_seed_tensor_is_read_when_the_call_runs(backend, dora):
    """A ``dropout_seed`` tensor gives ``dropout_mask`` of the value it holds when the call runs, in the
    forward and in the backward: the kernels read it on the device (nothing is copied to the host)."""
    p = make_problem((3, 5), 16, 12, 4, device=backend.device)
    magnitude = torch.rand(12, device=backend.device) + 0.5
    seed = torch.full((), 11, dtype=torch.int64, device=backend.device)
    for value in (11, 2**40 + 2**31 + 5):
        seed.fill_(value)
        x = p.x.detach().requires_grad_()
        with use_backend(backend.name):
            if dora:
                y = dora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, P, True,
                                dropout_seed=seed)  # fmt: skip
            else:
                y = lora_linear(
                    x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True, dropout_seed=seed
                )
        (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
        x64 = x.detach().double().requires_grad_()
        expected = _reference(p, x64, dropout_mask(value, x.shape, P, dtype=torch.float64).to(x.device),
                              magnitude if dora else None)  # fmt: skip
        (expected_grad,) = torch.autograd.grad(expected, x64, torch.ones_like(expected))
        assert_close(y.detach(), expected.detach(), x.dtype, f"y, seed {value}")
        assert_close(grad_x, expected_grad, x.dtype, f"grad_x, seed {value}")


def _seeded_call(kind: str, device: str):
    """A LoRA, DoRA or QLoRA call with dropout on a small problem, as ``call(seed) -> y``, and its inputs
    that take gradients."""
    p = make_problem((3, 5), 16, 12, 4, device=device)
    magnitude = (torch.rand(12, device=device) + 0.5).requires_grad_()
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
        from lora_kernels import qlora_linear
        from lora_kernels.testing import to_4bit

        base = to_4bit(nn.Linear(16, 12).to(device))
        return (
            lambda seed: qlora_linear(p.x, base.weight, base.bias, p.lora_A, p.lora_B, p.scaling, P, True,
                                      dropout_seed=seed),
            (p.x, p.lora_A, p.lora_B),
        )  # fmt: skip
    if kind == "dora":
        return (
            lambda seed: dora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, P, True,
                                     dropout_seed=seed),
            (p.x, p.lora_A, p.lora_B, magnitude),
        )  # fmt: skip
    return (
        lambda seed: lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True,
                                 dropout_seed=seed),
        (p.x, p.lora_A, p.lora_B),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_seed_tensor_changed_after_the_forward_keeps_the_forward_mask(backend, kind):
    """A seed tensor changed in place between forward and backward (a step counter bumped as CUDA-graph
    training loops do) does not change the backward: every gradient is that of the mask the forward applied,
    on every backend (the call keeps the seed's value, a one-element copy on its device)."""
    if kind == "qlora" and backend.name == "cuda":
        pytest.skip("QLoRA runs on the triton and torch backends")
    call, inputs = _seeded_call(kind, backend.device)
    grad_y = torch.randn(3, 5, 12, device=backend.device)
    with use_backend(backend.name):
        seed = torch.full((), 11, dtype=torch.int64, device=backend.device)
        expected = torch.autograd.grad(call(seed), inputs, grad_y)
        bumped = torch.full((), 11, dtype=torch.int64, device=backend.device)
        y = call(bumped)
        bumped += 1  # in place, after the forward
        grads = torch.autograd.grad(y, inputs, grad_y)
    for name, got, want in zip(("x", "lora_A", "lora_B", "magnitude"), grads, expected, strict=False):
        assert torch.equal(got, want), f"grad_{name} used another mask than the forward ({kind})"


def test_seed_tensor_of_the_wrong_kind_is_refused():
    p = make_problem((4,), 16, 8, 4)
    args = (p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True)
    with pytest.raises(TypeError, match="must hold an integer"):
        lora_linear(*args, dropout_seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="one element"):
        lora_linear(*args, dropout_seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        lora_linear(*args, dropout_seed=-1)


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_negative_seed_tensor_is_refused_up_front_on_every_backend(backend, kind):
    """On the CPU a negative seed tensor is refused as a negative int is, before any kernel runs, with the
    same message on every backend (it used to pass Triton and fail inside the extension's op)."""
    if backend.device != "cpu":
        pytest.skip("the value of a GPU seed tensor is not read (no host sync)")
    call, _ = _seeded_call(kind, backend.device)
    with use_backend(backend.name):
        for seed in (-1, torch.tensor(-5), torch.tensor([-(2**62)])):
            with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
                call(seed)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        dropout_mask(torch.tensor(-5), (4, 8), P)


@pytest.mark.cuda
@requires_cuda
def test_negative_seed_tensor_on_gpu_gives_the_same_mask_on_every_backend():
    """On a GPU the seed's value is not read on the host: every backend takes its 64 bits as they are, as
    ``dropout_mask`` does, so they agree."""
    from lora_kernels import available_backends

    p = make_problem((5, 7), 40, 24, 4, device="cuda")
    seed = torch.tensor(-123456789, device="cuda")
    expected = _reference(p, p.x, _mask(seed, p.x))
    for name in available_backends():
        with use_backend(name):
            y = lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True, dropout_seed=seed)
        assert_close(y.detach(), expected, p.x.dtype, f"y on {name}")


# ---------------------------------------------------------------------------------------------- compile


def _counter(backend: str):
    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend(backend)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_compiled_new_seed_each_step_does_not_recompile(compiler, dora):
    """A new int ``dropout_seed`` every step (what a training loop passes) compiles at most twice (Dynamo
    makes a changing int dynamic on its second value) and each step applies exactly its seed's mask. On
    the old code every new seed recompiled, and the 9th failed with FailOnRecompileLimitHit."""
    p = make_problem((3, 5), 16, 12, 4)
    magnitude = (torch.rand(12) + 0.5).requires_grad_()

    def step(x, w, b, a, bb, m, seed):
        if dora:
            return dora_linear(x, w, b, a, bb, m, p.scaling, P, True, dropout_seed=seed)
        return lora_linear(x, w, b, a, bb, p.scaling, P, True, dropout_seed=seed)

    counter = _counter(compiler)
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with use_backend("torch"):
        for i in range(10):
            seed = 1000 + 7 * i
            y = compiled(p.x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, seed)
            y.square().sum().backward()
            assert_close(y, _reference(p, p.x, _mask(seed, p.x), magnitude if dora else None), y.dtype, "y")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 10 seeds"


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_seed_tensor_is_an_input_not_a_constant(compiler):
    """A seed tensor changed in place between calls of one compiled graph changes the mask: no recompile,
    no value baked into the graph."""
    p = make_problem((3, 5), 16, 12, 4)

    def fn(x, w, b, a, bb, seed):
        return lora_linear(x, w, b, a, bb, p.scaling, P, True, dropout_seed=seed)

    counter = _counter(compiler)
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    seed = torch.zeros((), dtype=torch.int64)
    with use_backend("torch"):
        for value in (3, 4, 2**62 + 1):
            seed.fill_(value)
            y = compiled(p.x, p.weight, p.bias, p.lora_A, p.lora_B, seed)
            assert_close(y, _reference(p, p.x, _mask(value, p.x)), y.dtype, f"y, seed {value}")
    assert counter.frame_count == 1


def _model(dora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    for i in (0, 2):
        model[i] = FusedLoRALinear.from_linear(
            model[i], r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, use_dora=dora
        )
    return model


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_compiled_training_without_seed_is_one_graph_with_fresh_masks(compiler, dora):
    """``torch.compile(fullgraph=True)`` of a model with LoRA or DoRA layers with dropout and no seed: one
    graph (no break: the old DoRA path drew its seed in a ``torch.compiler.disable``d function, a break
    that fullgraph refuses), no recompile over the steps, a different mask at each step."""
    model = _model(dora)
    counter = _counter(compiler)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(5, 16)
    outputs = []
    with use_backend("torch"):
        for _ in range(4):
            y = compiled(x)
            y.square().sum().backward()
            outputs.append(y.detach())
    assert counter.frame_count == 1
    for i in range(len(outputs)):
        for j in range(i):
            assert not torch.equal(outputs[i], outputs[j]), f"steps {j} and {i} applied the same masks"
    if compiler == "eager":  # the draw is torch.randint on the same generator as eager: the same masks
        eager = _model(dora)
        with use_backend("torch"):
            torch.manual_seed(5)
            y_eager = eager(x)
            torch.manual_seed(5)
            y_compiled = compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- CUDA graphs


def _cuda_graph_backends() -> list:
    from lora_kernels import available_backends

    names = available_backends("cuda") if torch.cuda.is_available() else ["triton", "cuda", "torch"]
    return [pytest.param(name, marks=pytest.mark.cuda) for name in names]


def _seed_of_the_draw_at(state: torch.Tensor, device) -> int:
    """The seed a call's first draw took from the CUDA generator in ``state`` (read back by drawing again
    from that state); the generator is left as it was."""
    now = torch.cuda.get_rng_state(device)
    torch.cuda.set_rng_state(state, device)
    seed = int(draw_seed(device))
    torch.cuda.set_rng_state(now, device)
    return seed


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend_name", _cuda_graph_backends())
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_cuda_graph_replays_draw_fresh_masks(backend_name, dora):
    """A training step (forward + backward) with dropout captured in a CUDA graph and replayed twice: the
    two replays apply different masks, each exactly ``dropout_mask`` of the seed that replay drew from the
    device generator at its (seed, offset). A seed baked into the graph would repeat one mask."""
    device = torch.device("cuda")
    p = make_problem((4, 6), 32, 24, 8, device="cuda")
    magnitude = (torch.rand(24, device=device) + 0.5).requires_grad_()
    x = p.x.detach().clone()
    leaves = [p.lora_A, p.lora_B] + ([magnitude] if dora else [])

    def step():
        with use_backend(backend_name):
            if dora:
                y = dora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, P, True)
            else:
                y = lora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True)
        grads = torch.autograd.grad(y.square().sum(), leaves)
        return y, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compiles, allocator) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, _ = step()
    outputs, seeds = [], []
    for _ in range(2):
        state = torch.cuda.get_rng_state(device)
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(y_static.clone())
        seeds.append(_seed_of_the_draw_at(state, device))
    assert seeds[0] != seeds[1]
    assert not torch.equal(outputs[0], outputs[1])
    for y, seed in zip(outputs, seeds, strict=True):
        assert_close(y, _reference(p, x, _mask(seed, x), magnitude if dora else None), x.dtype, f"y {seed}")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_reduce_overhead_compile_draws_fresh_masks(dora):
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs of the compiled forward and backward): every
    step applies a new mask, each exactly ``dropout_mask`` of the seed drawn at that step
    (``fallback_random`` keeps ``torch.randint`` as the draw, so the test can read it back)."""
    device = torch.device("cuda")
    p = make_problem((4, 6), 32, 24, 8, device="cuda")
    magnitude = (torch.rand(24, device=device) + 0.5).requires_grad_()

    def step(x):
        if dora:
            return dora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, magnitude, p.scaling, P, True)
        return lora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, P, True)

    torch._dynamo.reset()
    x = p.x.detach().clone()
    outputs, seeds = [], []
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for _ in range(5):  # warm-up, recording and replays of the CUDA-graph trees
            state = torch.cuda.get_rng_state(device)
            y = compiled(x)
            y.square().sum().backward()
            torch.cuda.synchronize()
            outputs.append(y.detach().clone())
            seeds.append(_seed_of_the_draw_at(state, device))
    assert len(set(seeds)) == len(seeds)
    for y, seed in zip(outputs, seeds, strict=True):
        assert_close(y, _reference(p, x, _mask(seed, x), magnitude if dora else None), x.dtype, f"y {seed}")
