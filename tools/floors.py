"""Roofline floors of the LoRA cases in the tuning targets: what the hardware allows, before measuring.

    python tools/floors.py                 # measure this device's matmul rate and copy bandwidth, then print
    python tools/floors.py --tflops 700 --gbps 3000   # use given rates instead

For each case it counts the flops and the bytes that must move for the base GEMM(s) and for LoRA on top,
and prints the floor time of each (max of flops / matmul rate and bytes / copy bandwidth) and the
LoRA overhead: overlapped (the LoRA work hidden under the GEMM's bound, the best case) and serial (the
skinny kernels run after the GEMM at their own floor, what separate kernels cost). Launch latency
(several µs per extra kernel) is not counted: it dominates the decode case. The measured rates (bf16 matmul of 8192³, a 1 GiB device copy) are the
ones the GPU actually reaches, not the datasheet's. Counts assume W frozen, bf16 activations, fp32 t.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

ELEM = 2  # bytes per bf16 element


@dataclass
class Case:
    name: str
    M: int
    K: int  # in_features
    N: int  # out_features
    r: int
    backward: bool


CASES = [
    Case("fwd 4096x4096 M=8192", 8192, 4096, 4096, 16, False),
    Case("fwd+bwd 4096x4096 M=8192", 8192, 4096, 4096, 16, True),
    Case("decode fwd 4096x4096 M=16", 16, 4096, 4096, 16, False),
    *[
        Case(f"fwd+bwd {k}x{n} M={m} r={r}", m, k, n, r, True)
        for (k, n) in ((4096, 11008), (11008, 4096))
        for m in (4096, 16384)
        for r in (8, 64)
    ],
]


def counts(case: Case) -> dict[str, float]:
    """Flops and minimal bytes of the base and of base + LoRA (the LoRA term fused, as ours does)."""
    M, K, N, r = case.M, case.K, case.N, case.r
    base_flops = 2 * M * K * N
    base_bytes = (M * K + K * N + M * N) * ELEM  # read x, W; write y
    lora_flops = 2 * M * r * (K + N)  # x·Aᵀ and t·Bᵀ
    # a separate skinny kernel re-reads x; t (fp32) is written once and read back
    lora_bytes = M * K * ELEM + 2 * M * r * 4 + (K + N) * r * ELEM
    if case.backward:
        base_flops += 2 * M * N * K  # dX = dY·W
        base_bytes += (M * N + N * K + M * K) * ELEM  # read dY, W; write dX
        lora_flops += 2 * M * N * r + 2 * M * r * K + 2 * M * N * r + 2 * M * r * K  # dY·B, dt·A, dB, dA
        lora_bytes += 2 * M * N * ELEM + M * K * ELEM  # dY re-read for dY·B and dB, x re-read for dA
    return {
        "base_flops": base_flops,
        "base_bytes": base_bytes,
        "lora_flops": lora_flops,
        "lora_bytes": lora_bytes,
    }


def measure_rates(device: torch.device) -> tuple[float, float]:
    """(matmul TFLOP/s, copy GB/s counting read + write) measured on ``device``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    src = torch.empty(2**30 // 4 if device.type == "cuda" else 2**26 // 4, device=device)
    dst = torch.empty_like(src)

    def timed(fn, reps):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    mm = timed(lambda: a @ b, 20)
    copy = timed(lambda: dst.copy_(src), 20)
    return 2 * n**3 / mm / 1e12, 2 * src.numel() * 4 / copy / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, help="matmul rate to assume, TFLOP/s")
    parser.add_argument("--gbps", type=float, help="copy bandwidth to assume, GB/s")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tflops and args.gbps:
        tflops, gbps, source = args.tflops, args.gbps, "given"
    else:
        tflops, gbps = measure_rates(device)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        source = f"measured on {name}, torch {torch.__version__}"
    print(f"matmul {tflops:.0f} TFLOP/s, copy {gbps:.0f} GB/s ({source})\n")
    print(
        "| case | base floor ms (flops / bytes) | LoRA adds ms (flops / bytes) | overhead: overlapped | serial |"
    )
    print("| --- | --- | --- | --- | --- |")
    for case in CASES:
        c = counts(case)
        base_f, base_b = c["base_flops"] / tflops / 1e9, c["base_bytes"] / gbps / 1e6
        lora_f, lora_b = c["lora_flops"] / tflops / 1e9, c["lora_bytes"] / gbps / 1e6
        base = max(base_f, base_b)
        total = max(base_f + lora_f, base_b + lora_b)
        print(
            f"| {case.name} | {base:.3f} ({base_f:.3f} / {base_b:.3f}) | {lora_f:.4f} / {lora_b:.4f} "
            f"| {100 * (total / base - 1):.1f} % | {100 * (lora_f + lora_b) / base:.1f} % |"
        )


if __name__ == "__main__":
    main()
