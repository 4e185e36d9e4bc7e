"""The user's first LoRA demo (a ``LoRALayer`` 64 → 10, rank 4, Adam), rerun on FusedLoRALinear.

The original, rewritten in English, is :class:`OriginalLoRALayer` below: a frozen ``nn.Linear`` weight
(its bias stays trainable, as in the original) plus ``scaling · (x @ lora_A) @ lora_B`` with
``lora_A`` (in, rank) and ``lora_B`` (rank, out), both ``randn``. Our layer stores the transposes:
``FusedLoRALinear.lora_A`` (rank, in) = ``lora_Aᵀ`` and ``lora_B`` (out, rank) = ``lora_Bᵀ``, and
``scaling = lora_alpha / r = 1``. Both runs draw the same random numbers in the same order, train for
10 epochs with Adam (lr 0.01) on the same toy data, and the loss trajectories must agree.

Run: ``python examples/seed_lora_layer.py``.
"""

from __future__ import annotations

import torch
from torch import nn, optim

from lora_kernels import FusedLoRALinear, use_backend
from lora_kernels.dispatch import select_backend

SEED, IN_FEATURES, OUT_FEATURES, RANK, EPOCHS, LR = 42, 64, 10, 4, 10, 0.01


class OriginalLoRALayer(nn.Module):
    """The user's layer: frozen linear weight plus a rank-``rank`` update ``x @ A @ B``."""

    def __init__(self, in_features: int, out_features: int, rank: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.linear.weight.requires_grad = False  # freeze the original weight (the bias still trains)
        self.lora_A = nn.Parameter(torch.randn(in_features, rank))
        self.lora_B = nn.Parameter(torch.randn(rank, out_features))
        self.scaling = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.scaling * torch.matmul(torch.matmul(x, self.lora_A), self.lora_B)


def toy_dataset(n_samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n_samples, IN_FEATURES), torch.randn(n_samples, OUT_FEATURES)


def fused_lora_layer(in_features: int, out_features: int, rank: int = 4) -> FusedLoRALinear:
    """The same layer on FusedLoRALinear, drawing the same random numbers as :class:`OriginalLoRALayer`."""
    linear = nn.Linear(in_features, out_features)
    lora_A, lora_B = torch.randn(in_features, rank), torch.randn(rank, out_features)
    layer = FusedLoRALinear.from_linear(linear, r=rank, lora_alpha=rank, init_lora_weights=False)  # scaling 1
    with torch.no_grad():
        layer.lora_A.copy_(lora_A.t())  # (rank, in)
        layer.lora_B.copy_(lora_B.t())  # (out, rank)
    layer.bias.requires_grad_(True)  # the original trains the bias too
    return layer


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    criterion = nn.MSELoss()
    optimizer = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(EPOCHS):
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(X), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(model_factory) -> tuple[list[float], int, int]:
    torch.manual_seed(SEED)
    X, y = toy_dataset()
    model = model_factory(IN_FEATURES, OUT_FEATURES, RANK)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return train(model, X, y), trainable, total


def main(backend: str = "auto", rtol: float = 1e-4) -> tuple[list[float], list[float]]:
    original, trainable, total = run(OriginalLoRALayer)
    with use_backend(backend):
        print(f"backend: {select_backend(torch.device('cpu'), torch.float32)}")
        fused, trainable_f, total_f = run(fused_lora_layer)
    print(f"trainable parameters: {trainable} (fused: {trainable_f}); total: {total} (fused: {total_f})")
    print(f"{'epoch':>5}  {'original':>12}  {'fused':>12}  {'rel. diff':>9}")
    for epoch, (a, b) in enumerate(zip(original, fused, strict=True), 1):
        print(f"{epoch:>5}  {a:12.4f}  {b:12.4f}  {abs(a - b) / abs(a):9.1e}")
    assert (trainable, total) == (trainable_f, total_f)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(original), rtol=rtol, atol=0.0)
    print("loss trajectories agree")
    return original, fused


if __name__ == "__main__":
    main()
