"""Tensor parallelism (lora_kernels.parallel) on 2 and 4 CPU ranks with gloo: one process's numbers.

A small MLP block (``down(silu(up(x)) * gate(x))``: ``up`` column-parallel and ``down`` row-parallel
``FusedLoRALinear`` layers, ``gate`` a plain ``nn.Linear`` through the same styles) trains three AdamW
steps with dropout on the LoRA branch, split over the ranks, and in one process. Outputs, every gradient,
the three losses and the parameters after the steps must match, for LoRA and DoRA, on the torch backend and
on Triton (through the interpreter), with the input and output replicated or sequence-sharded
(``Shard(1)``, torch's sequence parallelism). Each world size runs every case in one spawn of its ranks.
FSDP2 × TP: the same block under ``fully_shard`` on a 2 × 2 mesh (data × tensor), each data rank with half
of the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import HAS_TRITON, run_ranks
from torch import nn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

DIM, HIDDEN, R, STEPS = 32, 64, 4, 3
BATCH, SEQ = 2, 8
BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]
# (backend, dora, sequence-parallel): Triton's interpreter is slow, so it runs the replicated layout only
CASES = [
    (b, dora, sp)
    for b in BACKENDS
    for dora in (False, True)
    for sp in (False, True)
    if b == "torch" or not sp
]


class Block(nn.Module):
    """``down(silu(up(x)) * gate(x))`` with LoRA (or DoRA) on ``up`` and ``down``."""

    def __init__(self, dora: bool, dropout: float = 0.25) -> None:
        super().__init__()
        from lora_kernels import FusedLoRALinear

        options = dict(r=R, lora_alpha=8, lora_dropout=dropout, use_dora=dora, init_lora_weights=False)
        self.up = FusedLoRALinear(DIM, HIDDEN, **options)
        self.gate = nn.Linear(DIM, HIDDEN)
        self.down = FusedLoRALinear(HIDDEN, DIM, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)) * self.gate(x))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, forward=None) -> dict:
    """Three AdamW steps (seeded per step: the dropout masks); the output, gradients of the first step,
    the losses and the final parameters, as full tensors."""
    forward = forward or model
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    out: dict = {"loss": []}
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        y = forward(x)
        loss = F.mse_loss(y, target)
        loss.backward()
        if step == 0:
            out["y"] = _full(y)
            out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        out["loss"].append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    out["params"] = {n: _full(p) for n, p in model.named_parameters()}
    return out


def _plan(sp: bool) -> dict:
    from torch.distributed.tensor import Shard

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    if not sp:
        return {"up": ColwiseParallel(), "gate": ColwiseParallel(), "down": RowwiseParallel()}
    return {
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "gate": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
    }


def _tp_forward(model: nn.Module, mesh, sp: bool):
    """The block's forward on the full batch: sequence-parallel, each rank gives its slice of the sequence
    and the output is gathered back (differentiably) for the loss."""
    if not sp:
        return model
    from torch.distributed.tensor import DTensor, Shard

    def forward(x):
        chunk = x.shape[1] // mesh.size()
        rank = mesh.get_local_rank()
        y = model(x[:, rank * chunk : (rank + 1) * chunk])
        return DTensor.from_local(y, mesh, [Shard(1)], run_check=False).full_tensor()

    return forward


def _tp_worker(rank: int, world: int, cases: list) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lora_kernels import use_backend
    from lora_kernels.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for backend, dora, sp in cases:
        torch.manual_seed(0)
        model = parallelize_module(Block(dora), mesh, _plan(sp))
        x, target = _data()
        with use_backend(backend):
            results[backend, dora, sp] = train(model, x, target, _tp_forward(model, mesh, sp))
    return results


def _one_process(backend: str, dora: bool, dropout: float = 0.25) -> dict:
    from lora_kernels import use_backend

    torch.manual_seed(0)
    model = Block(dora, dropout)
    x, target = _data()
    with use_backend(backend):
        return train(model, x, target)


def check_same(got: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Outputs, gradients, losses and final parameters of :func:`train` equal, name by name."""
    torch.testing.assert_close(got["y"], expected["y"], rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    assert set(got["grads"]) == set(expected["grads"])
    for name, grad in got["grads"].items():
        torch.testing.assert_close(
            grad, expected["grads"][name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}"
        )
    torch.testing.assert_close(
        torch.tensor(got["loss"]), torch.tensor(expected["loss"]), rtol=rtol, atol=atol
    )
    for name, param in got["params"].items():
        torch.testing.assert_close(
            param,
            expected["params"][name],
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=name: f"{n} after steps: {m}",
        )


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request) -> tuple[int, dict]:
    return request.param, run_ranks(_tp_worker, request.param, CASES)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{b}-{'dora' if d else 'lora'}{'-sp' if s else ''}" for b, d, s in CASES]
)
def test_tensor_parallel_block_trains_as_one_process(tp_results, case):
    _, results = tp_results
    backend, dora, _ = case
    got, expected = results[case], _one_process(backend, dora)
    grads = got["grads"]
    # the split as torchtitan's: every adapter tensor trained, and the sharded weights really were sharded
    assert {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"} <= set(grads)
    assert ("up.lora_magnitude" in grads) == dora
    check_same(got, expected)


def test_dropout_is_on_in_the_parity_cases():
    """The parity above is not vacuous: with dropout the block's output differs from p = 0."""
    with_dropout, without = _one_process("torch", True), _one_process("torch", True, dropout=0.0)
    assert not torch.allclose(with_dropout["y"], without["y"], atol=1e-4)


def test_styles_place_the_adapters_as_torchtitan():
    """Placements on a 1-rank mesh: A replicated column-wise, sharded on the input dim row-wise; B the other
    way round; DoRA's magnitude as B; a plain nn.Linear as torch's own style places it."""
    from torch.distributed.tensor import Replicate, Shard

    got = run_ranks(_placements_worker, 1)
    assert got["up.weight"] == got["up.bias"] == got["up.lora_B"] == got["up.lora_magnitude"] == (Shard(0),)
    assert got["up.lora_A"] == (Replicate(),)
    assert got["down.weight"] == got["down.lora_A"] == (Shard(1),)
    assert got["down.bias"] == got["down.lora_B"] == got["down.lora_magnitude"] == (Replicate(),)
    assert got["gate.weight"] == got["gate.bias"] == (Shard(0),)


def _placements_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(
        Block(True), mesh, {"up": ColwiseParallel(), "gate": ColwiseParallel(), "down": RowwiseParallel()}
    )
    return {n: tuple(p.placements) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------- FSDP2 × TP


def _fsdp_tp_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_kernels import use_backend
    from lora_kernels.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"]
    results = {}
    for dora in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(Block(dora, dropout=0.0), Block(dora, dropout=0.0))
        for block in model:
            parallelize_module(block, mesh["tp"], _plan(False))
            fully_shard(block, mesh=dp)
        fully_shard(model, mesh=dp)
        x, target = _data()
        half = slice(dp.get_local_rank() * BATCH // 2, (dp.get_local_rank() + 1) * BATCH // 2)
        with use_backend("torch"):
            out = train(model, x[half], target[half])
        # every data rank's output in batch order, and the mean of their losses (the full batch's)
        gathered = [torch.empty_like(out["y"]) for _ in range(2)]
        dist.all_gather(gathered, out["y"], group=dp.get_group())
        losses = [torch.zeros(STEPS) for _ in range(2)]
        dist.all_gather(losses, torch.tensor(out["loss"]), group=dp.get_group())
        out["y"], out["loss"] = torch.cat(gathered), torch.stack(losses).mean(0).tolist()
        results[dora] = out
    return results


@pytest.fixture(scope="module")
def fsdp_tp_results() -> dict:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        pytest.skip(f"FSDP2 is not available: {err}")
    return run_ranks(_fsdp_tp_worker, 4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fsdp2_times_tensor_parallel_trains_as_one_process(fsdp_tp_results, dora):
    """A 2 × 2 mesh: FSDP2 over the data dim on each block, TP inside; no dropout (the data ranks see other
    rows than one process would, so their masks could not be its mask)."""
    from lora_kernels import use_backend

    torch.manual_seed(0)
    model = nn.Sequential(Block(dora, dropout=0.0), Block(dora, dropout=0.0))
    x, target = _data()
    with use_backend("torch"):
        expected = train(model, x, target)
    check_same(fsdp_tp_results[dora], expected)


# ------------------------------------------------------------------------------------------- PEFT under TP


class PlainBlock(nn.Module):
    """:class:`Block` with plain ``nn.Linear`` layers, for PEFT."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)) * self.gate(x))


def _peft_block(dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=R, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, use_dora=dora
    )
    return get_peft_model(PlainBlock(), config)


def _peft_tp_worker(rank: int, world: int) -> dict:
    """The PEFT model's LoRA layers parallelized with the plan torch's styles take for the base model."""
    from torch.distributed.device_mesh import init_device_mesh

    import lora_kernels
    from lora_kernels.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for dora in (False, True):
        model = _peft_block(dora)
        parallelize_module(model.base_model.model, mesh, _plan(False))
        assert lora_kernels.peft.fuse(model) == 2  # fuse leaves the sharded forwards, and counts them
        assert lora_kernels.peft.unfuse(model) == 0
        x, target = _data()
        with lora_kernels.use_backend("torch"):
            results[dora] = train(model, x, target)
    return results


@pytest.fixture(scope="module")
def peft_tp_results() -> dict:
    pytest.importorskip("peft")
    return run_ranks(_peft_tp_worker, 2)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_model_under_tensor_parallelism_equals_peft(peft_tp_results, dora):
    """PEFT's LoRA layers sharded by our styles run the fused op on their shards, with the outputs,
    gradients and steps of PEFT's own forward in one process (no dropout: PEFT's mask is torch's RNG)."""
    x, target = _data()
    expected = train(_peft_block(dora), x, target)
    check_same(peft_tp_results[dora], expected)
