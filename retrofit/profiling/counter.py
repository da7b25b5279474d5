"""One counted forward pass: ``FlopCounterMode`` with retrofit's rules, and a recorder of every op that ran.

``FlopCounterMode`` (:mod:`torch.utils.flop_counter`) applies a formula to each aten op that has
one and attributes the count to every module on the call stack (``torch.utils.module_tracker``).
An op without a formula would simply add nothing; the recorder below it sees every op that ran,
so :attr:`OpCounts.uncounted` can name the ones that computed without a rule.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .probe import forward
from .rules import DATA_MOVEMENT, FVCORE_ELEMENT_LABELS, RULES, flop_mapping, op_name


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


@contextlib.contextmanager
def _mha_fast_path_off() -> Iterator[None]:
    """Without this, ``nn.MultiheadAttention`` in eval under ``no_grad`` runs one fused kernel
    (``_native_multi_head_attention``) that no formula covers, projections included."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _params_without_grad(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for the counted pass, restored after.

    FlopCounterMode's module tracker (``torch.utils.module_tracker``) hooks every module input
    that requires grad for the backward pass, and fails on a view of a parameter made under
    ``no_grad`` (it requires grad but has no grad_fn: timm's CaiT passes ``cls_token.expand(…)``
    to its class-attention blocks). Nothing here runs backward.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def count_ops(model: nn.Module, x: torch.Tensor) -> OpCounts:
    """Run ``model`` once on ``x`` under the counting rules (the caller sets eval mode and no_grad)."""
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    recorder = _OpRecorder()
    # The recorder is entered first so FlopCounterMode dispatches (and decomposes) before it.
    with _mha_fast_path_off(), _params_without_grad(model), recorder, counter:
        forward(model, x)
    uncounted = {
        op_name(p): n for p, n in recorder.calls.items()
        if p not in counter.flop_registry and op_name(p) not in DATA_MOVEMENT
    }
    return OpCounts(counter.get_flop_counts(), uncounted)


@dataclass(frozen=True)
class Totals:
    """The counts of one scope, split by kind (see :class:`.rules.Rule`).

    ``resized`` is the output elements of nearest resizing: data movement, in no total but
    :attr:`fvcore_macs`.
    """

    macs: int
    macs_by_op: dict[str, int]
    element_ops: int
    element_ops_by_op: dict[str, int]
    resized: int

    @property
    def fvcore_macs(self) -> int:
        """MACs plus what fvcore's ``FlopCountAnalysis`` also counts (:data:`.rules.FVCORE_ELEMENT_LABELS`, resizing)."""
        extra = sum(v for k, v in self.element_ops_by_op.items() if k in FVCORE_ELEMENT_LABELS)
        return self.macs + extra + self.resized


def split(counts: dict[Any, int]) -> Totals:
    """Per-op counts of one scope → :class:`Totals`."""
    macs_by: Counter[str] = Counter()
    elem_by: Counter[str] = Counter()
    resized = 0
    for packet, value in counts.items():
        rule = RULES.get(packet)
        if rule is None or rule.kind == "macs":  # torch's formulas and ours count 2 FLOPs per MAC
            macs_by[op_name(packet)] += value // 2
        elif rule.kind == "element":
            elem_by[rule.label] += value
        else:
            resized += value
    return Totals(sum(macs_by.values()), dict(macs_by), sum(elem_by.values()), dict(elem_by), resized)
