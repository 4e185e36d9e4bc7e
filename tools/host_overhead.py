"""Host time of one eager forward + backward call of the fused LoRA linear, kernels left out.

    python tools/host_overhead.py [--calls 2000]

On a tiny problem on the CPU it times, per call (forward + ``torch.autograd.grad``):

* ``F.linear``: the floor any layer pays (autograd, one addmm each way);
* ``composite``: the same LoRA math as plain torch ops (what PEFT-style code costs on the host);
* ``torch backend``: our whole path (validation, dispatch, the autograd Function) on torch ops;
* ``triton backend, launches stubbed``: our whole path to the Triton backend with every kernel launch
  replaced by a no-op, so the number is our own Python only: validation, dispatch, plans, allocations.
  Triton's own launcher (argument binding, the driver call) comes on top on a GPU and is measured there
  (``benchmarks/gpu_run.sh``, phase ``overhead``).

Medians of 5 repeats. CPU times on a shared machine are noisy; compare lines of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts CPU tensors; launches are stubbed

import torch
import torch.nn.functional as F

from lora_kernels import lora_linear, use_backend


def per_call_us(step, calls: int) -> float:
    for _ in range(50):
        step()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 64, requires_grad=True)
    w, b = torch.randn(32, 64), torch.randn(32)
    A = torch.randn(8, 64, requires_grad=True)
    B = torch.randn(32, 8, requires_grad=True)

    def base():
        torch.autograd.grad(F.linear(x, w, b).sum(), [x])

    def composite():
        y = F.linear(x, w, b) + 2.0 * (x @ A.t()) @ B.t()
        torch.autograd.grad(y.sum(), [x, A, B])

    def ours(name):
        def step():
            with use_backend(name):
                y = lora_linear(x, w, b, A, B, 2.0)
            torch.autograd.grad(y.sum(), [x, A, B])

        return step

    rows = [("F.linear", base), ("composite (torch ops)", composite), ("torch backend", ours("torch"))]
    from lora_kernels.ops import triton_lora

    real_launch = triton_lora._launch
    triton_lora._launch = lambda kernel, grid_of, configs, args, constexprs: configs[0]
    try:
        rows.append(("triton backend, launches stubbed", ours("triton")))
        print(f"torch {torch.__version__}, {args.calls} calls x 5, one thread; µs per fwd+bwd call:")
        for name, step in rows:
            print(f"  {name:34s} {per_call_us(step, args.calls):8.1f}")
    finally:
        triton_lora._launch = real_launch


if __name__ == "__main__":
    main()
