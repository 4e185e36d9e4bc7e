"""The machine and the checks of a GPU visit: the environment (phase ``env``), the compute-sanitizer workload
(``sanitize``) and a training step of a small Llama-style model (``e2e``).

    python benchmarks/gpu_run.py env --work DIR        # (and sanitize, e2e), as benchmarks/gpu_run.sh calls them

Rows go to ``DIR/<phase>.jsonl`` as they are measured (:mod:`gpu_rows`).
"""

from __future__ import annotations

import copy
import statistics
import time
import traceback
from pathlib import Path

import torch

from lora_kernels import dora_linear, lora_linear, use_backend
from lora_kernels.dispatch import available_backends
from lora_kernels.testing import LLAMA_PROJECTIONS, tiny_llama

from gpu_rows import DEVICE, DRY, emit, error_text, machine, sync

# ----------------------------------------------------------------------------------------------- env


def phase_env(work: Path) -> None:
    """What the visit runs on (:func:`gpu_rows.machine`), one row of ``env.jsonl``."""
    emit(work / "env.jsonl", machine())


# ----------------------------------------------------------------------------------------------- sanitize


def sanitize_cases() -> list[tuple[torch.dtype, float, tuple[int, ...], bool]]:
    """``(dtype, dropout, leading dims, dora)`` run on each backend, on odd shapes (67 → 45, r = 5).

    Cut from 12 to 6 a backend to fit the visit's second call: bf16 keeps every kernel variant (dropout off
    and on, DoRA, a single row); fp32 (the TF32 specialisations) keeps the odd shape with dropout."""
    main = torch.float32 if DRY else torch.bfloat16
    cases = [(main, p, (3, 37), dora) for p in (0.0, 0.1) for dora in (False, True)]
    cases.append((main, 0.1, (1,), False))
    if not DRY:
        cases.append((torch.float32, 0.1, (3, 37), False))
    return cases


def phase_sanitize(work: Path) -> None:
    """One forward and backward of every kernel variant on odd shapes (``gpu_run.sh`` runs this under
    compute-sanitizer's memcheck)."""
    backends = [b for b in available_backends(DEVICE) if b != "torch"]
    for backend in backends:
        for dtype, dropout_p, lead, dora in sanitize_cases():
            row = {"backend": backend, "dtype": str(dtype), "dropout": dropout_p, "lead": lead, "dora": dora}
            try:
                x = torch.randn(*lead, 67, device=DEVICE, dtype=dtype, requires_grad=True)
                w = torch.randn(45, 67, device=DEVICE, dtype=dtype) / 8
                b = torch.randn(90, device=DEVICE, dtype=dtype)[::2]  # a strided bias
                A = (torch.randn(5, 67, device=DEVICE, dtype=dtype) / 8).requires_grad_()
                B = (torch.randn(45, 5, device=DEVICE, dtype=dtype) / 2).requires_grad_()
                m = (torch.rand(45, device=DEVICE, dtype=dtype) + 0.5).requires_grad_()
                with use_backend(backend):
                    if dora:
                        y = dora_linear(x, w, b, A, B, m, 2.0, dropout_p, True, dropout_seed=3)
                    else:
                        y = lora_linear(x, w, b, A, B, 2.0, dropout_p, training=True, dropout_seed=3)
                    y.float().square().sum().backward()
                sync()
                row["ok"] = bool(torch.isfinite(y).all())
            except Exception as err:
                row["error"] = error_text(err)
            emit(work / "sanitize.jsonl", row)
    print("sanitizer run done", flush=True)


# ----------------------------------------------------------------------------------------------- e2e


def phase_e2e(work: Path) -> None:
    """A training step of a small Llama-style model: PEFT against PEFT + ``lora_kernels.peft.fuse``."""
    from peft import LoraConfig, get_peft_model

    import lora_kernels.peft

    if DRY:
        dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
        dtype, batch, seq, vocab, steps = torch.float32, 2, 16, 128, 1
    else:
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        dtype, batch, seq, vocab, steps = torch.bfloat16, 4, 1024, 32000, 10
    torch.manual_seed(0)
    base = tiny_llama(**dims, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=max(seq, 64))
    base = base.to(DEVICE, dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    for use_dora, dropout_p in ((False, 0.0), (False, 0.05), (True, 0.05)):
        for variant in ("peft", "peft+fuse"):
            row = {"variant": variant, "dora": use_dora, "dropout": dropout_p, "layers": 2,
                   "hidden": dims["hidden_size"], "tokens": batch * seq, "r": 16, "dtype": str(dtype)}  # fmt: skip
            try:
                torch.manual_seed(1)
                model = get_peft_model(
                    copy.deepcopy(base),
                    LoraConfig(
                        r=16,
                        lora_alpha=32,
                        target_modules=LLAMA_PROJECTIONS,
                        lora_dropout=dropout_p,
                        use_dora=use_dora,
                    ),
                )
                with torch.no_grad():  # the same non-zero B in both variants, so the adapters do work
                    gen = torch.Generator().manual_seed(2)
                    for name, param in model.named_parameters():
                        if "lora_B" in name:
                            param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
                if variant == "peft+fuse":
                    row["fused_layers"] = lora_kernels.peft.fuse(model)
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)

                def step(model=model, opt=opt) -> float:
                    opt.zero_grad(set_to_none=True)
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    return loss.detach()

                row["first_loss"] = float(step())
                step()
                sync()
                if DEVICE.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
                row["step_ms"] = round(statistics.median(times), 2)
                if DEVICE.type == "cuda":
                    row["peak_above_model_MiB"] = round(
                        (torch.cuda.max_memory_allocated() - before) / 2**20, 1
                    )
                del model, opt, params
            except Exception as err:
                row["error"] = error_text(err)
                traceback.print_exc()
            emit(work / "e2e.jsonl", row)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
