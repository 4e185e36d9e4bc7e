"""The grouped (SGMV-style) kernels of :mod:`lora_kernels.ops.triton_multi` against float64 references.

Each launcher is checked on odd sizes (M = 37, K = 45, N = 29; R = 16 with adapters of rank 3, 7 and 5
zero-padded), an empty segment, rows out of order with some rows in no segment ("base" rows, which expand
leaves bit for bit), several active adapters (``all_active``), per-adapter dropout (p = 0.1 and 0.3, one
adapter without), strided operands and fp32 adapters under fp16 inputs. The references gather the rows,
draw each adapter's mask with :func:`lora_kernels.dropout.dropout_mask` on the positions inside its
segment, and multiply in float64. Without a GPU the kernels run through Triton's interpreter (conftest.py);
bf16 is not tested there (the interpreter's ``tl.dot`` on bf16 is wrong).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lora_kernels.dispatch import interpreting
from lora_kernels.dropout import dropout_mask, dropout_threshold
from lora_kernels.ops.triton_multi import SegmentDropout, segment_expand, segment_reduce, segment_shrink

M, K, N, R = 37, 45, 29, 16
RANKS = (3, 7, 16, 5)
SIZES = (10, 0, 17, 4)  # adapter 1's segment is empty; 31 of the 37 rows are in a segment
PS = (0.1, 0.3, 0.0, 0.3)
# (dtype, tolerance relative to the largest reference value)
DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.float16, 1e-2, id="fp16")]


@pytest.fixture
def dev(device) -> str:
    if device == "cpu" and not interpreting():
        pytest.skip("Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    return device


def _segments(sizes, device, m=M) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``(rows, seg_starts, base_rows)``: a random permutation of ``m`` rows cut into segments of ``sizes``;
    the rows left over are in no segment."""
    perm = torch.randperm(m)
    total = sum(sizes)
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return perm[:total].to(device), starts, perm[total:].to(device)


def _all_active(n, m, device) -> tuple[torch.Tensor, list[int]]:
    return torch.arange(m, device=device).repeat(n), [a * m for a in range(n + 1)]


def _stack(n, rows_, cols, ranks, device, dtype, rank_axis) -> torch.Tensor:
    """``(n, rows_, cols)`` with adapter ``a``'s entries beyond its rank zero along ``rank_axis`` (1 or 2)."""
    stack = torch.randn(n, rows_, cols, dtype=torch.float64) * 0.3
    for a, rank in enumerate(ranks):
        if rank_axis == 1:
            stack[a, rank:] = 0
        else:
            stack[a, :, rank:] = 0
    return stack.to(device=device, dtype=dtype)


def _dropout(ps, device) -> tuple[SegmentDropout, list[int]]:
    seeds = [1234 + 977 * a for a in range(len(ps))]
    return SegmentDropout(
        torch.tensor(seeds, dtype=torch.int64, device=device),
        torch.tensor([dropout_threshold(p) for p in ps], dtype=torch.int32, device=device),
        torch.tensor([1.0 / (1.0 - p) for p in ps], dtype=torch.float32, device=device),
    ), seeds


def _masks(seeds, ps, starts, cols) -> list[torch.Tensor | None]:
    """Each adapter's mask on its segment's positions (rows ``0 .. m_a``), float64 on the CPU."""
    if seeds is None:
        return [None] * (len(starts) - 1)
    return [
        dropout_mask(seeds[a], (starts[a + 1] - starts[a], cols), ps[a], dtype=torch.float64)
        for a in range(len(starts) - 1)
    ]


def _scales(n, device) -> torch.Tensor:
    return (torch.rand(n) + 0.5).to(device=device, dtype=torch.float32)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    atol = rel * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=0.0, atol=atol)


# --------------------------------------------------------------------------------------------- references


def _shrink_ref(inp, rows, starts, weights, scales, masks) -> torch.Tensor:
    inp, rows, weights = inp.cpu().double(), rows.cpu(), weights.cpu().double()
    out = torch.zeros(starts[-1], weights.shape[1], dtype=torch.float64)
    for a in range(len(starts) - 1):
        lo, hi = starts[a], starts[a + 1]
        xs = inp[rows[lo:hi]]
        if masks[a] is not None:
            xs = xs * masks[a]
        out[lo:hi] = xs @ weights[a].T * (1.0 if scales is None else scales[a].item())
    return out


def _expand_ref(inp, rows, starts, weights, scales, out, masks) -> torch.Tensor:
    inp, rows, weights = inp.cpu().double(), rows.cpu(), weights.cpu().double()
    ref = out.cpu().double().clone()
    for a in range(len(starts) - 1):
        lo, hi = starts[a], starts[a + 1]
        term = inp[lo:hi] @ weights[a].T * (1.0 if scales is None else scales[a].item())
        if masks[a] is not None:
            term = term * masks[a]
        ref.index_add_(0, rows[lo:hi], term)
    return ref


def _reduce_ref(u, u_rows, v, v_rows, starts, scales, masks) -> torch.Tensor:
    u, v = u.cpu().double(), v.cpu().double()
    n = len(starts) - 1
    out = torch.zeros(n, u.shape[1], v.shape[1], dtype=torch.float64)
    for a in range(n):
        pos = torch.arange(starts[a], starts[a + 1])
        us = u[u_rows.cpu()[pos] if u_rows is not None else pos]
        vs = v[v_rows.cpu()[pos] if v_rows is not None else pos]
        if masks[a] is not None:
            vs = vs * masks[a]
        out[a] = us.T @ vs * (1.0 if scales is None else scales[a].item())
    return out


# ------------------------------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "dropout"])
def test_shrink_t(dev, dtype, rel, with_dropout):
    """``t = drop(x)·Aᵀ`` by segment, rows out of order, an empty segment, a transposed ``x``."""
    rows, starts, _ = _segments(SIZES, dev)
    x = torch.randn(K, M, device=dev).to(dtype).t()  # (M, K), column-major
    A_stack = _stack(len(SIZES), R, K, RANKS, dev, dtype, rank_axis=1)
    dropout, seeds = _dropout(PS, dev) if with_dropout else (None, None)
    t = segment_shrink(x, rows, starts, A_stack, None, dropout, dtype)
    assert t.shape == (sum(SIZES), R) and t.dtype == torch.float32
    _close(t, _shrink_ref(x, rows, starts, A_stack, None, _masks(seeds, PS, starts, K)), rel)


@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_shrink_g_scaled_transposed_weights(dev, dtype, rel):
    """``g = s·dY·B``: ``weights`` the view ``B_stack.transpose(1, 2)``, per-adapter scales, a sliced dY."""
    rows, starts, _ = _segments(SIZES, dev)
    grad_y = torch.randn(M, N + 5, device=dev).to(dtype)[:, 2 : 2 + N]
    B_stack = _stack(len(SIZES), N, R, RANKS, dev, dtype, rank_axis=2)
    scales = _scales(len(SIZES), dev)
    g = segment_shrink(grad_y, rows, starts, B_stack.transpose(1, 2), scales, None, dtype)
    _close(g, _shrink_ref(grad_y, rows, starts, B_stack.transpose(1, 2), scales, [None] * 4), rel)


def test_shrink_fp32_adapters_fp16_input(dev):
    """fp32 adapters with an fp16 ``x``: the products run in fp16 (the weights cast tile by tile)."""
    rows, starts, _ = _segments(SIZES, dev)
    x = torch.randn(M, K, device=dev).half()
    A_stack = _stack(len(SIZES), R, K, RANKS, dev, torch.float32, rank_axis=1)
    dropout, seeds = _dropout(PS, dev)
    t = segment_shrink(x, rows, starts, A_stack, None, dropout, torch.float16)
    _close(t, _shrink_ref(x, rows, starts, A_stack, None, _masks(seeds, PS, starts, K)), 1e-2)


def test_shrink_long_segments(dev):
    """Segments longer than one tile of rows, and more columns than one tile (fp32, dropout)."""
    m, k = 150, 200
    rows, starts, _ = _segments((70, 0, 75), dev, m=m)
    x = torch.randn(m, k, device=dev)
    A_stack = _stack(3, R, k, (16, 3, 9), dev, torch.float32, rank_axis=1)
    ps = (0.3, 0.1, 0.0)
    dropout, seeds = _dropout(ps, dev)
    t = segment_shrink(x, rows, starts, A_stack, None, dropout, torch.float32)
    _close(t, _shrink_ref(x, rows, starts, A_stack, None, _masks(seeds, ps, starts, k)), 1e-5)


# ------------------------------------------------------------------------------------------------- expand


@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_expand_y(dev, dtype, rel):
    """``y[rows] += s·t·Bᵀ`` in place on a sliced ``y`` (row stride > N); base rows untouched, bit for bit."""
    rows, starts, base = _segments(SIZES, dev)
    t = torch.randn(sum(SIZES), R, device=dev)
    B_stack = _stack(len(SIZES), N, R, RANKS, dev, dtype, rank_axis=2)
    scales = _scales(len(SIZES), dev)
    y_full = torch.randn(M, N + 3, device=dev).to(dtype)
    y, full_before = y_full[:, 1 : 1 + N], y_full.clone()
    before = y.clone()
    segment_expand(t, rows, starts, B_stack, scales, y, all_active=False, dropout=None)
    _close(y, _expand_ref(t, rows, starts, B_stack, scales, before, [None] * 4), rel)
    assert torch.equal(y[base], before[base])
    outside = torch.ones(N + 3, dtype=torch.bool)
    outside[1 : 1 + N] = False
    assert torch.equal(y_full[:, outside], full_before[:, outside])  # the columns beside the slice


@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_expand_dx_dropout(dev, dtype, rel):
    """``dX[rows] += mask ⊙ (g·A)``: ``weights`` the view ``A_stack.transpose(1, 2)``, the mask on the
    output columns by position in the segment."""
    rows, starts, base = _segments(SIZES, dev)
    g = torch.randn(sum(SIZES), R, device=dev)
    A_stack = _stack(len(SIZES), R, K, RANKS, dev, dtype, rank_axis=1)
    dropout, seeds = _dropout(PS, dev)
    dx = torch.randn(M, K, device=dev).to(dtype)
    before = dx.clone()
    segment_expand(g, rows, starts, A_stack.transpose(1, 2), None, dx, all_active=False, dropout=dropout)
    masks = _masks(seeds, PS, starts, K)
    _close(dx, _expand_ref(g, rows, starts, A_stack.transpose(1, 2), None, before, masks), rel)
    assert torch.equal(dx[base], before[base])


def test_expand_fp32_adapters_fp16_out(dev):
    rows, starts, base = _segments(SIZES, dev)
    t = torch.randn(sum(SIZES), R, device=dev)
    B_stack = _stack(len(SIZES), N, R, RANKS, dev, torch.float32, rank_axis=2)
    scales = _scales(len(SIZES), dev)
    y = torch.randn(M, N, device=dev).half()
    before = y.clone()
    segment_expand(t, rows, starts, B_stack, scales, y, all_active=False, dropout=None)
    _close(y, _expand_ref(t, rows, starts, B_stack, scales, before, [None] * 4), 1e-2)
    assert torch.equal(y[base], before[base])


@pytest.mark.parametrize("dtype, rel", DTYPES)
@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "dropout"])
def test_expand_all_active(dev, dtype, rel, with_dropout):
    """Three adapters on every row: a tile loops over them, ``out + Σ_a term_a`` rounded once."""
    n, ps = 3, (0.1, 0.0, 0.3)
    rows, starts = _all_active(n, M, dev)
    t = torch.randn(n * M, R, device=dev)
    A_stack = _stack(n, R, K, (3, 7, 16), dev, dtype, rank_axis=1)
    scales = _scales(n, dev)
    dropout, seeds = _dropout(ps, dev) if with_dropout else (None, None)
    out = torch.randn(M, K, device=dev).to(dtype)
    before = out.clone()
    segment_expand(t, rows, starts, A_stack.transpose(1, 2), scales, out, all_active=True, dropout=dropout)
    masks = _masks(seeds, ps, starts, K)
    _close(out, _expand_ref(t, rows, starts, A_stack.transpose(1, 2), scales, before, masks), rel)


def test_expand_all_active_long(dev):
    """All active with more rows than one tile and more columns than one tile (fp32)."""
    n, m, d = 3, 150, 200
    rows, starts = _all_active(n, m, dev)
    t = torch.randn(n * m, R, device=dev)
    B_stack = _stack(n, d, R, (16, 3, 9), dev, torch.float32, rank_axis=2)
    scales = _scales(n, dev)
    out = torch.randn(m, d, device=dev)
    before = out.clone()
    segment_expand(t, rows, starts, B_stack, scales, out, all_active=True, dropout=None)
    _close(out, _expand_ref(t, rows, starts, B_stack, scales, before, [None] * n), 1e-5)


# ------------------------------------------------------------------------------------------------- reduce


@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_reduce_dA(dev, dtype, rel):
    """``dA_a = g_aᵀ·drop(x[rows])``: ``v`` gathered by ``rows``, dropout on ``v``'s columns; the empty
    segment gives zeros."""
    rows, starts, _ = _segments(SIZES, dev)
    g = torch.randn(sum(SIZES), R, device=dev)
    x = torch.randn(K, M, device=dev).to(dtype).t()
    dropout, seeds = _dropout(PS, dev)
    dA = segment_reduce(g, None, x, rows, starts, None, dropout, dtype)
    assert dA.shape == (len(SIZES), R, K) and dA.dtype == torch.float32
    _close(dA, _reduce_ref(g, None, x, rows, starts, None, _masks(seeds, PS, starts, K)), rel)
    assert not dA[1].any()


@pytest.mark.parametrize("dtype, rel", DTYPES)
def test_reduce_dB(dev, dtype, rel):
    """``dB_a = s_a·dY[rows]ᵀ·t``: ``u`` gathered by ``rows`` (a sliced dY), ``v`` by position."""
    rows, starts, _ = _segments(SIZES, dev)
    grad_y = torch.randn(M, N + 4, device=dev).to(dtype)[:, 3 : 3 + N]
    t = torch.randn(sum(SIZES), R, device=dev)
    scales = _scales(len(SIZES), dev)
    dB = segment_reduce(grad_y, rows, t, None, starts, scales, None, dtype)
    assert dB.shape == (len(SIZES), N, R)
    _close(dB, _reduce_ref(grad_y, rows, t, None, starts, scales, [None] * 4), rel)
    assert not dB[1].any()


def test_reduce_all_active_long(dev):
    """Segments longer than one chunk of rows (the loop over the segment), fp32 with dropout."""
    n, m, k = 3, 150, 40
    rows, starts = _all_active(n, m, dev)
    g = torch.randn(n * m, R, device=dev)
    x = torch.randn(m, k, device=dev)
    ps = (0.3, 0.0, 0.1)
    dropout, seeds = _dropout(ps, dev)
    dA = segment_reduce(g, None, x, rows, starts, None, dropout, torch.float32)
    _close(dA, _reduce_ref(g, None, x, rows, starts, None, _masks(seeds, ps, starts, k)), 1e-5)


def test_reduce_fp32_operands_fp16_compute(dev):
    """fp32 operands with an fp16 compute dtype (dB of fp32 adapters under fp16 inputs: ``t`` is fp32)."""
    rows, starts, _ = _segments(SIZES, dev)
    grad_y = torch.randn(M, N, device=dev).half()
    t = torch.randn(sum(SIZES), R, device=dev)
    dB = segment_reduce(grad_y, rows, t, None, starts, None, None, torch.float16)
    _close(dB, _reduce_ref(grad_y, rows, t, None, starts, None, [None] * 4), 1e-2)


# ------------------------------------------------------------------------------------------ the whole step


def test_empty_batch(dev):
    """No position at all: shrink gives ``(0, R)``, expand touches nothing, reduce gives zeros."""
    rows = torch.zeros(0, dtype=torch.int64, device=dev)
    starts = [0, 0, 0]
    A_stack = _stack(2, R, K, (3, 7), dev, torch.float32, rank_axis=1)
    x = torch.randn(M, K, device=dev)
    assert segment_shrink(x, rows, starts, A_stack, None, None, torch.float32).shape == (0, R)
    before = x.clone()
    segment_expand(torch.zeros(0, R, device=dev), rows, starts, A_stack.transpose(1, 2), None, x,
                   all_active=False, dropout=None)  # fmt: skip
    assert torch.equal(x, before)
    dA = segment_reduce(torch.zeros(0, R, device=dev), None, x, rows, starts, None, None, torch.float32)
    assert dA.shape == (2, R, K) and not dA.any()


def test_rows_must_be_int64(dev):
    rows, starts, _ = _segments(SIZES, dev)
    A_stack = _stack(len(SIZES), R, K, RANKS, dev, torch.float32, rank_axis=1)
    with pytest.raises(ValueError, match="int64"):
        segment_shrink(torch.randn(M, K, device=dev), rows.int(), starts, A_stack, None, None, torch.float32)
