"""The shared Philox dropout: known-answer vectors, statistics, and the kernels' masks."""

import pytest
import torch
from helpers import HAS_TRITON, requires_triton

from lora_kernels import dropout, dropout_mask, use_backend
from lora_kernels.dropout import dropout_mask_torch, dropout_values, philox4x32, quantized_dropout_p

_M32 = 0xFFFFFFFF


def _philox_py(counter, key):
    """Philox-4x32-10 in plain Python ints, written from the paper, independent of lora_kernels."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _keep_py(seed, row, col, p):
    """The documented scheme for one element, straightforwardly: one Philox call for its group of 8."""
    words = _philox_py((col // 8, row & _M32, row >> 32, 0), (seed & _M32, seed >> 32))
    j = col % 8
    value = (words[j // 2] >> (16 * (j % 2))) & 0xFFFF
    return value >= round(p * 2**16)


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
    assert _philox_py(counter, key) == expected  # the tests' own Philox, below


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_mask_rate_and_scale(p):
    mask = dropout_mask(12345, (64, 40, 50), p)
    dropped = (mask == 0).double().mean().item()
    q = quantized_dropout_p(p)
    assert abs(dropped - q) < 4 * (q * (1 - q) / mask.numel()) ** 0.5 + 1e-3
    kept = mask[mask != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))  # the caller's p, not q


def test_p_is_quantised_to_2_to_minus_16():
    """The drop rate is round(p·2**16) / 2**16: exact where it can be seen exactly, statistical elsewhere."""
    assert quantized_dropout_p(0.1) == 6554 / 65536
    assert quantized_dropout_p(0.5) == 0.5
    thresholds = {k: dropout.dropout_threshold(k / 2**16) for k in (0.4, 0.5, 0.6, 1.5, 2.5, 3.5)}
    assert thresholds == {0.4: 0, 0.5: 0, 0.6: 1, 1.5: 2, 2.5: 2, 3.5: 4}  # round half to even
    shape = (2048, 4096)  # 8.4M elements
    # below 2**-17 nothing is dropped (the former 24-bit threshold dropped about 50 of these)
    assert bool((dropout_mask(7, shape, 0.4 / 2**16) != 0).all())
    # 0.6·2**-16 drops at the rate 2**-16: about 128 elements (σ ≈ 11), not the 77 the unrounded p gives
    dropped = int((dropout_mask(7, shape, 0.6 / 2**16) == 0).sum())
    assert abs(dropped - 128) <= 4 * 128**0.5, dropped
    # a rate the sample resolves: 0.3 is 19661 / 65536
    mask = dropout_mask(11, shape, 0.3)
    q = quantized_dropout_p(0.3)
    assert abs((mask == 0).double().mean().item() - q) < 4 * (q * (1 - q) / mask.numel()) ** 0.5


@pytest.mark.parametrize("seed", [0, 2**40 + 77, 2**63 - 1])
def test_mask_equals_an_independent_implementation(seed):
    """Element by element, against the scheme written out in plain Python (:func:`_keep_py`): one Philox
    call per group of 8 columns, its words cut into 16-bit halves in the documented order. 37 columns: four
    whole groups and a partial fifth."""
    M, K, p = 5, 37, 0.3
    expected = torch.tensor([[_keep_py(seed, m, k, p) for k in range(K)] for m in range(M)])
    assert torch.equal(dropout_mask_torch(seed, (M, K), p) != 0, expected)
    assert torch.equal(dropout_mask(seed, (M, K), p) != 0, expected)  # the extension's when built
    rows = torch.tensor([[2**32 + 5], [2**40 + 3]])  # rows past 2**32: the counter's high word
    cols = torch.arange(K).unsqueeze(0)
    expected = torch.tensor([[_keep_py(seed, int(m), k, p) for k in range(K)] for m in rows[:, 0]])
    assert torch.equal(dropout_values(seed, rows, cols) >= dropout.dropout_threshold(p), expected)


def test_one_philox_call_per_8_columns(monkeypatch):
    """dropout_mask_torch evaluates Philox on rows × ceil(K / 8) counters: 1/8 of a call per element."""
    counters = []
    philox = dropout.philox4x32

    def counting(counter, key):
        counters.append(counter[0].numel())
        return philox(counter, key)

    monkeypatch.setattr(dropout, "philox4x32", counting)
    dropout_mask_torch(3, (6, 5, 83), 0.25)
    assert counters == [30 * 11]  # 30 rows, ceil(83 / 8) = 11 groups


def test_mask_depends_on_seed_and_position():
    a = dropout_mask(1, (50, 50), 0.5)
    assert not torch.equal(a, dropout_mask(2, (50, 50), 0.5))
    assert torch.equal(a, dropout_mask(1, (50, 50), 0.5))
    assert not torch.equal(a[0], a[1])  # rows differ
    # the mask of a (2, 25, 50) input is the (50, 50) mask of its flattened rows
    assert torch.equal(dropout_mask(1, (2, 25, 50), 0.5).reshape(50, 50), a)


def test_rows_beyond_2_to_32_are_distinct():
    rows = torch.tensor([[5], [5 + 2**32]])
    values = dropout_values(3, rows, torch.arange(64).unsqueeze(0))
    assert not torch.equal(values[0], values[1])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_kernel_mask_equals_helper(backend):
    """x·Aᵀ with A = identity rows exposes the kernel's mask: it must equal dropout_mask exactly."""
    from lora_kernels.ops import triton_reduce

    M, K, p, seed = 45, 40, 0.4, 2**40 + 77  # a seed with a non-zero high word; K ends mid-tile
    device = backend.device
    x = torch.ones(M, K, device=device)
    with use_backend("triton"):
        t = triton_reduce._project(x, torch.eye(K, device=device), 1.0, p, seed)
    torch.testing.assert_close(t, dropout_mask(seed, (M, K), p, device=device), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 70), (2, 0, 5), (0, 3), (3, 17, 9)])
def test_fast_path_equals_the_torch_specification(shape):
    """dropout_mask (the extension's Philox when built) gives the bits of the pure-torch specification."""
    for seed in (0, 77, 2**40 + 5, 2**63 - 1):
        expected = dropout_mask_torch(seed, shape, 0.3)
        assert torch.equal(dropout_mask(seed, shape, 0.3), expected)


def test_values_are_the_halves_of_the_documented_counter():
    """Element (row, col) takes word (col % 8) // 2 of Philox-4x32-10 of (col // 8, row_lo, row_hi, 0), its low
    half for an even col % 8 and its high half for an odd one."""
    seed, row = 2**40 + 9, 2**32 + 6
    counter = tuple(torch.tensor([c]) for c in (13, row & _M32, row >> 32, 0))  # columns 104 .. 111
    words = [int(w) for w in philox4x32(counter, (seed & _M32, seed >> 32))]
    halves = [(w >> shift) & 0xFFFF for w in words for shift in (0, 16)]
    got = dropout_values(seed, torch.tensor([row]), torch.arange(104, 112))
    assert got.tolist() == halves


if HAS_TRITON:
    import triton
    import triton.language as tl

    from lora_kernels.ops.triton_support import _dropout_args
    from lora_kernels.ops.triton_tiles import _dropout_keep_tile, _dropout_keep_tile_t, _load_seed

    @triton.jit
    def _keep_tiles_kernel(out_ptr, out_t_ptr, row_start, col_start, seed_ptr, threshold,
                           ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
        """Both keep-tile helpers of the Triton backend, stored as int8 (the kernels never store them); the
        seed read from its tensor as the kernels read it."""
        seed_lo, seed_hi = _load_seed(seed_ptr)
        rows = row_start + tl.arange(0, ROWS).to(tl.int64)
        r = tl.arange(0, ROWS)
        c = tl.arange(0, COLS)
        keep = _dropout_keep_tile(rows, col_start, COLS, seed_lo, seed_hi, threshold)
        tl.store(out_ptr + r[:, None] * COLS + c[None, :], keep.to(tl.int8))
        keep_t = _dropout_keep_tile_t(rows, col_start, COLS, seed_lo, seed_hi, threshold)
        tl.store(out_t_ptr + c[:, None] * ROWS + r[None, :], keep_t.to(tl.int8))


@requires_triton
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("row_start, col_start", [(0, 0), (2**32 - 3, 48), (2**40 + 1, 2**31 + 16)])
def test_triton_keep_tiles_equal_the_independent_implementation(backend, row_start, col_start):
    """The Triton helpers (one Philox call per 8 columns, expanded with join / reshape, and its transpose)
    give the mask of :func:`_keep_py` at any tile position, rows and columns past 2**31 included."""
    ROWS, COLS, p, seed = 4, 32, 0.45, 2**40 + 2**31 + 3
    out = torch.empty((ROWS, COLS), dtype=torch.int8, device=backend.device)
    out_t = torch.empty((COLS, ROWS), dtype=torch.int8, device=backend.device)
    seed_ptr, threshold, _ = _dropout_args(p, seed, out)
    _keep_tiles_kernel[(1,)](out, out_t, row_start, col_start, seed_ptr, threshold, ROWS=ROWS, COLS=COLS)
    expected = torch.tensor(
        [[_keep_py(seed, row_start + m, col_start + k, p) for k in range(COLS)] for m in range(ROWS)]
    )
    assert torch.equal(out.cpu().bool(), expected)
    assert torch.equal(out_t.cpu().bool(), expected.t())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_column_offset_shards_sum_to_the_whole_layer(backend, dora):
    """A row-parallel split: ranks hold column shards of x, W and A and pass each shard's first column as
    ``dropout_column_offset`` (DoRA also the norm of whole rows); the sum of their outputs, and the
    gradients, are the unsharded layer's with dropout, mask included. Without the offset they are not."""
    from lora_kernels import dora_linear, lora_linear
    from lora_kernels.functional import dora_weight_norm

    device = backend.device
    M, K, N, r, s, p, seed = 6, 48, 20, 4, 0.7, 0.3, 1234
    x = torch.randn(M, K, device=device, requires_grad=True)
    W, b = torch.randn(N, K, device=device), torch.randn(N, device=device)
    A = torch.randn(r, K, device=device, requires_grad=True)
    B = torch.randn(N, r, device=device, requires_grad=True)
    m = (torch.rand(N, device=device) + 0.5).requires_grad_()
    # Triton's kernels take offsets that are multiples of 8; 21 goes to the torch backend's ops
    shards = [(0, 16), (16, 21), (21, K)]
    norm = sum(dora_weight_norm(W[:, a:c], A[:, a:c], B, s) ** 2 for a, c in shards).sqrt()

    def layer(a, c, offset, bias):
        args = (x[:, a:c], W[:, a:c], bias, A[:, a:c], B)
        if dora:
            return dora_linear(*args, m, s, p, True, dropout_seed=seed, dropout_column_offset=offset,
                               weight_norm=norm if bias is None else None)  # fmt: skip
        return lora_linear(*args, s, p, True, dropout_seed=seed, dropout_column_offset=offset)

    inputs = (x, A, B, m) if dora else (x, A, B)
    with use_backend(backend.name):
        y = layer(0, K, 0, b)
        grad_y = torch.randn_like(y)
        expected = (y, *torch.autograd.grad(y, inputs, grad_y))
        y_sharded = sum(layer(a, c, a, None) for a, c in shards) + b
        got = (y_sharded, *torch.autograd.grad(y_sharded, inputs, grad_y))
        for name, g, e in zip(("y", "dx", "dA", "dB", "dm"), got, expected, strict=False):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda msg, n=name: f"{n}: {msg}")
        y_unshifted = sum(layer(a, c, 0, None) for a, c in shards) + b
    assert not torch.allclose(y_unshifted, y, rtol=1e-4, atol=1e-4)  # the offset matters


def test_column_offset_mask_is_a_slice_of_the_wide_mask():
    wide = dropout_mask(77, (5, 40), 0.4)
    for offset in (0, 3, 8, 16, 21):
        torch.testing.assert_close(
            dropout_mask(77, (5, 40 - offset), 0.4, column_offset=offset), wide[:, offset:]
        )
    with pytest.raises(ValueError, match="column_offset"):
        dropout_mask(77, (5, 4), 0.4, column_offset=-1)
