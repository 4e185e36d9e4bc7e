"""Many adapters over one base (:func:`lora_kernels.multi_lora_linear`) against PEFT's mixed batch and a loop.

    python benchmarks/multi_adapter.py [--quick] [--out DIR]    # a table, JSON and a raw log

A mixed batch: ``x`` is ``(samples, rows / samples, K)``; the samples are cut into ``n`` equal runs of
consecutive whole samples, adapter ``a`` taking the ``a``-th run (its *segment*; equal segments of whole
samples, so that PEFT's per-sample ``adapter_names`` can express the same batch). Every adapter has rank
``r`` and ``scaling = 2``; fp32 on the CPU, bf16 on a GPU; a bias; no dropout (the providers would draw
different masks). Providers, all measured in the same run, each checked before it is timed against the
float64 result (output, and in ``fwd_bwd`` the gradients of ``x`` and of every adapter it trains) with the
test suite's tolerance for the dtype (:func:`lora_kernels.testing.assert_close`; weight gradients 2×):

| provider | what |
| --- | --- |
| ``fused`` | ``multi_lora_linear(..., segments=...)``: one base GEMM, the grouped terms |
| ``fused-ids`` | the same from a per-row ``adapter_ids`` tensor, samples shuffled (the gather path; its counts are read on the host: one sync a call on a GPU) |
| ``loop`` | ``lora_linear`` on each segment's samples, then ``torch.cat``: the best one writes with the single-adapter op |
| ``peft`` | PEFT's own mixed batch: ``get_peft_model`` on a one-``nn.Linear`` module, ``n`` adapters (``add_adapter``), called with ``adapter_names=`` per sample (``_mixed_batch_forward``) |
| ``single`` | one adapter on all rows (``lora_linear``): what the grouped op is held to (≤ 1.15× on a GPU) |
| ``base`` | ``F.linear`` alone: the floor |

``fwd`` runs under ``no_grad``; ``fwd_bwd`` is forward + ``torch.autograd.grad`` for ``x`` and every
adapter's ``A``, ``B`` (the base frozen), as ``harness.make_step``. PEFT runs in eval mode (it refuses
``adapter_names`` in training mode) with autograd on; without dropout that is the same math. ``vs_<provider>``:
a row's median (of :func:`harness.time_calls`) over that provider's, same case, same run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels import AdapterTerm, lora_linear, multi_lora_linear
from lora_kernels.testing import assert_close, relative_error

import harness

PROVIDERS = ["base", "single", "fused", "fused-ids", "loop", "peft"]
RATIOS_TO = ("base", "peft", "loop", "single")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_TARGET = 1.15  # the goal on a GPU: fused n-adapter time / single-adapter time at the same M


@dataclass(frozen=True)
class MultiCase:
    adapters: int
    rows: int  # M, all samples' tokens
    samples: int
    in_features: int
    out_features: int
    r: int
    dtype: str  # "fp32", "fp16", "bf16"
    mode: str  # "fwd" or "fwd_bwd"

    @property
    def label(self) -> str:
        shape = f"{self.in_features}x{self.out_features}"
        return f"{self.mode}-n{self.adapters}-M{self.rows}-{shape}-r{self.r}-{self.dtype}"


def cpu_cases(quick: bool = False) -> list[MultiCase]:
    """8 and 4 adapters, 8 samples x 256 tokens, 1024², r 16, fp32; ``quick``: tiny, fp32/fp16 (CI, --dry)."""
    if quick:
        return [MultiCase(4, 64, 8, 64, 48, 8, dt, m) for dt, m in (("fp32", "fwd_bwd"), ("fp16", "fwd"))]
    return [MultiCase(n, 2048, 8, 1024, 1024, 16, "fp32", m) for n in (8, 4) for m in ("fwd", "fwd_bwd")]


def gpu_cases(quick: bool = False) -> list[MultiCase]:
    """The issue's GPU cases: 4 and 8 adapters, M = 8192 (16 samples x 512 tokens), 4096², r = 16, bf16."""
    rows = 1024 if quick else 8192
    return [MultiCase(n, rows, 16, 4096, 4096, 16, "bf16", m) for n in (8, 4) for m in ("fwd", "fwd_bwd")]


class Problem:
    """A case's tensors: ``x (samples, seq, K)``, base, adapters, segments; float64 references (once)."""

    def __init__(self, case: MultiCase, device: torch.device) -> None:
        if case.samples % case.adapters:
            raise ValueError(f"{case.label}: samples do not split into {case.adapters} equal segments")
        g = torch.Generator(device=device).manual_seed(0)
        dtype = DTYPES[case.dtype]
        K, N, r, seq = case.in_features, case.out_features, case.r, case.rows // case.samples

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        self.case, self.device, self.dtype, self.train = case, device, dtype, case.mode == "fwd_bwd"
        self.x = rand(case.samples, seq, K)
        self.weight, self.bias = rand(N, K, scale=K**-0.5), rand(N)
        self.adapters = [(rand(r, K, scale=K**-0.5), rand(N, r, scale=r**-0.5)) for _ in range(case.adapters)]
        self.scaling = 2.0
        self.per = case.samples // case.adapters  # samples a segment
        self.names = [f"a{s // self.per}" for s in range(case.samples)]  # PEFT's adapter_names
        self.segments = [(a, self.per * seq) for a in range(case.adapters)]
        self.order = torch.randperm(case.samples, generator=g, device=device)  # fused-ids' sample order
        sample_ids = torch.arange(case.samples, device=device)[self.order] // self.per
        self.ids = sample_ids[:, None].expand(case.samples, seq).contiguous()  # per row
        self.grad = rand(case.samples, seq, N)
        self.grad_shuffled = self.grad[self.order]  # fused-ids' output is in that order too

    def grad_of(self, provider: str) -> torch.Tensor:
        return self.grad_shuffled if provider == "fused-ids" else self.grad

    @functools.cached_property
    def references(self) -> dict[str, list[torch.Tensor]]:
        """float64 ``[y, dx, dA_0, dB_0, ...]`` (only ``[y]`` in ``fwd``) of ``base``, ``single`` (adapter 0
        on every row) and the mixed batch (``mixed``: adapter ``a`` on segment ``a``)."""
        x = self.x.double().requires_grad_(self.train)
        W, b, s = self.weight.double(), self.bias.double(), self.scaling
        adapters = [(A.double().requires_grad_(self.train), B.double().requires_grad_(self.train))
                    for A, B in self.adapters]  # fmt: skip
        out, per = {}, self.per
        for kind in ("base", "single", "mixed"):
            used = {"base": [], "single": adapters[:1], "mixed": adapters}[kind]
            y = F.linear(x, W, b)
            if kind == "single":
                y = y + s * F.linear(F.linear(x, used[0][0]), used[0][1])
            elif kind == "mixed":  # segment a: samples [a·per, (a + 1)·per), adapter a's term alone
                segs = [x[a * per : (a + 1) * per] for a in range(len(used))]
                y = y + torch.cat(
                    [s * F.linear(F.linear(xa, A), B) for xa, (A, B) in zip(segs, used, strict=True)]
                )
            wrt = [x, *(t for pair in used for t in pair)]
            grads = torch.autograd.grad(y, wrt, self.grad.double()) if self.train else ()
            out[kind] = [y.detach(), *grads]
        return out


@functools.lru_cache(maxsize=1)
def _problem(case: MultiCase, device: torch.device) -> Problem:
    """The last case's problem: a table measures every provider of a case in a row."""
    return Problem(case, device)


def _peft_model(problem: Problem) -> tuple[nn.Module, list[torch.Tensor]]:
    """PEFT's ``LoraModel`` over a one-``nn.Linear`` module with ``n`` adapters ``a0``, ``a1``, ... holding
    the problem's weights; returns it with its trained parameters ``[A_0, B_0, A_1, ...]``."""
    import peft

    linear = nn.Linear(*problem.weight.shape[::-1], device=problem.device, dtype=problem.dtype)
    with torch.no_grad():
        linear.weight.copy_(problem.weight)
        linear.bias.copy_(problem.bias)
    r = problem.case.r
    config = peft.LoraConfig(r=r, lora_alpha=problem.scaling * r, target_modules=["0"], lora_dropout=0.0)
    model = peft.get_peft_model(nn.Sequential(linear), config, adapter_name="a0")
    for a in range(1, problem.case.adapters):
        model.add_adapter(f"a{a}", copy.deepcopy(config))
    model.to(problem.device, problem.dtype)  # PEFT keeps adapters in fp32 on a half base: same dtype for all
    model.requires_grad_(False)
    layer, trained = model.base_model.model[0], []
    with torch.no_grad():
        for a, (A, B) in enumerate(problem.adapters):
            for module, value in ((layer.lora_A[f"a{a}"], A), (layer.lora_B[f"a{a}"], B)):
                trained.append(module.weight.copy_(value).requires_grad_(problem.train))
    if abs(layer.scaling["a0"] - problem.scaling) > 1e-12:
        raise AssertionError(f"PEFT scaling {layer.scaling['a0']} != {problem.scaling}")
    return model.eval(), trained


def make_call(provider: str, problem: Problem):
    """``(call, wrt)``: a function running ``provider`` once and returning its output, and the tensors it
    trains in ``fwd_bwd`` (``x`` first, then ``A_a``, ``B_a`` of the adapters it uses, in order)."""
    train = problem.train
    x = (problem.x[problem.order] if provider == "fused-ids" else problem.x).detach().requires_grad_(train)
    pairs = [
        (A.detach().requires_grad_(train), B.detach().requires_grad_(train)) for A, B in problem.adapters
    ]
    flat = [t for pair in pairs for t in pair]
    W, b, s, per = problem.weight, problem.bias, problem.scaling, problem.per
    terms = [AdapterTerm(A, B, s) for A, B in pairs]
    if provider == "base":
        return (lambda: F.linear(x, W, b)), [x]
    if provider == "single":
        A, B = pairs[0]
        return (lambda: lora_linear(x, W, b, A, B, s)), [x, A, B]
    if provider == "fused":
        return (lambda: multi_lora_linear(x, W, b, terms, segments=problem.segments)), [x, *flat]
    if provider == "fused-ids":
        return (lambda: multi_lora_linear(x, W, b, terms, adapter_ids=problem.ids)), [x, *flat]
    if provider == "loop":

        def loop():
            return torch.cat(
                [lora_linear(x[a * per : (a + 1) * per], W, b, A, B, s) for a, (A, B) in enumerate(pairs)]
            )

        return loop, [x, *flat]
    if provider == "peft":
        model, trained = _peft_model(problem)
        return (lambda: model(x, adapter_names=problem.names)), [x, *trained]
    raise ValueError(f"unknown provider {provider!r}")


def check(provider: str, problem: Problem, call, wrt) -> float:
    """Output (and ``fwd_bwd`` gradients) against float64 with the dtype's tolerance (``AssertionError``
    beyond it); returns the largest relative error."""
    kind = provider if provider in ("base", "single") else "mixed"
    expected = list(problem.references[kind])
    if provider == "fused-ids":  # its samples are in problem.order: so are its output and dx
        expected[:2] = [t[problem.order] for t in expected[:2]]
    if problem.train:
        y = call()
        actual = [y, *torch.autograd.grad(y, wrt, problem.grad_of(provider))]
    else:
        with torch.no_grad():
            actual = [call()]
    names = ["y", "dx", *(f"d{c}_{a}" for a in range(problem.case.adapters) for c in "AB")]
    for i, (got, ref) in enumerate(zip(actual, expected, strict=True)):  # weight gradients: 2x the tolerance
        assert_close(got, ref, problem.dtype, f"{provider}, {problem.case.label}: {names[i]}", 1 + (i > 1))
    return max(relative_error(got, ref) for got, ref in zip(actual, expected, strict=True))


def measure(provider: str, case: MultiCase, device: torch.device, quick: bool = False, timed: bool = True):
    """One row: the check, then :func:`harness.time_calls` of one call (forward, or forward + backward)."""
    base_row = {"provider": provider, **asdict(case), "label": case.label}
    if provider == "peft" and harness.peft_import_error():
        return {**base_row, "skipped": harness.peft_import_error()}
    problem = _problem(case, device)
    call, wrt = make_call(provider, problem)
    grad = problem.grad_of(provider)
    row = {**base_row, "max_rel_error": check(provider, problem, call, wrt)}

    def step():
        if problem.train:
            torch.autograd.grad(call(), wrt, grad)
        else:
            with torch.no_grad():
                call()

    if timed:
        times = harness.time_calls(step, device, quick=quick)
        row.update(median_ms=statistics.median(times), calls=len(times), times_ms=times)
    else:
        step()
        row.update(median_ms=None, calls=1, times_ms=[])
    return row


def add_ratios(rows: list[dict]) -> None:
    """``vs_<provider>``: this row's median over that provider's in the same case (< 1: faster)."""
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("median_ms"):
            by_case.setdefault(row["label"], {})[row["provider"]] = row["median_ms"]
    for row in rows:
        medians = by_case.get(row.get("label"), {})
        for other in RATIOS_TO:
            ok = row.get("median_ms") and other in medians
            row[f"vs_{other}"] = row["median_ms"] / medians[other] if ok else None


def table(rows: list[dict]) -> str:
    """Markdown: a row per case × provider, then the grouped op against the issue's target."""
    lines = [
        "| case | provider | median ms | calls | ÷ base | ÷ peft | ÷ loop | ÷ single | max rel. error |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def fmt(value, spec=".3f"):
        return "–" if value is None else format(value, spec)

    for row in rows:
        ratios = " | ".join(fmt(row.get(f"vs_{other}"), ".2f") for other in RATIOS_TO)
        median = row.get("skipped") or row.get("error") or fmt(row.get("median_ms"), ".2f")
        lines.append(f"| {row['label']} | {row['provider']} | {median} | {row.get('calls', '–')} | {ratios} | "
                     f"{fmt(row.get('max_rel_error'), '.1e')} |")  # fmt: skip
    fused = [r for r in rows if r["provider"] == "fused" and r.get("vs_single")]
    if fused:
        lines += ["", f"`fused` ÷ `single` (the issue's GPU target: ≤ {SINGLE_TARGET}×):"]
        lines += [f"- {r['label']}: {r['vs_single']:.2f}×, ÷ peft {fmt(r.get('vs_peft'), '.2f')}, "
                  f"÷ loop {fmt(r.get('vs_loop'), '.2f')}" for r in fused]  # fmt: skip
    return "\n".join(lines)


def run(cases: list[MultiCase], device: torch.device, quick: bool = False, log: list | None = None) -> list:
    """Every case × provider, then the ratios; each row's line is printed and appended to ``log``."""
    rows, log = [], [] if log is None else log
    for case in cases:
        for provider in PROVIDERS:
            row = measure(provider, case, device, quick=quick)
            times = row.get("times_ms") or []
            log.append(f"{case.label} {provider}: median {row.get('median_ms')} ms over {len(times)} calls, "
                       f"max rel. error {row.get('max_rel_error')}, per call {[round(t, 3) for t in times]}"
                       + (f"; skipped: {row['skipped']}" if "skipped" in row else ""))  # fmt: skip
            print(log[-1], flush=True)
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
    command = " ".join(["python benchmarks/multi_adapter.py", *(sys.argv[1:] if argv is None else argv)])
    notes = [f"{time.strftime('%Y-%m-%d %H:%M')}: `{command}`"]
    if device.type == "cpu":
        notes.append("CPU: ours is the torch backend (Triton on the CPU is the interpreter, no measurement)")
    load = lambda: (
        harness.cpu_load_note() or f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    notes.append(f"at the start, {load()}")
    env = {"device": harness.device_name(device), "versions": harness.versions(), "notes": notes}
    log_lines = [f"device: {env['device']}", f"versions: {env['versions']}", *notes]
    print("\n".join(log_lines), flush=True)
    start = time.time()
    rows = run(cases, device, args.quick, log_lines)
    notes.append(f"{len(rows)} rows in {time.time() - start:.0f} s")
    notes.append(f"at the end, {load()}")
    text = "\n".join([
        f"# Many adapters over one base: the grouped op against PEFT's mixed batch ({env['device']})",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".",
        "",
        *(f"- {note}" for note in notes),
        "",
        "`x` (samples, M / samples, in) in n equal segments of whole samples; `median ms`: one call; "
        "`÷ X`: over provider X's median, same case and run (< 1: faster). See `benchmarks/multi_adapter.py`.",
        "",
        table(rows),
        "",
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multi_adapter.md").write_text(text)
        payload = json.dumps({"environment": env, "results": rows}, indent=1)
        (args.out / "multi_adapter.json").write_text(payload + "\n")
        (args.out / "multi_adapter.log").write_text("\n".join(log_lines) + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
