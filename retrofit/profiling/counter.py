"""One counted forward pass: ``FlopCounterMode`` with retrofit's rules, and a recorder of every op that ran.

``FlopCounterMode`` (:mod:`torch.utils.flop_counter`) applies a formula to each aten op that has
one and attributes the count to every module on the call stack (``torch.utils.module_tracker``).
An op without a formula would simply add nothing; the recorder below it sees every op that ran,
so :attr:`OpCounts.uncounted` can name the ones that computed without a rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .probe import forward
from .rules import DATA_MOVEMENT, ELEMENT_RULES, op_name


class _OpRecorder(TorchDispatchMode):
    """Counts calls per aten op; entered *under* FlopCounterMode it sees exactly the ops that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Any] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class OpCounts:
    """What one forward pass computed.

    Attributes:
        by_scope: ``FlopCounterMode.get_flop_counts()``: ``"Global"`` and one entry per module
            (``"<RootClass>.<path>"``), each ``{aten packet: count}``; MAC ops in FLOPs (2 per MAC),
            element ops in element operations.
        uncounted: ops that ran with no rule and are not data movement: name → calls.
    """

    by_scope: dict[str, dict[Any, int]]
    uncounted: dict[str, int]


def count_ops(model: nn.Module, x: torch.Tensor) -> OpCounts:
    """Run ``model`` once on ``x`` under the counting rules (the caller sets eval mode and no_grad)."""
    counter = FlopCounterMode(display=False, custom_mapping={k: v[1] for k, v in ELEMENT_RULES.items()})
    recorder = _OpRecorder()
    # The recorder is entered first so FlopCounterMode dispatches (and decomposes) before it.
    with recorder, counter:
        forward(model, x)
    uncounted = {
        op_name(p): n for p, n in recorder.calls.items()
        if p not in counter.flop_registry and op_name(p) not in DATA_MOVEMENT
    }
    return OpCounts(counter.get_flop_counts(), uncounted)


def split(counts: dict[Any, int]) -> tuple[int, dict[str, int], int, dict[str, int]]:
    """Per-op counts of one scope → ``(macs, macs_by_op, element_ops, element_ops_by_op)``."""
    macs_by: Counter[str] = Counter()
    elem_by: Counter[str] = Counter()
    for packet, value in counts.items():
        if packet in ELEMENT_RULES:
            elem_by[ELEMENT_RULES[packet][0]] += value
        else:  # torch's own formulas count 2 FLOPs per multiply-accumulate
            macs_by[op_name(packet)] += value // 2
    return sum(macs_by.values()), dict(macs_by), sum(elem_by.values()), dict(elem_by)
