"""The user's notebook demo (``LoRALinear`` regression 10 → 2, r = 2, SGD), rerun on FusedLoRALinear.

The original, rewritten in English, is :class:`OriginalLoRALinear`: a frozen ``randn`` weight, a frozen
zero bias, and ``y = x @ (W + A @ B)ᵀ + b`` with ``A`` (out, r) and ``B`` (r, in), both ``randn``. With
PEFT's layout ``ΔW = scaling · lora_B @ lora_A``, that is ``lora_B = A`` (out, r), ``lora_A = B`` (r, in)
and ``scaling = 1``. Both runs draw the same random numbers in the same order, fit the same synthetic
linear data for 200 epochs of SGD (lr 0.01), and the loss trajectories must agree.

Run: ``python examples/seed_lora_linear_regression.py``.
"""

from __future__ import annotations

import torch
from torch import nn, optim
from torch.nn.utils import skip_init

from lora_kernels import FusedLoRALinear, use_backend
from lora_kernels.dispatch import select_backend

SEED, IN_FEATURES, OUT_FEATURES, R, N, EPOCHS, LR = 42, 10, 2, 2, 100, 200, 0.01


class OriginalLoRALinear(nn.Module):
    """The notebook's layer: the adapted weight ``W + A @ B`` is formed explicitly each forward."""

    def __init__(self, in_features: int, out_features: int, r: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self.A = nn.Parameter(torch.randn(out_features, r))
        self.B = nn.Parameter(torch.randn(r, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.A @ self.B).t() + self.bias

    def adapters(self) -> list[nn.Parameter]:
        return [self.A, self.B]


def fused_lora_linear(in_features: int, out_features: int, r: int = 4) -> FusedLoRALinear:
    """The same layer on FusedLoRALinear, drawing the same random numbers as :class:`OriginalLoRALinear`."""
    # skip_init builds the layer without drawing random numbers, so the draws below line up with the original.
    layer = skip_init(FusedLoRALinear, in_features, out_features, r=r, lora_alpha=r)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features))
        layer.bias.zero_()
        layer.lora_B.copy_(torch.randn(out_features, r))  # the notebook's A
        layer.lora_A.copy_(torch.randn(r, in_features))  # the notebook's B
    layer.adapters = lambda: [layer.lora_B, layer.lora_A]
    return layer


def run(model_factory) -> list[float]:
    torch.manual_seed(SEED)
    model = model_factory(IN_FEATURES, OUT_FEATURES, R)
    x = torch.randn(N, IN_FEATURES)
    W_true = torch.randn(OUT_FEATURES, IN_FEATURES)
    b_true = torch.randn(OUT_FEATURES)
    y = x @ W_true.t() + b_true
    criterion = nn.MSELoss()
    optimizer = optim.SGD(model.adapters(), lr=LR)
    losses = []
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(backend: str = "auto", rtol: float = 1e-4) -> tuple[list[float], list[float]]:
    original = run(OriginalLoRALinear)
    with use_backend(backend):
        print(f"backend: {select_backend(torch.device('cpu'), torch.float32)}")
        fused = run(fused_lora_linear)
    print(f"{'epoch':>5}  {'original':>12}  {'fused':>12}  {'rel. diff':>9}")
    for epoch in range(19, EPOCHS, 20):
        a, b = original[epoch], fused[epoch]
        print(f"{epoch + 1:>5}  {a:12.4f}  {b:12.4f}  {abs(a - b) / abs(a):9.1e}")
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(original), rtol=rtol, atol=0.0)
    print("loss trajectories agree")
    return original, fused


if __name__ == "__main__":
    main()
