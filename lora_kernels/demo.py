"""``python -m lora_kernels demo``: adapt a frozen model to a new task with FusedLoRALinear.

A small "pretrained" MLP is trained on one synthetic regression task, frozen, and adapted to a shifted
task by LoRA adapters on its linear layers. Prints the backend, the loss going down and the parity of
the fused layer against the pure-PyTorch reference.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .dispatch import select_backend
from .modules import FusedLoRALinear
from .reference import lora_linear_reference


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device} | backend: {select_backend(device, torch.float32)}")
    d_in, hidden = 32, args.hidden
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, 1)).to(device)  # fmt: skip
    teacher = torch.randn(d_in, device=device)
    x = torch.randn(1024, d_in, device=device)
    y_old, y_new = torch.sin(x @ teacher), torch.sin(x @ teacher) + 0.5 * torch.tanh(x[:, :4].sum(1))

    print("1) pretrain the base model on the old task")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in _progress(range(args.steps), args.steps, "pretrain"):
        opt.zero_grad()
        nn.functional.mse_loss(model(x).squeeze(1), y_old).backward()
        opt.step()

    print(f"2) freeze it and add rank-{args.rank} adapters to every linear layer")
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            model[i] = FusedLoRALinear.from_linear(
                layer, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"   trainable parameters: {trainable} of {total} ({100 * trainable / total:.1f} %)")

    print("3) fine-tune the adapters on the new task")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    losses = []
    for step in _progress(range(args.steps), args.steps, "fine-tune"):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y_new)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"   step {step:4d}  loss {loss.item():.4f}")
    print(
        f"   {args.steps} steps in {time.perf_counter() - start:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )

    model.eval()
    layer = model[2]
    h = torch.randn(64, hidden, device=device)
    ref = lora_linear_reference(
        h, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, upcast=True
    )
    err = (layer(h).double() - ref).abs().max().item()
    print(f"4) parity of FusedLoRALinear against the float64 reference: max abs error {err:.2e}")
    return 0 if losses[-1] < losses[0] and err < 1e-4 else 1
