"""Parameters, MACs, FLOPs and element operations of a model, in total, per module and per site.

Counting rules (the same text is in ``docs/profile.md`` and ``retrofit report params-flops --help``):

* **Parameters** — unique tensors: a module or tensor shared by two parents counts once.
  ``trainable_params`` are those with ``requires_grad``. Buffers (BatchNorm running stats) are
  not parameters.
* **MACs** — multiply-accumulates of convolution (1-D/2-D/3-D, grouped, depthwise, transposed),
  of linear/matmul and of attention, counted on the aten ops that actually execute in one
  forward pass, with the formulas of :mod:`torch.utils.flop_counter` (``aten.convolution``,
  ``mm``, ``addmm``, ``bmm``, ``baddbmm``, the SDPA kernels; the CPU flash-attention kernel gets
  the same QKᵀ + A·V formula here). So ``F.conv2d`` inside timm's ``Conv2dSame`` is counted, and
  so is ``a @ b``, whatever module (or none) calls it. ``nn.MultiheadAttention``'s fused fast
  path is turned off while counting, so its projections and attention are counted like any
  other. Bias additions are not MACs, as in published tables. **FLOPs** = 2 × MACs.
* **Element operations** — everything else that computes, counted as its own line:

  ====================================================  =========================================
  ops                                                   element operations
  ====================================================  =========================================
  add, sub, mul, div, sigmoid, relu, hardtanh (ReLU6),  1 per output element (in-place forms too)
  silu, gelu, hardswish, hardsigmoid, tanh, clamp,
  comparisons, masked_fill, …
  mean, sum, amax, amin, adaptive average pooling       1 per input element
  max / average pooling with a k×k window               k·k per output element
  linear / bilinear / trilinear / bicubic upsampling    2 / 4 / 8 / 16 per output element
  batch norm, inference (running statistics)            2 per element with affine, else 1
  batch norm in training, layer norm, group norm        5 per element with affine, else 4
  ====================================================  =========================================

  The norm rules are fvcore's (``fvcore/nn/jit_handles.py``). For an SE block this counts the
  squeeze (``mean``: C·H·W), the gate (``relu`` C/r, ``sigmoid`` C, the identity init's ``×2``
  C) and the scale (``x * gate``: C·H·W), which MAC-only counters drop.
* **fvcore-style MACs** — MACs plus the norm and upsampling operations that fvcore's
  ``FlopCountAnalysis`` also counts (with the same rules; nearest resizing 1 per output
  element): the total timm publishes as GMACs.
* Data movement (views, ``cat``, padding, copies, allocation, nearest resizing) costs nothing.
  Any other op that ran without a rule (e.g. ``_softmax``) is listed in
  :attr:`Profile.uncounted_ops`, never silently dropped.

The model runs once in eval mode under ``torch.no_grad()`` on seeded standard-normal noise of
shape ``(batch_size, *input_size)``, on its own device and dtype; every module's train/eval flag is restored, so
nothing about the model changes (BatchNorm statistics included). Counting works the same inside
``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .costs import ModuleCost, unique_params
from .counter import count_ops, split
from .latency import Latency, measure_latency
from ..squeeze import exact_squeeze
from .probe import EvalNoGrad, check_size, probe_input
from .sites import SiteCost, SiteShapes, site_rows


@dataclass(frozen=True)
class Profile:
    """What :func:`profile` measured: totals, per-module rows and per-site rows.

    Attributes:
        input_size: the input without its batch dimension, e.g. ``(3, 224, 224)``.
        batch_size: N; MACs and element ops are for the whole batch, params are not.
        params, trainable_params: parameter counts (unique tensors).
        macs: multiply-accumulates of conv/linear/matmul; ``flops`` is 2 × ``macs``.
        element_ops: pooling, activation, gate, multiply, add, norm and upsampling operations.
        fvcore_macs: ``macs`` plus the norm and upsampling operations fvcore also counts
            (:data:`retrofit.profiling.rules.FVCORE_ELEMENT_LABELS`): comparable with timm's
            published GMACs, which are fvcore totals.
        macs_by_op: ``macs`` split by aten op (``convolution``, ``addmm``, ``bmm``, …).
        element_ops_by_op: ``element_ops`` split by op label (``mean``, ``sigmoid``, …).
        uncounted_ops: ops that ran with no counting rule and are not data movement: name → calls.
        modules: one :class:`ModuleCost` per module that ran (root first, then in
            ``named_modules`` order), inclusive of children.
        sites: one :class:`SiteCost` per inserted block of a retrofitted model, else empty.
        latency: set when :func:`profile` was called with ``latency=True``.
    """

    input_size: tuple[int, ...]
    batch_size: int
    params: int
    trainable_params: int
    macs: int
    element_ops: int
    fvcore_macs: int
    macs_by_op: dict[str, int]
    element_ops_by_op: dict[str, int]
    uncounted_ops: dict[str, int]
    modules: tuple[ModuleCost, ...]
    sites: tuple[SiteCost, ...]
    latency: Latency | None = None

    @property
    def flops(self) -> int:
        """2 × MACs."""
        return 2 * self.macs

    def module(self, name: str) -> ModuleCost:
        """The row of the module at ``name`` (``""`` for the root); ``KeyError`` if it did not run."""
        for row in self.modules:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self, modules: bool = False) -> dict[str, Any]:
        """JSON-ready totals, sites and latency; per-module rows too with ``modules=True``."""
        out = {
            "input_size": list(self.input_size),
            "batch_size": self.batch_size,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "macs": self.macs,
            "flops": self.flops,
            "element_ops": self.element_ops,
            "fvcore_macs": self.fvcore_macs,
            "macs_by_op": dict(sorted(self.macs_by_op.items())),
            "element_ops_by_op": dict(sorted(self.element_ops_by_op.items())),
            "uncounted_ops": dict(sorted(self.uncounted_ops.items())),
            "sites": [s.to_dict() for s in self.sites],
            "latency": self.latency.to_dict() if self.latency else None,
        }
        if modules:
            out["modules"] = [m.to_dict() for m in self.modules]
        return out


def profile(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    *,
    latency: bool = False,
    runs: int = 20,
    warmup: int = 5,
) -> Profile:
    """Count parameters, MACs, FLOPs and element operations of one forward pass of ``model``.

    Args:
        model: any ``nn.Module`` taking one tensor, or an ``nn.MultiheadAttention``, which is
            profiled as self-attention on tokens ``(N, L, E)`` (see
            :func:`retrofit.profiling.probe.forward`); a retrofitted model (``model._retrofit``)
            also gets one :class:`SiteCost` row per inserted block.
        input_size: the input without batch, e.g. ``(C, H, W)`` = ``(3, 224, 224)``, or
            ``(L, E)`` tokens for attention.
        batch_size: N of the probe input ``(N, *input_size)``; MACs scale with it.
        latency: also time the forward pass (see :func:`measure_latency`).
        runs, warmup: timed and untimed forward passes for ``latency``.

    Returns:
        A :class:`Profile`. MACs and element ops follow the counting rules of this module's
        docstring; ``flops`` is 2 × ``macs``.

    Raises:
        RetrofitError: a size that is not positive integers, or a forward pass that fails on
            ``(N, *input_size)`` (e.g. a wrong channel count).

    Built on :class:`torch.utils.flop_counter.FlopCounterMode` (its conv/matmul/attention
    formulas and module tracking), with :mod:`retrofit.profiling.rules` added as its
    ``custom_mapping``.
    """
    size = check_size(input_size, batch_size)
    x = probe_input(model, size, batch_size)
    # The blocks' cost as the papers define it: every gate squeezes the map it gates (squeeze.py).
    with EvalNoGrad(model), exact_squeeze(), SiteShapes(model) as shapes:
        counts = count_ops(model, x)
    total = split(counts.by_scope.get("Global", {}))
    params, trainable = unique_params(model)
    modules = _module_rows(model, counts.by_scope)
    timing = measure_latency(model, size, batch_size, runs=runs, warmup=warmup) if latency else None
    return Profile(size, batch_size, params, trainable, total.macs, total.element_ops, total.fvcore_macs,
                   total.macs_by_op, total.element_ops_by_op, counts.uncounted, modules,
                   site_rows(model, modules, shapes.shapes, size), timing)


def _module_rows(model: nn.Module, counts: dict[str, dict[Any, int]]) -> tuple[ModuleCost, ...]:
    # ModuleTracker names the root by its class and children by "<Class>.<path>".
    root = type(model).__name__
    by_path = {}
    for name, per_op in counts.items():
        if name == root:
            by_path[""] = per_op
        elif name.startswith(root + "."):
            by_path[name[len(root) + 1:]] = per_op
    rows = []
    for path, module in model.named_modules():
        if path not in by_path:
            continue
        counted = split(by_path[path])
        params, _ = unique_params(module)
        rows.append(ModuleCost(params, counted.macs, counted.element_ops, counted.element_ops_by_op, name=path,
                               type=type(module).__name__))
    return tuple(rows)
