"""What the fused LoRA linear keeps for backward, counted with ``saved_tensors_hooks``.

Our autograd must keep nothing of size M×N, no M×K tensor other than ``x`` itself (same storage), and
nothing for the dropout mask (regenerated from its seed in backward). PEFT with dropout saves the dropped
copy of ``x`` and the mask; comparing against it shows the counter can tell the difference, so these
assertions can fail. Ours runs on every backend (the ``backend`` fixture of conftest.py, each on its
device); PEFT on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_kernels import lora_linear, use_backend
from lora_kernels.testing import SavedTensorCounter

# Distinct sizes so that M×N, M×K, M×r and the weights cannot be confused: x is (3, 37, K), M = 111.
LEAD, K, N, R = (3, 37), 96, 80, 6
M = LEAD[0] * LEAD[1]


def _tensors(dtype=torch.float32, device="cpu"):
    x = torch.randn(*LEAD, K, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(N, K, dtype=dtype, device=device) * K**-0.5
    bias = torch.randn(N, dtype=dtype, device=device)
    lora_A = (torch.randn(R, K, dtype=dtype, device=device) * K**-0.5).requires_grad_()
    lora_B = (torch.randn(N, R, dtype=dtype, device=device) * R**-0.5).requires_grad_()
    return x, weight, bias, lora_A, lora_B


def _ours_saved(backend, dropout_p: float) -> tuple[SavedTensorCounter, torch.Tensor]:
    """What ``backend`` (a helpers.Backend) saves for backward, on its device."""
    x, weight, bias, lora_A, lora_B = _tensors(device=backend.device)
    with use_backend(backend.name), SavedTensorCounter([x, weight, bias, lora_A, lora_B]) as counter:
        y = lora_linear(x, weight, bias, lora_A, lora_B, 2.0, dropout_p, training=True, dropout_seed=5)
    y.sum().backward()  # the saved tensors are usable: backward runs
    assert x.grad is not None and lora_A.grad is not None and lora_B.grad is not None
    return counter, x


def _peft_saved(dropout_p: float) -> SavedTensorCounter:
    """What a real ``peft.tuners.lora.Linear`` (frozen base, trainable A and B) saves for backward."""
    lora = pytest.importorskip("peft.tuners.lora")
    config = lora.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout_p)
    base = nn.Linear(K, N).requires_grad_(False)
    layer = lora.Linear(base, "default", config=config, r=R, lora_alpha=2 * R, lora_dropout=dropout_p)
    layer.train()
    x = torch.randn(M, K, requires_grad=True)
    with SavedTensorCounter([x, *layer.parameters()]) as counter:
        layer(x)
    return counter


def test_counter_tells_inputs_from_activations():
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    with SavedTensorCounter([x, w]) as counter:
        h = torch.nn.functional.linear(x.reshape(M, K), w)  # saves x (a view) and w: inputs
        (h * h).sum()  # saves h twice: one new M×N storage, counted once
    # x's view and w's transpose share storages with the inputs: they cost nothing.
    assert {s.shape for s in counter.saved if s.kind == "input"} == {(M, K), (K, N)}
    assert counter.activation_bytes == M * N * 4
    assert [s.shape for s in counter.activations()] == [(M, N), (M, N)]


#: Bytes per row of the packed dropout mask: one per 8 columns.
PACKED_K = -(-K // 8)


def _keeps_packed_mask(backend) -> bool:
    """Whether ``backend`` keeps the mask packed from forward to backward (lora_kernels.ops.keeps_mask, for
    this module's fp32 inputs)."""
    from lora_kernels.ops import keeps_mask

    return keeps_mask(backend.name, torch.empty(0, device=backend.device))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_ours_saves_no_MxN_no_extra_MxK(backend, dropout_p):
    counter, _ = _ours_saved(backend, dropout_p)
    for saved in counter.saved:
        numel = torch.Size(saved.shape).numel()
        assert numel != M * N, f"{backend} saved an M×N tensor {saved}"
        if numel == M * K:
            assert saved.kind == "input", f"{backend} saved an M×K tensor that is not x: {saved}"
    # Everything new is the (M, r) fp32 projection t, plus with dropout at most the 0-dim int64 seed and,
    # where the backend keeps it (the torch backend on the CPU), the mask packed at 1 bit per element.
    new = [(s.shape, s.dtype) for s in counter.activations() if s.shape != ()]
    packed = [((M, PACKED_K), torch.uint8)] if dropout_p and _keeps_packed_mask(backend) else []
    assert new == [((M, R), torch.float32), *packed]
    base = M * R * 4 + (M * PACKED_K if packed else 0)
    assert base <= counter.activation_bytes <= base + 8


def test_ours_saves_at_most_one_bit_per_element_for_dropout_mask(backend):
    without, _ = _ours_saved(backend, 0.0)
    with_dropout, _ = _ours_saved(backend, 0.1)

    # The mask is regenerated in backward (GPU kernels) or kept packed at 1 bit per element (the torch
    # backend on the CPU, where that measured faster): dropout adds its seed (one 0-dim int64) and at most
    # M·⌈K/8⌉ bytes, never a mask of M·K elements.
    def shapes(counter):
        return [(s.shape, s.dtype, s.kind) for s in counter.saved if s.shape != ()]

    packed = [((M, PACKED_K), torch.uint8, "activation")] if _keeps_packed_mask(backend) else []
    assert shapes(with_dropout) == shapes(without) + packed
    extra = with_dropout.activation_bytes - without.activation_bytes - (M * PACKED_K if packed else 0)
    assert 0 <= extra <= 8, f"dropout added {extra} saved bytes: {with_dropout.saved}"
    assert all(s.dtype == torch.int64 for s in with_dropout.saved if s.shape == ())


def test_peft_with_dropout_saves_more_than_ours(backend):
    ours, _ = _ours_saved(backend, 0.1)
    peft = _peft_saved(0.1)
    # PEFT keeps the dropped copy of x (M×K, fp32) and the mask (M×K, bool) as new activations.
    peft_mxk = [s for s in peft.activations() if torch.Size(s.shape).numel() == M * K]
    assert peft_mxk, f"the counter should see PEFT's dropped x: {peft.saved}"
    assert peft.activation_bytes >= M * K * 4
    assert ours.activation_bytes < peft.activation_bytes
    # Without dropout PEFT's adapter reads x itself: no M×K activation there either.
    assert not [s for s in _peft_saved(0.0).activations() if torch.Size(s.shape).numel() == M * K]
