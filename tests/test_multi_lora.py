"""Parity of the grouped op (:func:`lora_kernels.multi_lora_linear`, many adapters over one base) on every
backend against a float64 reference made of each adapter run alone on its own rows.

Adapter ``a``'s reference is :func:`lora_kernels.lora_linear_reference` on its rows with the mask
``dropout_mask(seed_a, (m_a, K), p_a)``: so these tests also check that each adapter's output and gradients
equal a call of that adapter alone on its own rows, dropout included.
"""

import pytest
import torch
from helpers import skip_unless_dtype_runs

import lora_kernels
from lora_kernels import AdapterTerm, dropout_mask, lora_linear, multi_lora_linear, use_backend
from lora_kernels.testing import assert_close

DTYPES = [(torch.float32, 1.0), (torch.float16, 1.0), (torch.bfloat16, 1.0), (torch.float64, 1.0)]


def _problem(device, dtype, M=37, K=45, N=29, ranks=(3, 7, 16), adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    adapter_dtype = adapter_dtype or dtype
    x = rand(M, K).to(dtype)
    weight, bias = rand(N, K, scale=K**-0.5).to(dtype), rand(N).to(dtype)
    adapters = [
        (rand(r, K, scale=K**-0.5).to(adapter_dtype), rand(N, r, scale=r**-0.5).to(adapter_dtype))
        for r in ranks
    ]
    return x, weight, bias, adapters


def _rows_by_adapter(ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [(ids == a).nonzero().flatten() for a in range(n)]


def _reference(x, weight, bias, adapters, scalings, ps, seeds, rows_of, grad_y):
    """float64 output and gradients of each adapter alone on its rows (the base on the rest)."""
    shape = x.shape
    x64 = x.detach().double().reshape(-1, shape[-1]).requires_grad_()
    x, grad_y = x64, grad_y.reshape(x64.shape[0], -1)
    pairs = [
        (A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for A, B in adapters
    ]
    y = torch.nn.functional.linear(x64, weight.double(), bias.double()).clone()
    for a, (A, B) in enumerate(pairs):
        rows = rows_of[a]
        if rows is None:  # every row
            rows = torch.arange(x.shape[0], device=x.device)
        if rows.numel() == 0:
            continue
        mask = (
            dropout_mask(seeds[a], (rows.numel(), x.shape[1]), ps[a], x.device, torch.float64)
            if ps[a] > 0
            else None
        )
        alone = lora_kernels.lora_linear_reference(
            x64[rows], weight, bias, A, B, scalings[a], mask, upcast=True
        ) - torch.nn.functional.linear(x64[rows], weight.double(), bias.double())
        y = y.index_add(0, rows, alone)
    y.backward(grad_y.double())
    grads_A = [torch.zeros_like(A) if A.grad is None else A.grad for A, _ in pairs]
    return (
        y.reshape(*shape[:-1], -1),
        x64.grad.reshape(shape),
        grads_A,
        [torch.zeros_like(B) if B.grad is None else B.grad for _, B in pairs],
    )


def _check(backend, dtype, x, weight, bias, adapters, scalings, ps, seeds, rows_of, *, slack=1.0, **kwargs):
    x = x.detach().requires_grad_()
    params = [tuple(t.detach().requires_grad_() for t in pair) for pair in adapters]
    terms = [AdapterTerm(A, B, s, p) for (A, B), s, p in zip(params, scalings, ps, strict=True)]
    with use_backend(backend.name):
        y = multi_lora_linear(x, weight, bias, terms, training=True, dropout_seeds=seeds, **kwargs)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    grad_y = torch.randn(y.shape, device=x.device).to(dtype)
    y.backward(grad_y)
    y_ref, gx_ref, gA_ref, gB_ref = _reference(
        x, weight, bias, adapters, scalings, ps, seeds, rows_of, grad_y
    )
    assert_close(y, y_ref, dtype, "y", slack)
    assert_close(x.grad, gx_ref, dtype, "dx", 2 * slack)
    for a, (A, B) in enumerate(params):
        assert A.grad.dtype == A.dtype and B.grad.dtype == B.dtype
        assert_close(A.grad, gA_ref[a], dtype, f"dA[{a}]", 2 * slack)
        assert_close(B.grad, gB_ref[a], dtype, f"dB[{a}]", 2 * slack)


MIXED_IDS = ([0, 2, -1, 2, 0, 0, 2, -1, -1, 0, 2, 2, 0] * 3)[:37]  # 37 rows; adapter 1 takes none


@pytest.mark.parametrize("dtype,slack", DTYPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_mixed_batch_matches_each_adapter_alone(backend, dtype, slack, dropout):
    skip_unless_dtype_runs(backend, dtype)
    if dtype == torch.float64 and backend.name == "triton":
        pytest.skip("the Triton kernels take fp16, bf16 and fp32")
    x, weight, bias, adapters = _problem(backend.device, dtype)
    ids = torch.tensor(MIXED_IDS, device=backend.device)
    ps = [0.1, 0.5, 0.3] if dropout else [0.0] * 3
    rows_of = _rows_by_adapter(ids, 3)
    assert rows_of[1].numel() == 0  # an empty segment
    _check(
        backend, dtype, x, weight, bias, adapters, [0.5, 2.0, 1.5], ps, [11, 12, 13], rows_of, adapter_ids=ids
    )


@pytest.mark.parametrize("dropout", [False, True])
def test_several_active_adapters_sum_their_terms(backend, dropout):
    dtype = torch.float32
    x, weight, bias, adapters = _problem(backend.device, dtype)
    ps = [0.2, 0.0, 0.4] if dropout else [0.0] * 3
    _check(backend, dtype, x, weight, bias, adapters, [1.0, 0.25, 3.0], ps, [7, 8, 9], [None] * 3)


def test_segments_per_sample_ids_and_a_3d_input(backend):
    dtype = torch.float32
    x, weight, bias, adapters = _problem(backend.device, dtype, M=5 * 7)
    x3 = x.reshape(5, 7, -1)
    per_sample = [1, -1, 0, 0, 1]
    rows_of = [torch.arange(14, 28, device=x.device), torch.cat([torch.arange(7), torch.arange(28, 35)])]
    rows_of = [r.to(x.device) for r in rows_of] + [torch.empty(0, dtype=torch.long, device=x.device)]
    common = (weight, bias, adapters, [2.0, 0.5, 1.0], [0.3, 0.1, 0.0], [1, 2, 3])
    _check(backend, dtype, x3, *common, rows_of, adapter_ids=per_sample)  # a host list, per sample
    ids = torch.tensor(per_sample, device=x.device)
    _check(backend, dtype, x3, *common, rows_of, adapter_ids=ids)  # a tensor, per sample
    segments = [(1, 7), (-1, 7), (0, 14), (1, 7), (2, 0)]
    _check(backend, dtype, x3, *common, rows_of, segments=segments)


def test_non_contiguous_input_and_fp32_adapters_on_fp16(backend):
    dtype = torch.float16
    x, weight, bias, adapters = _problem(backend.device, dtype, K=90, adapter_dtype=torch.float32)
    x = x[:, ::2]  # non-contiguous, K = 45
    weight = weight[:, ::2].contiguous()
    adapters = [(A[:, ::2].contiguous(), B) for A, B in adapters]
    ids = torch.tensor(MIXED_IDS, device=backend.device)
    rows_of = _rows_by_adapter(ids, 3)
    _check(backend, dtype, x, weight, bias, adapters, [1.0, 1.0, 2.0], [0.1, 0.0, 0.2], [4, 5, 6], rows_of,
           adapter_ids=ids)  # fmt: skip


def test_equals_single_adapter_calls_on_own_rows(backend):
    """Bit for bit on the torch backend, to rounding on Triton: the output rows of adapter a are those of
    lora_linear on its rows alone with seed a."""
    dtype = torch.float32
    x, weight, bias, adapters = _problem(backend.device, dtype)
    ids = torch.tensor(MIXED_IDS, device=backend.device)
    terms = [AdapterTerm(A, B, 2.0, 0.25) for A, B in adapters]
    with use_backend(backend.name):
        y = multi_lora_linear(x, weight, bias, terms, adapter_ids=ids, training=True, dropout_seeds=[3, 4, 5])
        for a, (A, B) in enumerate(adapters):
            rows = (ids == a).nonzero().flatten()
            if rows.numel():
                alone = lora_linear(x[rows], weight, bias, A, B, 2.0, 0.25, True, dropout_seed=3 + a)
                torch.testing.assert_close(y[rows], alone, atol=1e-5, rtol=1e-5)
    base = (ids == -1).nonzero().flatten()
    torch.testing.assert_close(y[base], torch.nn.functional.linear(x[base], weight, bias))


def test_base_output_and_no_bias(backend):
    """A base the op does not compute (another tuner layer): its output and gradient pass through."""
    dtype = torch.float32
    x, weight, _, adapters = _problem(backend.device, dtype)
    base_w = weight.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    terms = [AdapterTerm(A, B, 1.0) for A, B in adapters]
    with use_backend(backend.name):
        y = multi_lora_linear(xg, None, None, terms, base_output=xg @ base_w.t())
        y_plain = multi_lora_linear(x, weight, None, terms)
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(base_w.grad, torch.ones_like(y).t() @ x, atol=1e-4, rtol=1e-5)


def test_eval_ignores_dropout_and_no_grad_runs(backend):
    x, weight, bias, adapters = _problem(backend.device, torch.float32)
    terms = [AdapterTerm(A, B, 1.0, 0.5) for A, B in adapters]
    with use_backend(backend.name), torch.no_grad():
        y1 = multi_lora_linear(x, weight, bias, terms, adapter_ids=torch.tensor(MIXED_IDS))
        y2 = multi_lora_linear(x, weight, bias, terms, adapter_ids=torch.tensor(MIXED_IDS))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_empty_batch_and_all_base_rows(backend):
    x, weight, bias, adapters = _problem(backend.device, torch.float32)
    terms = [AdapterTerm(A.requires_grad_(), B.requires_grad_(), 1.0) for A, B in adapters]
    with use_backend(backend.name):
        y = multi_lora_linear(x[:0], weight, bias, terms, adapter_ids=torch.empty(0, dtype=torch.long))
        assert y.shape == (0, weight.shape[0])
        y = multi_lora_linear(x, weight, bias, terms, adapter_ids=[-1] * x.shape[0])
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))
    y.sum().backward()
    assert all(t.lora_A.grad.abs().max() == 0 for t in terms)


def test_in_place_ops_on_the_output(backend):
    x, weight, bias, adapters = _problem(backend.device, torch.float32)
    x = x.requires_grad_()
    with use_backend(backend.name):
        y = multi_lora_linear(
            x, weight, bias, [AdapterTerm(A, B, 1.0) for A, B in adapters], adapter_ids=MIXED_IDS
        )
    y += 1
    y.mul_(2).sum().backward()
    assert x.grad is not None


def test_composite_paths_forward_ad_and_meta():
    x, weight, bias, adapters = _problem("cpu", torch.float64)
    terms = [AdapterTerm(A, B, 1.5) for A, B in adapters]
    y = multi_lora_linear(x, weight, bias, terms, adapter_ids=MIXED_IDS)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        out = multi_lora_linear(dual, weight, bias, terms, adapter_ids=MIXED_IDS)
        y_dual, jvp = torch.autograd.forward_ad.unpack_dual(out)
    torch.testing.assert_close(y_dual, y)
    expected = torch.func.jvp(
        lambda t: multi_lora_linear(t, weight, bias, terms, adapter_ids=MIXED_IDS), (x,), (tangent,)
    )
    torch.testing.assert_close(jvp, expected[1])
    meta = [AdapterTerm(A.to("meta"), B.to("meta"), 1.0) for A, B in adapters]
    y_meta = multi_lora_linear(x.to("meta"), weight.to("meta"), bias.to("meta"), meta, segments=[(0, 37)])
    assert y_meta.shape == y.shape and y_meta.is_meta


def test_clear_errors():
    x, weight, bias, adapters = _problem("cpu", torch.float32)
    terms = [AdapterTerm(A, B, 1.0) for A, B in adapters]
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        multi_lora_linear(x, weight, bias, terms, adapter_ids=torch.full((37,), 3))
    with pytest.raises(ValueError, match="cover 36 rows"):
        multi_lora_linear(x, weight, bias, terms, segments=[(0, 36)])
    with pytest.raises(ValueError, match="not both"):
        multi_lora_linear(x, weight, bias, terms, segments=[(0, 37)], adapter_ids=[0] * 37)
    with pytest.raises(ValueError, match="lora_B"):
        multi_lora_linear(x, weight, bias, [AdapterTerm(adapters[0][0], adapters[1][1], 1.0)])
    with pytest.raises(ValueError, match="dropout_p"):
        multi_lora_linear(x, weight, bias, [AdapterTerm(*adapters[0], 1.0, 1.0)])
    with pytest.raises(TypeError, match="non-empty"):
        multi_lora_linear(x, weight, bias, [])
    with pytest.raises(ValueError, match="shape"):
        multi_lora_linear(x, weight, bias, terms, adapter_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_seeds"):
        multi_lora_linear(
            x, weight, bias, [AdapterTerm(*adapters[0], 1.0, 0.1)], training=True, dropout_seeds=[1, 2]
        )


def test_compiles_without_graph_breaks_with_segments_or_all_active():
    x, weight, bias, adapters = _problem("cpu", torch.float32, M=12, K=8, N=6, ranks=(2, 3))
    terms = [AdapterTerm(*adapters[0], 1.0, 0.1), AdapterTerm(*adapters[1], 2.0)]

    def mixed(x):
        return multi_lora_linear(x, weight, bias, terms, segments=[(0, 5), (-1, 2), (1, 5)], training=True,
                                 dropout_seeds=[1, 2])  # fmt: skip

    def both(x):
        return multi_lora_linear(x, weight, bias, terms)

    with use_backend("torch"):
        for fn in (mixed, both):
            torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x), atol=1e-5, rtol=1e-5)
