"""Two CPU ranks (gloo) train an injected model under DDP and FSDP2; gradients equal a single process.

Each rank sees half of the batch; the loss is a mean, so the averaged gradients of DDP equal the
gradients of one process on the whole batch. FSDP2 (``fully_shard``) shards the parameters, adapters
included, and its gradients are checked after gathering them back.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

BATCH, DIM = 8, 16


def _model() -> nn.Module:
    from lora_kernels import inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    inject_lora(model, r"[02]", r=4, lora_alpha=8, init_lora_weights=False)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, 4, generator=g)


def _single_process_grads() -> dict[str, torch.Tensor]:
    from lora_kernels import use_backend

    model = _model()
    x, y = _data()
    with use_backend("torch"):
        nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, mode: str, out_dir: str) -> None:
    os.environ["LORA_KERNELS_BACKEND"] = "torch"
    # A rendezvous file, not a TCP port: no race for a free port between choosing it and binding it.
    init_method = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        model = _model()
        x, y = _data()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            nn.functional.mse_loss(wrapped(x[shard]), y[shard]).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
            nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({n: g.detach().clone() for n, g in grads.items()}, os.path.join(out_dir, "grads.pt"))
        # Both ranks leave their collectives before either tears gloo down: a rank destroying the group
        # while the other still waits in one aborted it ("terminate called without an active exception").
        del grads, model
        if mode == "ddp":
            del wrapped  # DDP's reducer goes while the group is alive, not in the interpreter's shutdown
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: gloo's threads could still abort a rank in C++ static
    # destructors after everything above succeeded (about 1 run in 12, SIGABRT, same message). Failures
    # above still raise, and reach mp.spawn, before this line.
    os._exit(0)


def _run(mode: str) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, mode, out_dir), nprocs=2, join=True)
        return torch.load(os.path.join(out_dir, "grads.pt"))


def _check(grads: dict[str, torch.Tensor]) -> None:
    expected = _single_process_grads()
    assert set(grads) == set(expected) and len(grads) == 4
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_ddp_two_ranks_match_single_process():
    _check(_run("ddp"))


def test_fsdp2_two_ranks_match_single_process():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        pytest.skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {err}")
    _check(_run("fsdp"))
