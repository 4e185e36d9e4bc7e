"""Routing (lora_kernels/ops/routing.py): the path ``auto`` takes from a device's table, the safe default
where the table is missing, lacks the case, is corrupt or is another device's, and the overrides.

The Triton backend offers two paths here (``split``, ``fused``); its kernels run through the interpreter,
so the calls are small. Tables are written to a temporary file named by ``LORA_KERNELS_TUNING``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import backend_on_device, make_problem, run_op

from lora_kernels import use_backend
from lora_kernels.ops import routing
from lora_kernels.ops.routing import (
    DEFAULT_PATH,
    TABLE_ENV_VAR,
    TABLE_FORMAT,
    case_key,
    explain_path,
    offered_paths,
    select_path,
    use_path,
)

M, K, N, R = 37, 40, 24, 4


@pytest.fixture(autouse=True)
def _fresh_caches():
    routing.clear_caches()
    yield
    routing.clear_caches()


@pytest.fixture
def triton_backend():
    return backend_on_device("triton")


def _table(tmp_path, monkeypatch, cases, device=None, fmt=TABLE_FORMAT, text=None):
    """Write a table for this machine's device (or ``device``) and point ``LORA_KERNELS_TUNING`` at it."""
    file = tmp_path / "table.json"
    if text is None:
        name = device or routing.device_name(torch.device("cpu"))
        text = json.dumps({"format": fmt, "device": name, "cases": cases})
    file.write_text(text)
    monkeypatch.setenv(TABLE_ENV_VAR, str(file))
    return file


def _key(training=True, dropout=False, m=M):
    return case_key("fwd_bwd" if training else "fwd", "fp32", "fp32", dropout, m, N, K, R)


def _choose(training=True, dropout_p=0.0, m=M):
    cpu, fp32 = torch.device("cpu"), torch.float32
    return explain_path("triton", cpu, fp32, fp32, dropout_p > 0, m, N, K, R, training)


def _launched_kernels(monkeypatch, problem, **kwargs):
    """Run forward + backward on the Triton backend; the names of the Triton kernels launched, and whether
    the split path's ``addmm_`` ran (a Tensor method: seen through a wrapper around the split functions)."""
    from lora_kernels.ops import triton_support

    launched, launch = [], triton_support._launch

    def recording(kernel, grid_of, configs, args, constexprs):
        launched.append(kernel.__name__)
        return launch(kernel, grid_of, configs, args, constexprs)

    monkeypatch.setattr(triton_support, "_launch", recording)
    grad_y = torch.randn(*problem.x.shape[:-1], problem.weight.shape[0])
    with use_backend("triton"):
        run_op(problem, grad_y, **kwargs)
    return launched


def test_registry():
    assert offered_paths("triton") == ["split", "fused", "tma", "tma_ws"]
    assert offered_paths("triton", "cpu") == ["split", "fused"]  # TMA paths: Hopper GPUs only
    assert offered_paths("torch") == offered_paths("cuda") == ["split"]
    assert DEFAULT_PATH == "split"


def test_no_table_takes_the_default(triton_backend, monkeypatch, tmp_path):
    """A device without a table in the package takes the default silently; a LORA_KERNELS_TUNING that names
    a file that does not exist (a typo) takes it with a warning."""
    monkeypatch.delenv(TABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(routing, "TABLE_DIR", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, why = _choose()
    assert path == "split" and "no routing table" in why
    routing.clear_caches()
    monkeypatch.setenv(TABLE_ENV_VAR, str(tmp_path / "absent.json"))
    with pytest.warns(
        UserWarning, match=r"LORA_KERNELS_TUNING=.*absent\.json names a file that does not exist"
    ):
        path, why = _choose()
    assert path == "split" and "no routing table" in why


@pytest.mark.parametrize("winner", ["fused", "split"])
def test_table_winner_is_taken(triton_backend, monkeypatch, tmp_path, winner):
    loser = "split" if winner == "fused" else "fused"
    _table(tmp_path, monkeypatch, {_key(): {winner: 1.0, loser: 2.0}})
    path, why = _choose()
    assert path == winner and "1.000 ms" in why
    # and the op really runs it: the fused path's GEMM has K > 0, the split path's LoRA term K = 0
    problem = make_problem((M,), K, N, R)
    launched = _launched_kernels(monkeypatch, problem)
    assert "_lora_linear_kernel" in launched
    assert ("_lora_project_kernel" in launched) == (winner == "split")  # split: t by the skinny kernel


def test_the_case_decides(triton_backend, monkeypatch, tmp_path):
    """Mode, dropout and the M bucket are part of the key: each case has its own winner."""
    _table(
        tmp_path,
        monkeypatch,
        {
            _key(training=True): {"fused": 1.0, "split": 2.0},
            _key(training=False): {"fused": 2.0, "split": 1.0},
            _key(training=True, dropout=True): {"fused": 2.0, "split": 1.0},
            _key(training=True, m=1000): {"fused": 2.0, "split": 1.0},
        },
    )
    assert _choose(training=True)[0] == "fused"
    assert _choose(training=False)[0] == "split"
    assert _choose(training=True, dropout_p=0.1)[0] == "split"
    assert _choose(training=True, m=1000)[0] == "split"
    assert _choose(training=True, m=M + 20)[0] == "fused"  # 57 is in the bucket of 37 (64)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_calls_autograd_does_not_record_take_the_fwd_entry(triton_backend, monkeypatch, tmp_path, mode):
    """Under no_grad / inference_mode (evaluation inside a training script: the adapters still require
    grad) no backward can follow, so the call is keyed ``fwd``, as ``python -m lora_kernels check`` lists
    it; with autograd on, the same signature is keyed ``fwd_bwd`` (the per-signature plan tells them apart)."""
    _table(
        tmp_path,
        monkeypatch,
        {
            _key(training=False): {"fused": 1.0, "split": 2.0},
            _key(training=True): {"fused": 2.0, "split": 1.0},
        },
    )
    problem = make_problem((M,), K, N, R)
    from lora_kernels import lora_linear
    from lora_kernels.ops import triton_support

    def launched(context) -> list[str]:
        names, launch = [], triton_support._launch

        def recording(kernel, grid_of, configs, args, constexprs):
            names.append(kernel.__name__)
            return launch(kernel, grid_of, configs, args, constexprs)

        monkeypatch.setattr(triton_support, "_launch", recording)
        p = problem
        with use_backend("triton"), context():
            lora_linear(p.x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling)
        monkeypatch.setattr(triton_support, "_launch", launch)
        return names

    no_autograd = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for _ in range(2):  # each mode after the other, both ways round: the cached plans must not mix
        assert "_lora_project_kernel" in launched(torch.enable_grad)  # split: t by the skinny kernel
        assert launched(no_autograd) == ["_lora_linear_kernel"]  # fused: one GEMM with the LoRA epilogue


def test_missing_case_takes_the_default(triton_backend, monkeypatch, tmp_path):
    _table(tmp_path, monkeypatch, {_key(m=4096): {"fused": 1.0, "split": 2.0}})
    path, why = _choose()
    assert path == DEFAULT_PATH and "not in" in why


def test_unknown_candidates_are_skipped(triton_backend, monkeypatch, tmp_path):
    """A path this version does not have (a newer table) is ignored; only known ones compete."""
    _table(tmp_path, monkeypatch, {_key(): {"tma_ws": 0.5, "fused": 1.0, "split": 2.0}})
    assert _choose()[0] == "fused"
    _table(tmp_path, monkeypatch, {_key(): {"tma_ws": 0.5}})
    routing.clear_caches()
    assert _choose()[0] == DEFAULT_PATH


@pytest.mark.parametrize(
    "kind",
    ["not_json", "wrong_format", "foreign_device", "list", "bad_times", "huge_int", "deep", "cases_list"],
)
def test_corrupt_or_foreign_table_warns_and_takes_the_default(triton_backend, monkeypatch, tmp_path, kind):
    """Any table that cannot be read or validated is no table, with one warning: never an error in a call
    (a time too large for a float, JSON nested past the parser's recursion limit included)."""
    cases = {_key(): {"fused": 1.0, "split": 2.0}}
    name = routing.device_name(torch.device("cpu"))
    head = f'{{"format": "{TABLE_FORMAT}", "device": "{name}", "cases": '
    if kind == "not_json":
        _table(tmp_path, monkeypatch, cases, text='{"format": "lora_kernels.tuning/1", "cases": {')
    elif kind == "wrong_format":
        _table(tmp_path, monkeypatch, cases, fmt="something/else")
    elif kind == "foreign_device":
        _table(tmp_path, monkeypatch, cases, device="NVIDIA A100-SXM4-80GB")
    elif kind == "list":
        _table(tmp_path, monkeypatch, cases, text="[1, 2, 3]")
    elif kind == "bad_times":
        _table(tmp_path, monkeypatch, {_key(): {"fused": "fast", "split": -1}})
    elif kind == "huge_int":  # an int no float can hold: math.isfinite and float() overflow on it
        _table(tmp_path, monkeypatch, cases, text=head + f'{{"{_key()}": {{"fused": 1{"0" * 400}}}}}}}')
    elif kind == "deep":  # the parser's RecursionError
        _table(tmp_path, monkeypatch, cases, text=head + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        _table(tmp_path, monkeypatch, [{_key(): {"fused": 1.0}}])
    message = {"cases_list": r"no cases: 'cases' is list", "huge_int": "without a valid time"}.get(kind, "")
    with pytest.warns(UserWarning, match=f"lora_kernels routing: .*{message}.*default path 'split'"):
        path, _ = _choose()
    assert path == DEFAULT_PATH
    # the op runs, and the warning is given once, not per call
    problem = make_problem((M,), K, N, R)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_backend("triton"):
            run_op(problem, torch.randn(M, N))


def test_choice_is_cached_per_signature(triton_backend, monkeypatch, tmp_path):
    _table(tmp_path, monkeypatch, {_key(): {"fused": 1.0, "split": 2.0}})
    calls = []
    explain = routing.explain_path
    monkeypatch.setattr(routing, "explain_path", lambda *a: calls.append(a) or explain(*a))
    x, w, A = torch.randn(M, K), torch.randn(N, K), torch.randn(R, K)
    for _ in range(3):
        assert select_path("triton", x, w, A, 0.0, True) == "fused"
    assert len(calls) == 1
    select_path("triton", torch.randn(M + 1, K), w, A, 0.0, True)  # another signature
    assert len(calls) == 2


def test_overrides(triton_backend, monkeypatch, tmp_path):
    _table(tmp_path, monkeypatch, {_key(): {"fused": 1.0, "split": 2.0}})
    with use_path("split"):
        path, why = _choose()
    assert path == "split" and "use_path('split')" in why
    monkeypatch.setenv(routing.ENV_VAR, "split")
    assert _choose()[0] == "split"
    with use_path("fused"):  # use_path wins over the environment
        assert _choose()[0] == "fused"
    monkeypatch.setenv(routing.ENV_VAR, "auto")
    assert _choose()[0] == "fused"


def test_bad_overrides_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown path 'fastest'"), use_path("fastest"):
        pass
    monkeypatch.setenv(routing.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="LORA_KERNELS_PATH='nope' is not a path"):
        routing.requested_path()
    monkeypatch.delenv(routing.ENV_VAR)
    problem = make_problem((5,), 8, 6, 2)
    with use_backend("torch"), use_path("fused"), pytest.raises(RuntimeError, match="cannot run it"):
        run_op(problem, torch.randn(5, 6))


def test_backward_runs_the_forward_path(triton_backend, monkeypatch):
    """The path is saved for backward: leaving ``use_path`` before ``backward`` does not switch paths."""
    from lora_kernels import lora_linear
    from lora_kernels.ops import triton_lora

    problem = make_problem((M,), K, N, R)
    calls, term = [], triton_lora._lora_term
    monkeypatch.setattr(triton_lora, "_lora_term", lambda *a, **k: calls.append(1) or term(*a, **k))
    with use_backend("triton"), use_path("fused"):
        y = lora_linear(problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, 2.0)
    with use_backend("triton"):
        y.sum().backward()
    assert calls == []  # neither the forward nor the backward took the split path
    with use_backend("triton"), use_path("split"):
        y = lora_linear(problem.x, problem.weight, problem.bias, problem.lora_A, problem.lora_B, 2.0)
    y.sum().backward()
    assert calls == [1, 1]  # the LoRA term of y, then that of dX


def test_committed_tables_are_valid():
    """Every table in the package loads without a warning, and names only known paths."""
    files = sorted(routing.TABLE_DIR.glob("*.json"))
    assert files, "no table committed"
    known = {p.name for p in routing.PATHS}
    for file in files:
        data = json.loads(file.read_text())
        assert data["format"] == TABLE_FORMAT
        assert file.stem == routing.device_slug(data["device"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            table = routing._load_table(str(file), data["device"])
        assert table is not None and table.cases
        for key, times in table.cases.items():
            assert key.count("|") == 7, key
            assert set(times) <= known, (file.name, key, times)


@pytest.mark.parametrize("runs_here", [True, False])
def test_a_new_path_is_one_registry_entry(triton_backend, monkeypatch, tmp_path, runs_here):
    """A path added to the registry competes in the table where its ``available`` check passes, and is
    never taken (nor can be forced) where it fails."""
    extra = routing.Path("tma", "triton", "triton_lora", available=lambda device: runs_here)
    monkeypatch.setattr(routing, "PATHS", (*routing.PATHS, extra))
    _table(tmp_path, monkeypatch, {_key(): {"tma": 0.5, "fused": 1.0, "split": 2.0}})
    assert ("tma" in offered_paths("triton", "cpu")) == runs_here
    assert _choose()[0] == ("tma" if runs_here else "fused")
    with use_path("tma"):
        if runs_here:
            assert _choose()[0] == "tma"
        else:
            with pytest.raises(RuntimeError, match=r"path 'tma' .* available\(\) check is false"):
                _choose()


def test_gpu_run_writes_the_table_it_measured(triton_backend, monkeypatch, tmp_path):
    """The GPU visit's routing table (``benchmarks/gpu_summary.py``): per LoRA case, each path's time from the ``backend:path`` providers of the
    backend ``auto`` selects; failed rows and DoRA rows left out; it loads, and ``auto`` then takes its
    winner. The benchmarks list an ``auto`` provider and one per path."""
    from helpers import benchmarks_module

    harness, gpu_summary = benchmarks_module("harness"), benchmarks_module("gpu_summary")
    assert harness.path_providers(["triton", "torch"], "cpu") == ["triton:split", "triton:fused"]
    assert "auto" in harness.providers("fwd_bwd", "cpu")
    assert harness.split_provider("triton:fused") == ("triton", "fused")
    assert harness.split_provider("auto") == ("auto", "auto")
    case = dict(mode="fwd_bwd", dtype="fp32", adapter_dtype=None, dropout=0.0, M=M, out_features=N,
                in_features=K, r=R)  # fmt: skip
    rows = [
        dict(case, provider="triton:fused", median_ms=1.0),
        dict(case, provider="triton:split", median_ms=2.0),
        dict(case, provider="torch", median_ms=0.5),  # a backend, not a path: not in the table
        dict(case, provider="cuda:split", median_ms=0.1),  # not the backend auto selects here
        dict(case, M=1000, provider="triton:fused", median_ms=1.0, error="AssertionError: wrong"),
        dict(case, M=1000, provider="triton:split", median_ms=3.0),
        dict(case, provider="triton:fused", median_ms=0.1, dora=True),
    ]
    name = routing.device_name(torch.device("cpu"))
    table = gpu_summary.routing_table(rows, name, device_type="cpu", note="test")
    assert table["cases"] == {_key(): {"fused": 1.0, "split": 2.0}, _key(m=1000): {"split": 3.0}}
    file = tmp_path / "table.json"
    assert "2 cases" in gpu_summary.write_routing_table(table, file)
    monkeypatch.setenv(TABLE_ENV_VAR, str(file))
    assert _choose()[0] == "fused" and _choose(m=1000)[0] == "split"


@pytest.mark.parametrize(
    "name, stem",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3"),
        ("NVIDIA H200", "nvidia_h200"),
        ("NVIDIA H100 PCIe", "nvidia_h100_pcie"),
    ],
)
def test_gpu_visit_names_its_table_as_routing_looks_it_up(monkeypatch, name, stem):
    """The table a GPU visit writes for a device, ``tuning-<stem>.json``, is committed as
    ``lora_kernels/tuning/<stem>.json``: the file routing looks up for that ``torch.cuda.get_device_name()``."""
    from helpers import benchmarks_module

    monkeypatch.delenv(TABLE_ENV_VAR, raising=False)
    written = benchmarks_module("gpu_summary").tuning_file_name(name)
    assert written == f"tuning-{stem}.json"
    assert routing.table_file(name) == routing.TABLE_DIR / written.removeprefix("tuning-")
