"""What a fine-tune does to the inserted blocks: gate statistics per stage, and how far each parameter group moved.

Two records per epoch, kept in the run's history and written as ``gates.csv`` and ``drift.csv``
(:mod:`.outputs`):

* **Gates** (:class:`GateRecorder`): during validation, every inserted
  :class:`~retrofit.blocks.ChannelGate`'s gate values ``(N, C, 1, 1)`` pooled per stage: mean, standard
  deviation, min, max, and the mean distance from 1. With identity init every gate starts at
  exactly 1 (the model computes what the pretrained one did), so the distance from 1 is how far
  the blocks have taken the network from its pretrained function; a gate near 0 or 2 (identity
  init's range is (0, 2)) is saturated.
* **Drift** (:func:`parameter_drift`): for the backbone, the inserted blocks and the head, the
  root-mean-square change of their parameters since the run's start, and that change relative
  to the starting norm (empty when the group started at 0, as the zero-initialised last layer
  of an identity-init gate does).

These are measurements for docs/results.md and for users who ask why a retrofit helped or hurt;
they never change training.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn

from ..blocks import ChannelGate
from ..surgery import MODEL_MARK
from .model import GROUPS, parameter_group_names

#: ``gates.csv`` columns: one row per (epoch, stage).
GATE_COLUMNS = ("epoch", "stage", "sites", "gate_mean", "gate_std", "gate_min", "gate_max", "gate_mean_abs_dev_from_1")
#: ``drift.csv`` columns: one row per (epoch, parameter group).
DRIFT_COLUMNS = ("epoch", "group", "params", "since_epoch", "rms_change", "relative_change")


def gate_stages(model: nn.Module) -> dict[str, int]:
    """Qualified name of each inserted gate module → its stage (from the retrofit record; 0 when unknown)."""
    record = getattr(model, MODEL_MARK, None)
    by_key = {s.key: s.site.stage for s in record.sites} if record is not None else {}
    return {name: int(by_key.get(name, 0)) for name, m in model.named_modules() if isinstance(m, ChannelGate)}


class GateRecorder:
    """Forward hooks that pool every inserted gate's values per stage while active.

    Use as ``with GateRecorder(model) as rec: evaluate(...)``; then :meth:`rows` gives the
    per-stage statistics. A fused gate's module returns the gate itself ``(N, C, 1, 1)``; an
    unfused one returns ``x · gate``, so its gate is recomputed from the hook's input (only while
    recording, i.e. during validation). Sums are kept in float64 on the CPU.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages = gate_stages(model)
        self._sums: dict[int, list[float]] = {}
        self._sites: dict[int, set[str]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "GateRecorder":
        for name, module in self.model.named_modules():
            if name in self.stages:
                self._handles.append(module.register_forward_hook(self._hook(name, self.stages[name])))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str, stage: int) -> Any:
        def hook(module: ChannelGate, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            with torch.no_grad():
                gate = output if module.fused else module.gate(inputs[0])
                g = gate.detach().double().flatten().cpu()
            s = self._sums.setdefault(stage, [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0])
            s[0] += g.numel()
            s[1] += float(g.sum())
            s[2] += float((g * g).sum())
            s[3] = min(s[3], float(g.min()))
            s[4] = max(s[4], float(g.max()))
            s[5] += float((g - 1).abs().sum())
            self._sites.setdefault(stage, set()).add(name)
        return hook

    def rows(self, epoch: int) -> list[dict[str, Any]]:
        """One dict per stage (``GATE_COLUMNS``), in stage order; empty when nothing was recorded."""
        out = []
        for stage in sorted(self._sums):
            n, total, squares, lo, hi, dev = self._sums[stage]
            mean = total / n
            out.append({"epoch": epoch, "stage": stage, "sites": len(self._sites[stage]), "gate_mean": mean,
                        "gate_std": math.sqrt(max(squares / n - mean * mean, 0.0)), "gate_min": lo, "gate_max": hi,
                        "gate_mean_abs_dev_from_1": dev / n})
        return out


def parameter_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU float32 copy of every parameter: the starting point :func:`parameter_drift` measures from."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def parameter_drift(model: nn.Module, start: dict[str, torch.Tensor], epoch: int, *,
                    since: int = 0) -> list[dict[str, Any]]:
    """Per group (backbone, blocks, head; absent groups left out): parameters, RMS change since ``start``
    (the weights after epoch ``since``: 0 = the run's start, or the epoch a resumed run began at),
    and the change's L2 norm over the starting L2 norm (None when the group started at 0).

    Parameters missing from ``start`` (a head replaced after the snapshot) count from 0.
    """
    which = parameter_group_names(model)
    acc: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            now = p.detach().double().cpu()
            before = start.get(name)
            before = torch.zeros_like(now) if before is None or before.shape != now.shape else before.double()
            a = acc.setdefault(which[name], [0.0, 0.0, 0.0])
            a[0] += now.numel()
            a[1] += float(((now - before) ** 2).sum())
            a[2] += float((before ** 2).sum())
    rows = []
    for group in GROUPS:
        if group in acc:
            n, change, norm = acc[group]
            rows.append({"epoch": epoch, "group": group, "params": int(n), "since_epoch": since, "rms_change": math.sqrt(change / n),
                         "relative_change": math.sqrt(change / norm) if norm > 0 else None})
    return rows


@contextlib.contextmanager
def recording_gates(model: nn.Module, on: bool = True) -> Iterator[GateRecorder | None]:
    """:class:`GateRecorder` on ``model`` when ``on`` and it has inserted gates, else None."""
    if not on or not any(isinstance(m, ChannelGate) for m in model.modules()):
        yield None
        return
    with GateRecorder(model) as rec:
        yield rec
