"""Many adapters over one base (:func:`lora_kernels.multi_lora_linear`) against PEFT's mixed batch and a loop.

    python benchmarks/multi_adapter.py [--quick] [--out DIR]    # a table, JSON and a raw log

A mixed batch: ``samples`` samples of ``rows / samples`` tokens, adapter ``a`` taking the ``a``-th run of
``samples / n`` consecutive samples (a segment), every adapter of rank ``r``, fp32 on the CPU, bf16 on a GPU.
Providers, all measured in the same run, each checked against float64 before it is timed:

| provider | what |
| --- | --- |
| ``fused`` | ``multi_lora_linear(..., segments=...)``: one base GEMM, the grouped terms |
| ``fused-ids`` | the same from a per-row ``adapter_ids`` tensor, samples shuffled (the gather path, a host sync) |
| ``loop`` | ``lora_linear`` on each segment, then ``torch.cat``: what one writes with the single-adapter op |
| ``peft`` | PEFT's own mixed batch: a ``LoraModel`` over one ``nn.Linear`` with ``n`` adapters, ``adapter_names=`` |
| ``single`` | one adapter on all rows (``lora_linear``): the time the grouped op is held to (≤ 1.15×, GPU goal) |
| ``base`` | ``F.linear`` alone: the floor |

``fwd_bwd`` trains every adapter and ``x``, base frozen; PEFT runs in eval mode (it refuses ``adapter_names``
in training mode), with autograd on, and no dropout anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels import AdapterTerm, lora_linear, multi_lora_linear
from lora_kernels.testing import TOLERANCE, relative_error

import harness

PROVIDERS = ["base", "single", "fused", "fused-ids", "loop", "peft"]


@dataclass(frozen=True)
class MultiCase:
    adapters: int
    rows: int
    samples: int
    in_features: int
    out_features: int
    r: int
    dtype: str
    mode: str  # "fwd" or "fwd_bwd"

    @property
    def label(self) -> str:
        return f"{self.mode}-n{self.adapters}-M{self.rows}-{self.in_features}x{self.out_features}-r{self.r}-{self.dtype}"


def cpu_cases(quick: bool = False) -> list[MultiCase]:
    if quick:
        return [MultiCase(4, 64, 8, 64, 48, 8, "float32", mode) for mode in ("fwd", "fwd_bwd")]
    return [MultiCase(n, 2048, 8, 1024, 1024, 16, "float32", m) for n in (8, 4) for m in ("fwd", "fwd_bwd")]


def gpu_cases(quick: bool = False) -> list[MultiCase]:
    """The issue's GPU cases: 4 and 8 adapters, M = 8192 in segments, 4096², r = 16, bf16."""
    rows = 1024 if quick else 8192
    return [MultiCase(n, rows, 16, 4096, 4096, 16, "bfloat16", m) for n in (8, 4) for m in ("fwd", "fwd_bwd")]


class Problem:
    """The tensors of a case: ``x (samples, seq, K)``, the base, ``n`` adapters, the segments."""

    def __init__(self, case: MultiCase, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        dtype = getattr(torch, case.dtype)
        K, N, r = case.in_features, case.out_features, case.r

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.case, self.device, self.dtype = case, device, dtype
        self.x = rand(case.samples, case.rows // case.samples, K)
        self.weight, self.bias = rand(N, K, scale=K**-0.5), rand(N)
        self.adapters = [(rand(r, K, scale=K**-0.5), rand(N, r, scale=0.1)) for _ in range(case.adapters)]
        self.scaling = 2.0
        per = case.samples // case.adapters
        self.names = [f"a{min(s // per, case.adapters - 1)}" for s in range(case.samples)]
        seq = case.rows // case.samples
        counts = [self.names.count(f"a{a}") * seq for a in range(case.adapters)]
        self.segments = list(enumerate(counts))
        self.order = order = torch.randperm(case.samples, generator=g)
        self.shuffled = [self.names[i] for i in order]
        self.x_shuffled = self.x[order].contiguous()
        ids = torch.tensor([int(n[1:]) for n in self.shuffled]).repeat_interleave(seq)
        self.ids = ids.reshape(case.samples, seq).to(device)
        self.grad = rand(case.samples, seq, N)

    def reference(self) -> torch.Tensor:
        """float64: each adapter on its segment."""
        x = self.x.double().reshape(-1, self.x.shape[-1])
        y = F.linear(x, self.weight.double(), self.bias.double())
        start = 0
        for (A, B), (_, count) in zip(self.adapters, self.segments, strict=True):
            rows = slice(start, start + count)
            y[rows] += self.scaling * (x[rows] @ A.double().t()) @ B.double().t()
            start += count
        return y.reshape(*self.x.shape[:-1], -1)


def _leaves(problem: Problem, provider: str):
    """Fresh leaves that train: ``x`` and the adapters (``fwd_bwd``)."""
    train = problem.case.mode == "fwd_bwd"
    x = (problem.x_shuffled if provider == "fused-ids" else problem.x).detach().requires_grad_(train)
    adapters = [
        (A.detach().requires_grad_(train), B.detach().requires_grad_(train)) for A, B in problem.adapters
    ]
    return x, adapters


def _peft_model(problem: Problem) -> nn.Module:
    import peft

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(problem.x.shape[-1], problem.weight.shape[0], device=problem.device,
                                  dtype=problem.dtype)  # fmt: skip

        def forward(self, x):
            return self.proj(x)

    base = One()
    with torch.no_grad():
        base.proj.weight.copy_(problem.weight)
        base.proj.bias.copy_(problem.bias)
    r = problem.case.r
    config = peft.LoraConfig(r=r, lora_alpha=problem.scaling * r, target_modules=["proj"])
    model = peft.get_peft_model(base, config, adapter_name="a0")
    for a in range(1, problem.case.adapters):
        model.add_adapter(f"a{a}", copy.deepcopy(config))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for a, (A, B) in enumerate(problem.adapters):
            layer.lora_A[f"a{a}"].weight.copy_(A)
            layer.lora_B[f"a{a}"].weight.copy_(B)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and problem.case.mode == "fwd_bwd")
    return model.to(problem.device, problem.dtype).eval()


def make_call(provider: str, problem: Problem):
    """A function running ``provider`` once, returning its output (in ``problem.x``'s sample order)."""
    x, adapters = _leaves(problem, provider)
    W, b, s = problem.weight, problem.bias, problem.scaling
    terms = [AdapterTerm(A, B, s) for A, B in adapters]
    if provider == "base":
        return lambda: F.linear(x, W, b)
    if provider == "single":
        A, B = adapters[0]
        return lambda: lora_linear(x, W, b, A, B, s)
    if provider == "fused":
        return lambda: multi_lora_linear(x, W, b, terms, segments=problem.segments)
    if provider == "fused-ids":
        return lambda: multi_lora_linear(x, W, b, terms, adapter_ids=problem.ids)
    if provider == "loop":
        per = problem.case.samples // problem.case.adapters

        def loop():
            outs = [
                lora_linear(x[a * per : (a + 1) * per if a < len(adapters) - 1 else None], W, b, A, B, s)
                for a, (A, B) in enumerate(adapters)
            ]
            return torch.cat(outs)

        return loop
    if provider == "peft":
        model = _peft_model(problem)
        return lambda: model(x, adapter_names=problem.names)
    raise ValueError(f"unknown provider {provider!r}")


def check(provider: str, problem: Problem) -> float | None:
    """The relative error of ``provider``'s output against float64 (``base``/``single`` compute other math)."""
    if provider in ("base", "single"):
        return None
    with torch.no_grad():
        y = make_call(provider, problem)()
    ref = problem.reference()
    if provider == "fused-ids":  # its input is the samples in problem.order
        ref = ref[problem.order.to(ref.device)]
    error = relative_error(y, ref)
    if error > 10 * TOLERANCE[problem.dtype]:
        raise AssertionError(f"{provider} on {problem.case.label}: relative error {error:.2e}")
    return error


def make_step(provider: str, problem: Problem):
    call = make_call(provider, problem)
    if problem.case.mode == "fwd":
        return lambda: call()

    def step():
        call().backward(problem.grad)

    return step


def measure(provider: str, case: MultiCase, device: torch.device, quick: bool = False, timed: bool = True):
    """One row: the check, then :func:`harness.time_calls` of one call (forward, or forward + backward)."""
    if provider == "peft" and harness.peft_import_error():
        return {"provider": provider, **asdict(case), "skipped": harness.peft_import_error()}
    problem = Problem(case, device)
    row = {
        "provider": provider,
        **asdict(case),
        "label": case.label,
        "max_rel_error": check(provider, problem),
    }
    step = make_step(provider, problem)
    if timed:
        times = harness.time_calls(step, device, quick=quick)
        row.update(median_ms=statistics.median(times), times_ms=times)
    else:
        step()
        row.update(median_ms=None, times_ms=[])
    return row


def add_ratios(rows: list[dict]) -> None:
    """``vs_<provider>``: this row's median over that provider's in the same case (< 1: faster)."""
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("median_ms"):
            by_case.setdefault(row["label"], {})[row["provider"]] = row["median_ms"]
    for row in rows:
        medians = by_case.get(row.get("label"), {})
        for other in ("peft", "loop", "single", "base"):
            if row.get("median_ms") and other in medians:
                row[f"vs_{other}"] = row["median_ms"] / medians[other]


def table(rows: list[dict]) -> str:
    lines = [
        "| case | provider | median ms | ÷ peft | ÷ loop | ÷ single | max rel. error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(value, spec=".3f"):
        return "" if value is None else format(value, spec)

    for row in rows:
        lines.append(
            f"| {row['label']} | {row['provider']} | {fmt(row.get('median_ms'), '.2f')} | {fmt(row.get('vs_peft'))} | "
            f"{fmt(row.get('vs_loop'))} | {fmt(row.get('vs_single'))} | {fmt(row.get('max_rel_error'), '.1e')} |"
        )
    return "\n".join(lines)


def run(cases: list[MultiCase], device: torch.device, quick: bool = False, log=print) -> list[dict]:
    rows = []
    for case in cases:
        for provider in PROVIDERS:
            row = measure(provider, case, device, quick=quick)
            log(f"{case.label} {provider}: {row.get('median_ms')} ms")
            rows.append(row)
    add_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny cases, short timing (a smoke run)")
    parser.add_argument("--out", type=Path, help="folder for multi_adapter.{md,json,log}")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = gpu_cases(args.quick) if device.type == "cuda" else cpu_cases(args.quick)
    log_lines: list[str] = []

    def log(line: str) -> None:
        log_lines.append(line)
        print(line, flush=True)

    start = time.time()
    rows = run(cases, device, args.quick, log)
    header = [
        "# Many adapters over one base: the grouped op against PEFT's mixed batch",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, `python benchmarks/multi_adapter.py{' --quick' if args.quick else ''}`, "
        f"{time.time() - start:.0f} s. Device: {harness.device_name(device)}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items()) + ".",
    ]
    if note := harness.cpu_load_note():
        header.append(f"Note: {note}.")
    text = "\n".join([*header, "", table(rows), ""])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multi_adapter.md").write_text(text)
        (args.out / "multi_adapter.json").write_text(json.dumps(rows, indent=1))
        (args.out / "multi_adapter.log").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
