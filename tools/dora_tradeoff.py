"""DoRA's ``dm`` needs ``z = x̃·Wᵀ + s·t·Bᵀ`` in backward: what saving it (what ships) and recomputing it cost.

    python tools/dora_tradeoff.py [--size 1024] [--rank 16]

On the CPU, torch backend, fp32, ``x`` (size, size), a size² layer, per call (forward +
``torch.autograd.grad``): our plain LoRA, our DoRA (``z`` saved), and the GEMM a recompute would add
(``x·Wᵀ + s·t·Bᵀ``), with the activation memory each keeps for backward. Medians of 15 calls; compare
lines of the same run. The GPU side of the choice is predicted in benchmarks/NOTES.md ("DoRA").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_kernels import dora_linear, lora_linear, use_backend
from lora_kernels.testing import SavedTensorCounter


def median_ms(fn, calls: int = 15) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, r = args.size, args.rank
    x = torch.randn(n, n, requires_grad=True)
    weight = torch.randn(n, n) / n**0.5
    lora_A = (torch.randn(r, n) / n**0.5).requires_grad_()
    lora_B = (torch.randn(n, r) / r**0.5).requires_grad_()
    magnitude = (torch.rand(n) + 0.5).requires_grad_()
    grad_y = torch.randn(n, n)

    def lora():
        return torch.autograd.grad(
            lora_linear(x, weight, None, lora_A, lora_B, 2.0), (x, lora_A, lora_B), grad_y
        )

    def dora():
        y = dora_linear(x, weight, None, lora_A, lora_B, magnitude, 2.0)
        return torch.autograd.grad(y, (x, lora_A, lora_B, magnitude), grad_y)

    t = (x @ lora_A.t()).detach()
    known = [x, weight, lora_A, lora_B, magnitude]
    with use_backend("torch"):
        lora_ms, dora_ms = median_ms(lora), median_ms(dora)
        with SavedTensorCounter(known) as lora_saved:
            lora_linear(x, weight, None, lora_A, lora_B, 2.0)
        with SavedTensorCounter(known) as dora_saved:
            dora_linear(x, weight, None, lora_A, lora_B, magnitude, 2.0)
    recompute_ms = median_ms(
        lambda: torch.mm(x.detach(), weight.t()).addmm_(t, lora_B.detach().t(), alpha=2.0)
    )
    mib = 2.0**-20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, x ({n}, {n}), r = {r}")
    print(
        f"LoRA fwd+bwd:                {lora_ms:8.2f} ms   saved {lora_saved.activation_bytes * mib:.2f} MiB"
    )
    print(
        f"DoRA fwd+bwd, z saved:       {dora_ms:8.2f} ms   saved {dora_saved.activation_bytes * mib:.2f} MiB"
        f"   ({dora_ms / lora_ms:.2f}x LoRA)"
    )
    print(
        f"recomputing z would add:     {recompute_ms:8.2f} ms   (DoRA would be {(dora_ms + recompute_ms) / lora_ms:.2f}x"
        f" LoRA, saving {n * n * 4 * mib:.2f} MiB)"
    )


if __name__ == "__main__":
    main()
