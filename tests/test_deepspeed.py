"""DeepSpeed ZeRO-3 and ZeRO-2 on 2 CPU ranks (gloo, ``DS_ACCELERATOR=cpu``): the fused op runs, with
PEFT's losses.

Per stage, one spawn of the ranks trains each case three steps (each rank half of the batch):

* a PEFT model (LoRA, and DoRA) with PEFT's own forward, and the same after :func:`lora_kernels.peft.fuse`:
  the losses must be PEFT's and every LoRA layer must have run the fused op at every step (counted). Under
  ZeRO-3 every parameter is partitioned (persistence thresholds 0), so the fused layers read parameters
  that ZeRO-3 gathers for them (``register_external_parameter``); its hooks stay on;
* an :func:`lora_kernels.inject_lora` model (the same adapters as PEFT's): PEFT's losses;
* a PEFT model whose base layer has a user's forward hook: ``fuse`` falls back with its warning (PEFT's
  forward, PEFT's losses).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from torch import nn

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(name) for name in ("deepspeed", "peft")),
        reason="needs deepspeed and peft (pip install 'lora_kernels[deepspeed]')",
    ),
]

BATCH, DIM, STEPS = 8, 16, 3
CASES = ("peft", "peft-fused", "peft-dora", "peft-dora-fused", "inject", "peft-hooked")


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, 4))


def _model(case: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    import lora_kernels

    model = _base()
    if case == "inject":
        return lora_kernels.inject_lora(model, r"[02]", r=4, lora_alpha=8, init_lora_weights=False)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, use_dora="dora" in case
    )
    model = get_peft_model(model, config)
    if case == "peft-hooked":
        model.base_model.model[0].base_layer.register_forward_hook(lambda module, args, out: None)
    if case.endswith(("fused", "hooked")):
        lora_kernels.peft.fuse(model)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, 4, generator=g)


def _count_fused_calls() -> dict:
    """Count the fused ops' calls from PEFT layers and injected layers (patched in this rank's modules): the
    single op, DoRA's, and the grouped op (a PEFT layer whose base layer is called as a module)."""
    import lora_kernels.modules as modules
    import lora_kernels.peft as bridge

    counts = {"n": 0}
    patched = (
        (bridge, "lora_linear"),
        (bridge, "dora_linear"),
        (bridge, "multi_lora_linear"),
        (modules, "lora_linear"),
    )
    for module, name in patched:
        original = getattr(module, name)

        def counted(*args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(*args, **kwargs)

        setattr(module, name, counted)
    return counts


def _ds_worker(rank: int, world: int, stage: int) -> dict:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    from lora_kernels import use_backend

    counts = _count_fused_calls()
    config = {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_force_ds_cpu_optimizer": False,
        # ZeRO-3: partition every parameter, however small (the default keeps those under 1e5 elements whole)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
    }  # fmt: skip
    x, y = _data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for case in CASES:
        counts["n"] = 0
        with warnings.catch_warnings(record=True) as caught, use_backend("torch"):
            warnings.simplefilter("always")
            model = _model(case)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            losses = []
            for _ in range(STEPS):
                loss = nn.functional.mse_loss(engine(x[shard]), y[shard])
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            engine.destroy()
        mean = torch.tensor(losses)
        dist.all_reduce(mean)  # the whole batch's loss: the mean over the ranks' halves
        messages = [str(w.message) for w in caught if "lora_kernels" in str(w.message)]
        results[case] = {"loss": (mean / world).tolist(), "fused_calls": counts["n"], "warnings": messages}
    return results


@pytest.fixture(scope="module", params=[3, 2], ids=["zero3", "zero2"])
def ds_results(request) -> dict:
    return run_ranks(_ds_worker, 2, request.param)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fused_peft_layers_run_fused_with_peft_losses(ds_results, dora):
    peft, fused = (
        ds_results["peft-dora" if dora else "peft"],
        ds_results["peft-dora-fused" if dora else "peft-fused"],
    )
    assert peft["fused_calls"] == 0
    assert fused["fused_calls"] == 2 * STEPS, fused  # both LoRA layers, every step
    assert not fused["warnings"], fused["warnings"]
    torch.testing.assert_close(torch.tensor(fused["loss"]), torch.tensor(peft["loss"]), rtol=1e-5, atol=1e-6)


def test_injected_model_runs_fused_with_peft_losses(ds_results):
    """``inject_lora`` with ``init_lora_weights=False`` makes PEFT's adapters (same seeds, same init), so its
    losses under the engine are PEFT's under the engine (which differ from one process's by ~1e-3 at the
    third step under ZeRO-3, PEFT's as ours: the engine's optimizer path)."""
    got = ds_results["inject"]
    assert got["fused_calls"] == 2 * STEPS
    assert not got["warnings"], got["warnings"]
    torch.testing.assert_close(
        torch.tensor(got["loss"]), torch.tensor(ds_results["peft"]["loss"]), rtol=1e-5, atol=1e-6
    )


def test_a_hooked_base_runs_with_the_fused_terms(ds_results):
    """A user hook on one base layer: that layer's base is called as PEFT calls it (ZeRO gathers it), the
    grouped op adds the LoRA term; the other layer runs the single op. Both fused, PEFT's loss."""
    got, peft = ds_results["peft-hooked"], ds_results["peft"]
    assert got["fused_calls"] == 2 * STEPS
    assert not any("hooks" in message for message in got["warnings"]), got["warnings"]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(peft["loss"]), rtol=1e-5, atol=1e-6)
