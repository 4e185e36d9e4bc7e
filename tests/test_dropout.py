"""The shared Philox dropout: known-answer vectors, statistics, and the kernels' masks."""

import pytest
import torch

from lora_kernels import dropout_mask, use_backend
from lora_kernels.dropout import dropout_mask_torch, philox4x32


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Known-answer vectors of Random123's philox4x32_10 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_mask_rate_and_scale(p):
    mask = dropout_mask(12345, (64, 40, 50), p)
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / mask.numel()) ** 0.5 + 1e-3
    kept = mask[mask != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))


def test_mask_depends_on_seed_and_position():
    a = dropout_mask(1, (50, 50), 0.5)
    assert not torch.equal(a, dropout_mask(2, (50, 50), 0.5))
    assert torch.equal(a, dropout_mask(1, (50, 50), 0.5))
    assert not torch.equal(a[0], a[1])  # rows differ
    # the mask of a (2, 25, 50) input is the (50, 50) mask of its flattened rows
    assert torch.equal(dropout_mask(1, (2, 25, 50), 0.5).reshape(50, 50), a)


def test_rows_beyond_2_to_32_are_distinct():
    from lora_kernels.dropout import philox_first_word

    rows = torch.tensor([[5], [5 + 2**32]])
    words = philox_first_word(3, rows, torch.arange(64).unsqueeze(0))
    assert not torch.equal(words[0], words[1])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_kernel_mask_equals_helper(backend):
    """x·Aᵀ with A = identity rows exposes the kernel's mask: it must equal dropout_mask exactly."""
    from lora_kernels.ops import triton_lora

    M, K, p, seed = 45, 16, 0.4, 2**40 + 77  # a seed with a non-zero high word
    device = backend.device
    x = torch.ones(M, K, device=device)
    with use_backend("triton"):
        t = triton_lora._project(x, torch.eye(K, device=device), 1.0, p, seed)
    torch.testing.assert_close(t, dropout_mask(seed, (M, K), p, device=device), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 70), (2, 0, 5), (0, 3), (3, 17, 9)])
def test_fast_path_equals_the_torch_specification(shape):
    """dropout_mask (the extension's Philox when built) gives the bits of the pure-torch specification."""
    for seed in (0, 77, 2**40 + 5, 2**63 - 1):
        expected = dropout_mask_torch(seed, shape, 0.3)
        assert torch.equal(dropout_mask(seed, shape, 0.3), expected)


def test_first_word_is_philox_of_the_documented_counter():
    """The mask's word at (row, col) is Philox-4x32-10 of the counter (col, row_lo, row_hi, 0)."""
    from lora_kernels.dropout import philox_first_word

    seed, row, col = 2**40 + 9, 2**32 + 6, 11
    counter = tuple(torch.tensor([c]) for c in (col, row & 0xFFFFFFFF, row >> 32, 0))
    expected = philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))[0]
    assert torch.equal(philox_first_word(seed, torch.tensor([row]), torch.tensor([col])), expected)
