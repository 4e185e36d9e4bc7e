"""pytest plugin of ``tools/peft_suite.py``: PEFT's own tests with every ``lora.Linear`` fused.

Loaded with ``-p peft_suite_plugin`` (``tools/`` on ``PYTHONPATH``). ``LK_PEFT_SUITE_FUSE=1``: each PEFT
``lora.Linear`` gets :func:`lora_kernels.peft.fuse`'s forward when it is built (as ``fuse`` would give it:
whatever builds it, ``get_peft_model``, ``PeftModel.from_pretrained``, ``inject_adapter_in_model``,
``add_adapter``), and every call of that forward is counted by how it ran: fused (the plan of
:func:`lora_kernels.peft._plan_call`: on which base, how many adapters) or PEFT's forward and why (the plan's
reason; arguments the fused forward does not take; a plan dropped after it was made, which runs PEFT's
class ``forward``). The counting wraps the library's functions here; nothing of it is in the library.
``LK_PEFT_SUITE_SAMPLE=N`` keeps every N-th collected test (both runs alike). ``LK_PEFT_SUITE_OUT``: the
JSON file of outcomes per test and the counts.
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
_stack: list[str | None] = []  # how each fused-forward call now running went (innermost last)

_OTHER_ARGUMENTS = "PEFT's forward: called with arguments other than adapter_names"
_DROPPED = "PEFT's forward: planned fused, then not (input dtype casting disabled, ZeRO-3 not gathered)"
_RAISED = "raised before running (PEFT's argument checks)"


def _label(plan, why, adapter_names) -> str:
    if plan is None:
        return f"PEFT's forward: {why}"
    mixed = ", mixed batch" if adapter_names is not None else ""
    return f"fused: {plan.kind} base, {len(plan.adapters)} adapter(s){mixed}{', DoRA' if plan.dora else ''}"


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
    plan_call, fused_forward, peft_forward = (
        lk_peft._plan_call,
        lk_peft._fused_forward,
        lora_layer.Linear.forward,
    )

    def counted_plan(layer, adapter_names):
        plan, why, warn = plan_call(layer, adapter_names)
        if _stack:  # (fuse's _why_not_fused also plans: not a forward call)
            _stack[-1] = _label(plan, why, adapter_names)
        return plan, why, warn

    def counted_forward(layer, x, *args, **kwargs):
        _stack.append(None)
        raised = True
        try:
            out = fused_forward(layer, x, *args, **kwargs)
            raised = False
            return out
        finally:
            how = _stack.pop()
            _calls[how or (_RAISED if raised else _OTHER_ARGUMENTS)] += 1

    def counted_peft_forward(self, x, *args, **kwargs):
        if _stack and _stack[-1] is not None and _stack[-1].startswith("fused"):
            _stack[-1] = _DROPPED  # the fused forward planned this call, then ran PEFT's forward
        return peft_forward(self, x, *args, **kwargs)

    lk_peft._plan_call, lk_peft._fused_forward = counted_plan, counted_forward
    lora_layer.Linear.forward = counted_peft_forward


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
