"""Fine-tune LoRA layers split over ranks: tensor parallelism, or FSDP2 × tensor parallelism.

Run with torchrun, gloo on CPUs (the default without a GPU) or nccl on GPUs::

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                 # TP over 2 ranks
    torchrun --nproc-per-node 4 examples/tensor_parallel.py --mode fsdp-tp  # 2 (FSDP2) × 2 (TP) mesh

A stack of MLP blocks, ``down(silu(up(x)) * gate(x))``, with fused LoRA (``--dora``: DoRA) on ``up`` and
``down``: ``up`` and ``gate`` column-parallel, ``down`` row-parallel (``lora_kernels.parallel``'s styles in
place of torch's), FSDP2's ``fully_shard`` on each block with ``--mode fsdp-tp``. Rank 0 prints the loss of
each step and, with ``--check``, the same training in one process (on rank 0) and the largest difference.
NCCL and several GPUs have not been tried: only gloo on CPU ranks has run this.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from lora_kernels import FusedLoRALinear
from lora_kernels.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, dora: bool, dropout: float, device: torch.device) -> None:
        super().__init__()
        options = dict(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=dora, init_lora_weights=False)
        self.up = FusedLoRALinear(dim, hidden, device=device, **options)
        self.gate = nn.Linear(dim, hidden, device=device)
        self.down = FusedLoRALinear(hidden, dim, device=device, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(x)) * self.gate(x))


def build(args, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)  # the same model on every rank (and distribute_tensor takes rank 0's values)
    return nn.Sequential(
        *(Block(args.dim, args.hidden, args.dora, args.dropout, device) for _ in range(args.blocks))
    )


def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the dropout masks: the same draw on every rank
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tp", "fsdp-tp"), default="tp")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (TP only; 0 under fsdp-tp)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = {"up": ColwiseParallel(), "gate": ColwiseParallel(), "down": RowwiseParallel()}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.dim, generator=g).to(device)
    target = torch.randn(args.batch, args.seq, args.dim, generator=g).to(device)
    if args.mode == "fsdp-tp":
        args.dropout = 0.0  # the data ranks see other rows than one process: their masks could not be its
    model = build(args, device)
    if args.mode == "tp":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
        for block in model:
            parallelize_module(block, mesh, plan)
        inputs, targets = x, target
    else:
        from torch.distributed.fsdp import fully_shard

        if world % 2 or world < 4:
            raise SystemExit("--mode fsdp-tp needs an even number of ranks, at least 4 (a 2 × N/2 mesh)")
        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("dp", "tp"))
        for block in model:
            parallelize_module(block, mesh["tp"], plan)
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        half = args.batch // 2
        rows = slice(mesh["dp"].get_local_rank() * half, (mesh["dp"].get_local_rank() + 1) * half)
        inputs, targets = x[rows], target[rows]
    losses = torch.tensor(train(model, inputs, targets, args.steps), device=device)
    if args.mode == "fsdp-tp":  # the whole batch's loss: the mean over the data ranks (TP ranks agree)
        dist.all_reduce(losses)
        losses /= world
    if rank == 0:
        print(f"{args.mode} on {world} ranks ({dist.get_backend()}), {'DoRA' if args.dora else 'LoRA'}:")
        for step, loss in enumerate(losses.tolist()):
            print(f"  step {step}: loss {loss:.6f}")
        if args.check:
            expected = torch.tensor(train(build(args, device), x, target, args.steps), device=device)
            print(f"one process: largest loss difference {(losses - expected).abs().max().item():.3g}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
