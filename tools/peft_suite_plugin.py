"""pytest plugin of ``tools/peft_suite.py``: PEFT's own tests with every ``lora.Linear`` fused.

Loaded with ``-p peft_suite_plugin`` (``tools/`` on ``PYTHONPATH``). ``LK_PEFT_SUITE_FUSE=1``: each PEFT
``lora.Linear`` gets :func:`lora_kernels.peft.fuse`'s forward when it is built (as ``fuse`` would give it),
and every call of that forward is counted by how it ran (:func:`lora_kernels.peft._plan_call`: fused, and on
which base, or why not). ``LK_PEFT_SUITE_SAMPLE=N`` keeps every N-th collected test (both runs alike).
``LK_PEFT_SUITE_OUT``: the JSON file of outcomes per test and the counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter

FUSE = os.environ.get("LK_PEFT_SUITE_FUSE") == "1"
SAMPLE = int(os.environ.get("LK_PEFT_SUITE_SAMPLE", "1"))
OUT = os.environ.get("LK_PEFT_SUITE_OUT")

_outcomes: dict[str, str] = {}
_calls: Counter = Counter()


def pytest_configure(config):
    if not FUSE:
        return
    import peft.tuners.lora.layer as lora_layer

    import lora_kernels.peft as lk_peft

    init = lora_layer.Linear.__init__

    def fused_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if "forward" not in self.__dict__:
            self.forward = lk_peft._FusedForward(self)

    lora_layer.Linear.__init__ = fused_init
    plan_call = lk_peft._plan_call

    def counted(layer, adapter_names):
        plan, why, warn = plan_call(layer, adapter_names)
        if plan is None:
            _calls[f"PEFT's forward: {why}"] += 1
        else:
            mixed = ", mixed batch" if adapter_names is not None else ""
            _calls[
                f"fused: {plan.kind} base, {len(plan.adapters)} adapter(s){mixed}{', DoRA' if plan.dora else ''}"
            ] += 1
        return plan, why, warn

    lk_peft._plan_call = counted


def pytest_collection_modifyitems(config, items):
    if SAMPLE > 1:
        items[:] = [item for i, item in enumerate(items) if i % SAMPLE == 0]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid)
        if previous in (None, "passed"):
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    if OUT:
        with open(OUT, "w") as f:
            json.dump({"outcomes": _outcomes, "calls": dict(_calls.most_common())}, f, indent=1)
