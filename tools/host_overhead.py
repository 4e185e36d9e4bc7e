"""Host time of one eager forward + backward call of the fused LoRA linear, kernels left out.

    python tools/host_overhead.py [--calls 1000] [--rounds 9]

On a tiny problem on the CPU (4×64 input, 32 outputs, r = 8, one thread) it times, per call (forward +
``torch.autograd.grad``):

* ``F.linear``: the floor any layer pays (autograd, one addmm each way);
* ``composite``: the same LoRA math as plain torch ops (what PEFT-style code costs on the host), without
  and with ``F.dropout(p=0.1)`` on the LoRA branch;
* ``FusedLoRALinear, torch backend``: our whole path (module, validation, dispatch, the autograd Function)
  on torch ops, without and with ``lora_dropout=0.1`` (training); the backend is set once around the timed
  calls (``use_backend``), as a user sets it once, not entered per call;
* ``FusedLoRALinear, triton backend, launches stubbed``: our whole path to the Triton backend with the call
  into Triton replaced by a no-op, so the number is our own Python only: validation, dispatch, plans,
  allocations, the per-launch bookkeeping. Triton's own launcher (argument binding, the driver call) comes
  on top on a GPU and is measured there (``benchmarks/gpu_run.sh``, phase ``overhead``).

Times are this thread's CPU time (``time.thread_time``), not wall time: on a machine shared with other
jobs, the time the thread waits for a core is left out (the caches and the core's other hyperthread are
still shared, so a loaded machine still reads somewhat slower). The rows are timed in interleaved rounds (every row once per round, in a rotating order), so a load that
comes and goes on a shared machine hits them alike; each row's figure is its median over the rounds, each
ratio the median of the per-round ratios to the composite of the same round. The last lines check issue
19's targets for the torch backend: within 1.15× of the composite, 1.30× with dropout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts CPU tensors; launches are stubbed

import torch
import torch.nn.functional as F

from lora_kernels import FusedLoRALinear, use_backend

#: Issue 19, item 3: our fwd+bwd against the same math as plain torch ops, without and with dropout.
TARGETS = {"FusedLoRALinear, torch backend": 1.15, "FusedLoRALinear, torch backend, dropout 0.1": 1.30}
DROPOUT = 0.1


def _time(step, calls: int, setting) -> float:
    with setting():  # the backend a row asks for, set once around its calls, as a user sets it once
        start = time.thread_time()  # CPU time of this thread: the time it waited for a core is not counted
        for _ in range(calls):
            step()
        return (time.thread_time() - start) / calls * 1e6


def measure(rows: list[tuple[str, object, object]], calls: int, rounds: int) -> dict[str, list[float]]:
    """µs per call of each row ``(name, step, setting)``, one sample per round, the rows interleaved (a
    rotating order)."""
    for _, step, setting in rows:
        _time(step, 50, setting)
    samples: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for round_ in range(rounds):
        for i in range(len(rows)):
            name, step, setting = rows[(i + round_) % len(rows)]
            samples[name].append(_time(step, calls, setting))
    return samples


def _stub_triton_launches():
    """Replace the call into Triton by a no-op; returns a function that restores it."""
    try:
        from lora_kernels.ops import triton_support as launcher
    except ImportError:  # older trees: the launch support was part of triton_lora
        from lora_kernels.ops import triton_lora as launcher

    if hasattr(launcher, "_call_kernel"):  # the single point where a launch reaches Triton
        name, stub = "_call_kernel", lambda *args, **kwargs: None
    else:  # older trees: the whole launcher, its bookkeeping included
        name, stub = "_launch", lambda kernel, grid_of, configs, args, constexprs: configs[0]
    real = getattr(launcher, name)
    setattr(launcher, name, stub)
    return lambda: setattr(launcher, name, real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per row and round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    w, b = torch.randn(32, 64), torch.randn(32)
    A = torch.randn(8, 64, requires_grad=True)
    B = torch.randn(32, 8, requires_grad=True)
    layers = {p: FusedLoRALinear(64, 32, r=8, lora_alpha=16, lora_dropout=p).train() for p in (0.0, DROPOUT)}
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B)

    def base():
        torch.autograd.grad(F.linear(x, w, b).sum(), [x])

    def composite(p):
        def step():
            x_lora = F.dropout(x, p, training=True) if p > 0.0 else x
            y = F.linear(x, w, b) + 2.0 * (x_lora @ A.t()) @ B.t()
            torch.autograd.grad(y.sum(), [x, A, B])

        return step

    def ours(p):
        layer = layers[p]

        def step():
            torch.autograd.grad(layer(x).sum(), [x, layer.lora_A, layer.lora_B])

        return step

    rows = [
        ("F.linear", base, contextlib.nullcontext),
        ("composite (torch ops)", composite(0.0), contextlib.nullcontext),
    ]
    rows.append((f"composite (torch ops), dropout {DROPOUT}", composite(DROPOUT), contextlib.nullcontext))
    for name, label in (("torch", "torch backend"), ("triton", "triton backend, launches stubbed")):
        setting = functools.partial(use_backend, name)
        rows.append((f"FusedLoRALinear, {label}", ours(0.0), setting))
        rows.append((f"FusedLoRALinear, {label}, dropout {DROPOUT}", ours(DROPOUT), setting))
    restore = _stub_triton_launches()
    try:
        samples = measure(rows, args.calls, args.rounds)
    finally:
        restore()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {args.rounds} interleaved rounds x {args.calls} calls, one thread, "
        f"load average {load:.1f}; µs of CPU time per fwd+bwd call (median), ratio to the composite (median of rounds):"
    )
    ratios = {}
    for name, _, _ in rows:
        reference = (
            f"composite (torch ops), dropout {DROPOUT}" if "dropout" in name else "composite (torch ops)"
        )
        ratios[name] = statistics.median(
            s / r for s, r in zip(samples[name], samples[reference], strict=True)
        )
        print(f"  {name:62s} {statistics.median(samples[name]):8.1f}  {ratios[name]:5.2f}x")
    for name, target in TARGETS.items():
        verdict = "met" if ratios[name] <= target else "NOT met"
        print(f"target: {name} <= {target:.2f}x the composite: {ratios[name]:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
