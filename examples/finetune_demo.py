"""LoRA fine-tuning of a small causal LM on the fused op, next to PEFT (``bash scripts/demo.sh`` runs it).

A tiny Llama (built from a config: nothing is downloaded) gets rank-8 adapters on every projection
(``q/k/v/o_proj``, ``gate/up/down_proj``) through :func:`lora_kernels.inject_lora` and learns a small
character-level corpus bundled below. The demo prints the backend, a progress bar with the loss going
down, the parity of FusedLoRALinear against the float64 reference and of the whole model against PEFT,
and the time per training step and saved-activation memory of both, from the same initialisation.

Run: ``python examples/finetune_demo.py [--steps N] [--quick] [--backend {auto,triton,cuda,torch}]
[--no-peft]`` (``--quick``: a few steps, for tests). Needs ``transformers`` (and ``peft`` for the
comparison: ``pip install 'lora_kernels[peft]'``; ``tqdm`` for a progress bar); without them it says so
and exits cleanly.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from lora_kernels import inject_lora, lora_linear_reference, use_backend
from lora_kernels.dispatch import select_backend
from lora_kernels.inject import lora_layers
from lora_kernels.quant4bit import quiet_bitsandbytes_cpu_notice
from lora_kernels.testing import LLAMA_PROJECTIONS as TARGETS
from lora_kernels.testing import SavedTensorCounter, assert_close, relative_error, tiny_llama

CORPUS = """\
A kernel is a small program that runs many times at once. The fused LoRA kernel computes the frozen
projection and the low-rank update in one pass, so the adapter costs almost nothing on top of the base
layer. The frozen weight stays where it is; only two thin matrices learn. The first matrix squeezes the
input down to a few numbers per token, the second spreads them back out, and their product nudges the
output of the layer toward the new task. Training touches a tiny fraction of the parameters, yet the
model changes its mind about what comes next. Dropout on the adapter input is drawn from a counter based
generator, so the backward pass can rebuild the mask instead of storing it. The reference implementation
is written op by op in plain PyTorch and every kernel is checked against it in double precision.
"""


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=True, dynamic_ncols=True)


def _write(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message)
    except ImportError:
        print(message)


class _Chars:
    """A character-level tokenizer over the bundled corpus."""

    def __init__(self, text: str) -> None:
        self.vocab = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.vocab)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)


def _batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def _step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(model, ids, device, steps: int) -> tuple[float, int, int | None]:
    """Median seconds per training step, saved-activation bytes of one step, CUDA peak bytes (or None)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _step(model, opt, ids)  # warm-up
    with SavedTensorCounter(known=model.parameters()) as saved:
        model(input_ids=ids, labels=ids).loss.backward()
    opt.zero_grad(set_to_none=True)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        _step(model, opt, ids)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return statistics.median(times), saved.activation_bytes, peak


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/finetune_demo.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--quick", action="store_true", help="a short run: 6 steps, 2 timed steps")
    parser.add_argument("--backend", default="auto", help="auto (default), triton, cuda or torch")
    parser.add_argument("--no-peft", action="store_true", help="skip the comparison with PEFT")
    args = parser.parse_args(argv)
    steps = 6 if args.quick else args.steps
    timed_steps = 2 if args.quick else 10

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices
    quiet_bitsandbytes_cpu_notice()  # a network notice of bitsandbytes' CPU backend, imported by peft
    try:
        import transformers  # noqa: F401  (tiny_llama builds the model from it)
    except ImportError:
        print(
            "The demo fine-tunes a small Llama from `transformers`, which is not installed.\n"
            "Install it with `pip install transformers` (or `pip install lora_kernels[peft]`), then rerun."
        )
        return 0
    peft = None
    if not args.no_peft:
        try:
            import peft
        except ImportError:
            print("`peft` is not installed: the comparison with PEFT is skipped (pip install peft).")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    with use_backend(args.backend):
        backend = select_backend(device, dtype)
    print(f"device: {device} | dtype: {dtype} | lora_kernels backend: {backend} | torch {torch.__version__}")

    torch.manual_seed(0)
    chars = _Chars(CORPUS)
    data = chars.encode(CORPUS)
    base = tiny_llama(
        hidden_size=128, intermediate_size=256, vocab_size=len(chars.vocab), max_position_embeddings=256
    ).to(device)
    config = base.config
    model = inject_lora(copy.deepcopy(base), TARGETS, r=8, lora_alpha=16, lora_dropout=args.dropout).train()
    with torch.no_grad():  # a small non-zero B, so the comparisons below exercise the adapter path
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=1e-3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size} "
        f"(characters) | {len(lora_layers(model))} FusedLoRALinear (r=8, alpha=16, dropout {args.dropout:g}) | "
        f"trainable {trainable:,} "
        f"of {total:,} parameters ({100 * trainable / total:.1f} %)"
    )

    batches = _batches(data.to(device), batch=8, seq=64, generator=torch.Generator().manual_seed(0))
    bench_ids = next(batches).to(device)
    peft_model = None
    if peft is not None:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=args.dropout)
        peft_model = get_peft_model(copy.deepcopy(base), peft_config).train()
        with torch.no_grad():  # the same initial adapters
            for name, layer in lora_layers(model).items():
                peft_layer = peft_model.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B)

    ok = True
    with use_backend(args.backend):
        if peft_model is not None:
            print("\n1) same initialisation: fused model vs PEFT (logits in eval mode, steps in train mode)")
            with torch.no_grad():
                ours = model.eval()(input_ids=bench_ids).logits
                theirs = peft_model.eval()(input_ids=bench_ids).logits
            model.train(), peft_model.train()
            err = (ours - theirs).abs().max().item()
            ok &= err < 1e-3
            print(f"   logits max abs difference: {err:.2e}")
            ours_t, ours_saved, ours_peak = _measure(copy.deepcopy(model), bench_ids, device, timed_steps)
            peft_t, peft_saved, peft_peak = _measure(
                copy.deepcopy(peft_model), bench_ids, device, timed_steps
            )
            print(f"   {'':24}{'lora_kernels':>16}{'PEFT':>16}{'PEFT ÷ ours':>13}")
            print(
                f"   {'time per train step':24}{ours_t * 1e3:>13.1f} ms{peft_t * 1e3:>13.1f} ms"
                f"{peft_t / ours_t:>9.2f}x"
            )
            print(
                f"   {'saved activations':24}{_mib(ours_saved):>16}{_mib(peft_saved):>16}"
                f"{peft_saved / ours_saved:>9.2f}x"
            )
            if device.type == "cuda":
                print(f"   {'peak CUDA memory':24}{_mib(ours_peak):>16}{_mib(peft_peak):>16}")
            else:
                print("   (peak memory is measured on CUDA only; saved activations are what backward keeps)")

        print(f"\n2) fine-tune the adapters for {steps} steps (AdamW, lr 5e-3, batch 8 x 64 characters)")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        losses = []
        start = time.perf_counter()
        report_every = max(1, steps // 6)
        for step in _progress(range(steps), steps, "fine-tune"):
            losses.append(_step(model, opt, next(batches).to(device)))
            if step % report_every == 0 or step == steps - 1:
                _write(f"   step {step:4d}  loss {losses[-1]:.4f}")
        elapsed = time.perf_counter() - start
        print(f"   {steps} steps in {elapsed:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if steps >= 20:
            ok &= statistics.mean(losses[-5:]) < statistics.mean(losses[:5])

        print("\n3) parity of a trained FusedLoRALinear against the float64 reference")
        model.eval()
        name, layer = next(iter(lora_layers(model).items()))
        h = torch.randn(64, layer.in_features, device=device)
        with torch.no_grad():
            ref = lora_linear_reference(
                h, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, upcast=True
            )
            y = layer(h)
        try:  # the tolerance the test suite uses for this dtype
            assert_close(y, ref, y.dtype, name)
            verdict = "within"
        except AssertionError:
            ok, verdict = False, "OUTSIDE"
        print(
            f"   {name}: max relative error {relative_error(y, ref):.2e} ({verdict} the {y.dtype} tolerance)"
        )

        if peft is not None:
            import lora_kernels.peft as lk_peft

            directory = tempfile.mkdtemp(prefix="lora_demo_")
            lk_peft.save_adapter(model, directory)
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
            with torch.no_grad():
                err = (
                    (model(input_ids=bench_ids).logits - loaded(input_ids=bench_ids).logits)
                    .abs()
                    .max()
                    .item()
                )
            ok &= err < 1e-3
            print(
                f"   trained adapters saved in PEFT format ({directory}) and reloaded by PEFT: logits max diff {err:.2e}"
            )
    print("\ndemo " + ("finished: all checks passed" if ok else "FAILED a check"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
