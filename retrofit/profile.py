"""Parameters, MACs, FLOPs and element operations of a model, in total, per module and per site.

Counting rules (the same text is in ``docs/profile.md`` and ``retrofit report params-flops --help``):

* **Parameters** — unique tensors: a module or tensor shared by two parents counts once.
  ``trainable_params`` are those with ``requires_grad``. Buffers (BatchNorm running stats) are
  not parameters.
* **MACs** — multiply-accumulates of convolution (1-D/2-D/3-D, grouped, depthwise, transposed)
  and of linear/matmul, counted on the aten ops that actually execute in one forward pass, with
  the formulas of :mod:`torch.utils.flop_counter` (``aten.convolution``, ``mm``, ``addmm``,
  ``bmm``, ``baddbmm``, attention kernels). So ``F.conv2d`` inside timm's ``Conv2dSame`` is
  counted, and so is ``a @ b``, whatever module (or none) calls it. Bias additions are not
  MACs, as in published tables. **FLOPs** = 2 × MACs.
* **Element operations** — everything else that computes, counted as its own line so the MAC
  total stays comparable with published tables (torchvision's ``_ops``, timm's GMACs):

  ====================================================  =========================================
  ops                                                   element operations
  ====================================================  =========================================
  add, sub, mul, div, sigmoid, relu, hardtanh (ReLU6),  1 per output element (in-place forms too)
  silu, gelu, hardswish, hardsigmoid, tanh, clamp, …
  mean, sum, amax, amin, adaptive average pooling       1 per input element
  max / average pooling with a k×k window               k·k per output element
  batch norm, inference (running statistics)            2 per element with affine, else 1
  batch norm in training, layer norm, group norm        5 per element with affine, else 4
  ====================================================  =========================================

  The norm rules are fvcore's (``fvcore/nn/jit_handles.py``). For an SE block this counts the
  squeeze (``mean``: C·H·W), the gate (``relu`` C/r, ``sigmoid`` C, the identity init's ``×2``
  C) and the scale (``x * gate``: C·H·W), which MAC-only counters drop.
* Data movement (views, ``cat``, padding, copies, allocation) costs nothing. Any other op that
  ran without a rule is listed in :attr:`Profile.uncounted_ops`, never silently dropped.

The model runs once in eval mode under ``torch.no_grad()`` on seeded standard-normal noise of
shape ``(batch_size, *input_size)``, on its own device and dtype; every module's train/eval flag is restored, so
nothing about the model changes (BatchNorm statistics included). Counting works the same inside
``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import RetrofitError

aten = torch.ops.aten

#: Ops that only move, view or allocate memory: zero cost, and not reported as uncounted.
DATA_MOVEMENT = frozenset(
    "view _unsafe_view reshape _reshape_alias t transpose permute expand expand_as squeeze unsqueeze "
    "flatten unflatten clone contiguous copy_ _to_copy to detach alias lift_fresh as_strided slice select "
    "narrow cat stack split split_with_sizes chunk unbind empty empty_like empty_strided new_empty "
    "new_empty_strided zeros zeros_like new_zeros ones ones_like new_ones full full_like new_full fill_ zero_ "
    "constant_pad_nd reflection_pad2d replication_pad2d roll flip channel_shuffle pixel_shuffle "
    "pixel_unshuffle index_select index _unsafe_index gather unfold repeat arange".split()
)

_POINTWISE = (
    "add sub rsub mul div neg abs sigmoid relu hardtanh hardsigmoid hardswish silu gelu mish leaky_relu elu "
    "softplus tanh exp log sqrt rsqrt reciprocal pow clamp clamp_min clamp_max maximum minimum where".split()
)
_REDUCTIONS = "mean sum amax amin _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d".split()
_WINDOWED_POOLS = (
    "max_pool2d max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool3d".split()
)


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _first_shape(out_shape: Any) -> torch.Size:
    """The shape of an op's (first) output; ``out_shape`` is a ``Size`` or a tuple of them."""
    if isinstance(out_shape, torch.Size):
        return out_shape
    return out_shape[0]


def _pointwise(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(_first_shape(out_shape))


def _reduction(x_shape: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(x_shape)


def _windowed_pool(x_shape: torch.Size, kernel_size: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    window = [kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
    spatial = len(x_shape) - 2
    if len(window) == 1 and spatial > 1:
        window = window * spatial
    return _numel(_first_shape(out_shape)) * math.prod(window)


def _bn_inference(x_shape: torch.Size, weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # (x - mean) / std * w + b folds to x * a + c with the running statistics.
    return _numel(x_shape) * (2 if weight is not None else 1)


def _bn(x_shape: torch.Size, weight: Any, bias: Any, mean: Any, var: Any, training: bool, *args: Any,
        out_shape: Any = None, **kwargs: Any) -> int:
    if not training and mean is not None:
        return _bn_inference(x_shape, weight)
    return _numel(x_shape) * (5 if weight is not None else 4)


def _bn_batch_stats(x_shape: torch.Size, weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(x_shape) * (5 if weight is not None else 4)


def _layer_norm(x_shape: torch.Size, normalized_shape: Any, weight: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    return _numel(x_shape) * (5 if weight is not None else 4)


def _element_rules() -> dict[Any, tuple[str, Callable[..., int]]]:
    """``{aten packet: (label, formula)}`` for the element operations (see the module docstring)."""
    rules: dict[Any, tuple[str, Callable[..., int]]] = {}

    def add(name: str, label: str, formula: Callable[..., int]) -> None:
        if hasattr(aten, name):  # an op missing from this torch version is simply not counted
            rules[getattr(aten, name)] = (label, formula)

    for name in _POINTWISE:
        add(name, name, _pointwise)
        add(name + "_", name, _pointwise)
    for name in _REDUCTIONS:
        add(name, name.lstrip("_"), _reduction)
    for name in _WINDOWED_POOLS:
        add(name, name.replace("_with_indices", ""), _windowed_pool)
    add("_native_batch_norm_legit_no_training", "batch_norm", _bn_inference)
    add("_native_batch_norm_legit", "batch_norm", _bn_batch_stats)
    add("native_batch_norm", "batch_norm", _bn)
    add("cudnn_batch_norm", "batch_norm", _bn)
    add("native_layer_norm", "layer_norm", _layer_norm)
    add("native_group_norm", "group_norm", _bn_batch_stats)
    return rules


ELEMENT_RULES = _element_rules()


def _op_name(packet: Any) -> str:
    return str(packet).removeprefix("aten.")


@dataclass(frozen=True)
class Cost:
    """Counts for one module, site or whole model.

    Attributes:
        params: parameters (unique tensors).
        macs: multiply-accumulates of convolutions and matmuls (per forward of the batch).
        element_ops: element operations (pooling, activations, gates, multiplies, adds, norms).
        element_ops_by_op: ``element_ops`` split by op label (``mean``, ``sigmoid``, ``mul``, …).
    """

    params: int
    macs: int
    element_ops: int
    element_ops_by_op: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """2 × MACs (one multiply and one add per MAC)."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops, "element_ops": self.element_ops,
                "element_ops_by_op": dict(sorted(self.element_ops_by_op.items()))}


@dataclass(frozen=True)
class ModuleCost(Cost):
    """One module's counts, inclusive of its children. ``name`` is its qualified path (``""``: root)."""

    name: str = ""
    type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, **super().to_dict()}


@dataclass(frozen=True)
class SiteCost(Cost):
    """The cost of one inserted attention block, or of one SE module swapped by ``--replace-existing``.

    ``key`` is its module path (``layer1.0.se``), ``owner`` the module it was inserted into
    (for a swap: the module holding it);
    ``channels``, ``height``, ``width`` describe the map it gates in the profiled forward pass;
    ``stage`` is the site's stage (:attr:`retrofit.graph.Site.stage`); ``setting`` reads like ``r=16 (16)``.
    For a swap, ``replaced`` is the former module's class (``SqueezeExcite``) and ``replaced_params``
    its parameters, which the base model holds: the Δ of the totals is then the rows' ``params``
    minus their ``replaced_params`` (for inserted blocks both are empty: the Δ is the rows' sum).
    """

    key: str = ""
    owner: str = ""
    block: str = ""
    channels: int = 0
    height: int = 0
    width: int = 0
    stage: int = 0
    setting: str = ""
    replaced: str = ""
    replaced_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "owner": self.owner, "block": self.block, "setting": self.setting,
                "channels": self.channels, "height": self.height, "width": self.width, "stage": self.stage,
                "replaced": self.replaced, "replaced_params": self.replaced_params, **super().to_dict()}


@dataclass(frozen=True)
class Latency:
    """Forward-pass wall time: the median over ``runs`` timed runs after ``warmup`` untimed ones.

    Attributes:
        median_ms: median of the timed runs, milliseconds.
        min_ms: fastest timed run, milliseconds.
        p25_ms, p75_ms: first and third quartile of the timed runs, milliseconds: the
            run-to-run spread; a difference of medians smaller than it is not a measured one.
        runs, warmup: how many timed and untimed forward passes.
        device: ``"cpu"`` or the CUDA device's name, e.g. ``"cuda:0 (NVIDIA H200)"``.
        threads: ``torch.get_num_threads()`` during the runs (intra-op CPU threads).
        batch_size: N of the input.
    """

    median_ms: float
    min_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    warmup: int
    device: str
    threads: int
    batch_size: int

    @property
    def spread_ms(self) -> float:
        """Interquartile range of the timed runs (``p75_ms - p25_ms``), milliseconds."""
        return self.p75_ms - self.p25_ms

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms,
                "spread_ms": self.spread_ms, "runs": self.runs, "warmup": self.warmup, "device": self.device, "threads": self.threads,
                "batch_size": self.batch_size}


@dataclass(frozen=True)
class Profile:
    """What :func:`profile` measured: totals, per-module rows and per-site rows.

    Attributes:
        input_size: the input without its batch dimension, e.g. ``(3, 224, 224)``.
        batch_size: N; MACs and element ops are for the whole batch, params are not.
        params, trainable_params: parameter counts (unique tensors).
        macs: multiply-accumulates of conv/linear/matmul; ``flops`` is 2 × ``macs``.
        element_ops: pooling, activation, gate, multiply, add and norm operations.
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
            "macs_by_op": dict(sorted(self.macs_by_op.items())),
            "element_ops_by_op": dict(sorted(self.element_ops_by_op.items())),
            "uncounted_ops": dict(sorted(self.uncounted_ops.items())),
            "sites": [s.to_dict() for s in self.sites],
            "latency": self.latency.to_dict() if self.latency else None,
        }
        if modules:
            out["modules"] = [m.to_dict() for m in self.modules]
        return out


class _OpRecorder(TorchDispatchMode):
    """Counts calls per aten op; entered *under* FlopCounterMode it sees exactly the ops that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Any] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def _check_size(input_size: Sequence[int], batch_size: int) -> tuple[int, ...]:
    size = tuple(input_size)
    if not size or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise RetrofitError(f"input size must be positive integers such as (3, 224, 224), got {input_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RetrofitError(f"batch size must be a positive integer, got {batch_size!r}")
    return size


def _probe(model: nn.Module, size: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """``(batch_size, *size)`` standard-normal input on the model's device and dtype (seeded, global RNG untouched)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    try:
        return torch.randn((batch_size, *size), generator=g).to(device=device, dtype=dtype)
    except (RuntimeError, MemoryError, TypeError, OverflowError) as e:  # "can't allocate memory"; a size past int64
        shape = "×".join(map(str, (batch_size, *size)))
        raise RetrofitError(
            f"cannot allocate an input of {shape} ({type(e).__name__}); try a smaller --batch-size or --input-size"
        ) from None


class _EvalNoGrad:
    """Eval mode and no_grad for the duration; every module's train/eval flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for m, training in self.modes:
            m.training = training


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except RetrofitError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        memory = isinstance(e, MemoryError) or "allocate" in str(e) or "out of memory" in str(e)
        hint = "try a smaller --batch-size or --input-size" if memory else "check --input-size"
        raise RetrofitError(
            f"the forward pass on an input of shape {tuple(x.shape)} failed "
            f"({type(e).__name__}: {text[0][:200] if text else ''}); {hint}"
        ) from e


def _split(counts: dict[Any, int]) -> tuple[int, dict[str, int], int, dict[str, int]]:
    """Per-op counts of FlopCounterMode → (macs, macs_by_op, element_ops, element_ops_by_op)."""
    macs_by: Counter[str] = Counter()
    elem_by: Counter[str] = Counter()
    for packet, value in counts.items():
        if packet in ELEMENT_RULES:
            elem_by[ELEMENT_RULES[packet][0]] += value
        else:  # torch's own formulas count 2 FLOPs per multiply-accumulate
            macs_by[_op_name(packet)] += value // 2
    return sum(macs_by.values()), dict(macs_by), sum(elem_by.values()), dict(elem_by)


def _unique_params(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


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
        model: any ``nn.Module`` taking one tensor; a retrofitted model (``model._retrofit``)
            also gets one :class:`SiteCost` row per inserted block.
        input_size: the input without batch, e.g. ``(C, H, W)`` = ``(3, 224, 224)``.
        batch_size: N of the probe input ``(N, *input_size)``; MACs scale with it.
        latency: also time the forward pass (see :func:`measure_latency`).
        runs, warmup: timed and untimed forward passes for ``latency``.

    Returns:
        A :class:`Profile`. MACs and element ops follow the counting rules of this module's
        docstring; ``flops`` is 2 × ``macs``.

    Raises:
        RetrofitError: a size that is not positive integers, or a forward pass that fails on
            ``(N, *input_size)`` (e.g. a wrong channel count).

    Built on :class:`torch.utils.flop_counter.FlopCounterMode` (its conv/matmul formulas and
    module tracking), with the element-operation formulas added as its ``custom_mapping``.
    """
    size = _check_size(input_size, batch_size)
    x = _probe(model, size, batch_size)
    counter = FlopCounterMode(display=False, custom_mapping={k: v[1] for k, v in ELEMENT_RULES.items()})
    recorder = _OpRecorder()
    with _EvalNoGrad(model), _SiteShapes(model) as shapes:
        # The recorder is entered first so FlopCounterMode dispatches (and decomposes) before it.
        with recorder, counter:
            _forward(model, x)
    counts = counter.get_flop_counts()
    macs, macs_by, elem, elem_by = _split(counts.get("Global", {}))
    uncounted = {
        _op_name(p): n for p, n in recorder.calls.items()
        if p not in counter.flop_registry and _op_name(p) not in DATA_MOVEMENT
    }
    params, trainable = _unique_params(model)
    modules = _module_rows(model, counts)
    timing = measure_latency(model, size, batch_size, runs=runs, warmup=warmup) if latency else None
    return Profile(size, batch_size, params, trainable, macs, elem, macs_by, elem_by, uncounted, modules,
                   _site_rows(model, modules, shapes.shapes, size), timing)


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
        macs, _, elem, elem_by = _split(by_path[path])
        params, _ = _unique_params(module)
        rows.append(ModuleCost(params, macs, elem, elem_by, name=path, type=type(module).__name__))
    return tuple(rows)


class _SiteShapes:
    """Records the input shape of each inserted block during the profiled forward (hooks removed after)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = {key: model.get_submodule(key) for key in _block_keys(model)}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "_SiteShapes":
        for key, block in self.blocks.items():
            def hook(module: nn.Module, args: tuple, key: str = key) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    self.shapes[key] = tuple(args[0].shape)

            self.handles.append(block.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _block_keys(model: nn.Module) -> list[str]:
    """Module paths of a retrofitted model's blocks: inserted ones, then ``--replace-existing`` swaps."""
    record = getattr(model, "_retrofit", None)
    if record is None:
        return []
    return [s.key for s in record.sites] + [r.path for r in record.replaced]


def _site_rows(
    model: nn.Module, modules: tuple[ModuleCost, ...], shapes: dict[str, tuple[int, ...]],
    input_size: tuple[int, ...],
) -> tuple[SiteCost, ...]:
    record = getattr(model, "_retrofit", None)
    if record is None:
        return ()
    from .blocks import block_class
    from .graph import _stages, _stride

    rows_by_name = {m.name: m for m in modules}

    def row(key: str, owner: str, block: str, channels: int, options: dict[str, Any], height: int, width: int,
            stage: int, replaced: str = "", replaced_params: int = 0) -> SiteCost:
        counted = rows_by_name.get(key)
        params, _ = _unique_params(model.get_submodule(key))
        return SiteCost(
            params,
            counted.macs if counted else 0,
            counted.element_ops if counted else 0,
            dict(counted.element_ops_by_op) if counted else {},
            key=key, owner=owner, block=block, channels=channels, height=height, width=width,
            stage=stage, setting=block_class(block).describe(options), replaced=replaced,
            replaced_params=replaced_params,
        )

    out = []
    for s in record.sites:
        shape = shapes.get(s.key, ())
        height, width = (shape[2], shape[3]) if len(shape) == 4 else (s.site.height, s.site.width)
        out.append(row(s.key, s.owner, s.block, s.channels, s.options, height, width, s.site.stage))
    for r in record.replaced:
        # A swapped SE module has no Site: its map and stage are read off the profiled forward.
        shape = shapes.get(r.path, ())
        height, width = (shape[2], shape[3]) if len(shape) == 4 else (0, 0)
        stage = _stages(model, [_stride(input_size[-2], height)])[0] if height else 0
        out.append(row(r.path, r.path.rpartition(".")[0], record.block, r.channels, r.options, height, width, stage,
                       r.was, r.params_before))
    return tuple(out)


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
) -> Latency:
    """Median forward time of ``model`` on ``(batch_size, *input_size)``, eval mode, no grad.

    ``warmup`` untimed passes first (allocator, cuDNN autotuning, caches), then ``runs`` timed
    ones with ``time.perf_counter``; on CUDA each timed pass is bracketed by
    ``torch.cuda.synchronize``. Runs on the model's own device with the current
    ``torch.get_num_threads()``; the model's train/eval flags are restored.

    Raises:
        RetrofitError: ``runs`` < 20 (a median of fewer is noise on a shared machine), negative
            ``warmup``, a bad size, or a failing forward pass.
    """
    return measure_latencies([model], input_size, batch_size, runs=runs, warmup=warmup)[0]


def measure_latencies(
    models: Sequence[nn.Module],
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
) -> list[Latency]:
    """:func:`measure_latency` for several models, their timed runs interleaved.

    Run ``i`` of every model happens before run ``i + 1`` of any, so a load change on the
    machine while measuring (other processes, thermal throttling) shifts all models alike and
    the comparison of base and retrofitted stays fair.
    """
    if not isinstance(runs, int) or runs < 20:
        raise RetrofitError(f"latency needs at least 20 timed runs, got {runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise RetrofitError(f"warm-up runs must be a non-negative integer, got {warmup!r}")
    size = _check_size(input_size, batch_size)
    inputs = [_probe(m, size, batch_size) for m in models]
    times: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(_EvalNoGrad(m))
        for m, x in zip(models, inputs):
            for _ in range(warmup):
                _forward(m, x)
        for _ in range(runs):
            for m, x, t in zip(models, inputs, times):
                t.append(_timed_forward(m, x))
    out = []
    for x, t in zip(inputs, times):
        q1, _, q3 = statistics.quantiles(t, n=4)
        out.append(Latency(1e3 * statistics.median(t), 1e3 * min(t), 1e3 * q1, 1e3 * q3, runs, warmup,
                           _device_name(x.device), torch.get_num_threads(), batch_size))
    return out


def _timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    _forward(model, x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


#: Keys of :meth:`TargetReport.to_dict` ``delta`` / ``delta_percent`` (stable; see docs/profile.md).
DELTA_KEYS = ("params", "trainable_params", "macs", "flops", "element_ops", "latency_ms")


@dataclass(frozen=True)
class TargetReport:
    """The profile of a CLI target: a model name, or a checkpoint compared with its base model.

    Attributes:
        target: as given (model name or ``.safetensors`` path).
        kind: ``"model"`` or ``"checkpoint"``.
        name: the architecture's name (a checkpoint's source model).
        model: profile of the target (the retrofitted model for a checkpoint).
        base: profile of the checkpoint's base architecture, without blocks; ``None`` for a model.
    """

    target: str
    kind: str
    name: str
    model: Profile
    base: Profile | None = None

    def delta(self) -> dict[str, float | int | None] | None:
        """Retrofitted − base for :data:`DELTA_KEYS` (``latency_ms`` is ``None`` unless timed)."""
        if self.base is None:
            return None
        return {k: _sub(_metric(self.model, k), _metric(self.base, k)) for k in DELTA_KEYS}

    def delta_percent(self) -> dict[str, float | None] | None:
        """100 × Δ / base for :data:`DELTA_KEYS` (``None`` where the base is 0 or not measured)."""
        delta = self.delta()
        if delta is None:
            return None
        out: dict[str, float | None] = {}
        for k, d in delta.items():
            b = _metric(self.base, k)  # type: ignore[arg-type]
            out[k] = None if d is None or not b else 100.0 * d / b
        return out

    def latency_delta_measured(self) -> bool | None:
        """Whether the latency Δ of medians is larger than the run-to-run spread of both timings.

        ``False``: the Δ lies inside the larger :attr:`Latency.spread_ms` (interquartile range), so
        no difference was measured. ``None`` when there is no base or no timing.
        """
        if self.base is None or self.base.latency is None or self.model.latency is None:
            return None
        spread = max(self.model.latency.spread_ms, self.base.latency.spread_ms)
        return abs(self.model.latency.median_ms - self.base.latency.median_ms) > spread

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``retrofit.params-flops/1``)."""
        return {
            "schema": "retrofit.params-flops/1",
            "target": self.target,
            "kind": self.kind,
            "name": self.name,
            "input_size": list(self.model.input_size),
            "batch_size": self.model.batch_size,
            "model": self.model.to_dict(),
            "base": self.base.to_dict() if self.base else None,
            "delta": self.delta(),
            "delta_percent": self.delta_percent(),
            "latency_delta_measured": self.latency_delta_measured(),
        }


def _metric(p: Profile, key: str) -> float | int | None:
    if key == "latency_ms":
        return p.latency.median_ms if p.latency else None
    return getattr(p, key)


def _sub(a: float | int | None, b: float | int | None) -> float | int | None:
    return None if a is None or b is None else a - b


def profile_target(
    target: str,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    latency: bool = False,
) -> TargetReport:
    """Profile a model name, or a retrofit checkpoint together with its base architecture.

    A checkpoint (``*.safetensors``) is loaded with :func:`retrofit.load_checkpoint`; its base is
    the recipe's source architecture built without blocks and without weights (weights do not
    change any count). A model name is resolved by :func:`retrofit.load_model` with
    ``pretrained`` / ``weights``. ``input_size`` ``None``: ``(3, 224, 224)``, or for a checkpoint
    written by ``retrofit finetune`` the input size it was trained at (its recorded data config).

    Raises:
        RetrofitError: unknown name, unreadable checkpoint, weights unavailable, bad size.
    """
    from .checkpoint import is_checkpoint, load_target, read_recipe
    from .models import ModelSpec, build

    size = _check_size(input_size, batch_size) if input_size is not None else None  # before any loading
    model = load_target(target, pretrained=pretrained, weights=weights)
    if size is None:
        trained = (getattr(model, "retrofit_data_config", None) or {}).get("input_size")
        size = _check_size(tuple(int(v) for v in trained) if trained else (3, 224, 224), batch_size)
    if not is_checkpoint(target):
        return TargetReport(str(target), "model", str(target), profile(model, size, batch_size, latency=latency))
    source = read_recipe(target).source
    base_model = build(ModelSpec(source["model"], source["zoo"], dict(source.get("kwargs") or {}))).eval()
    base, retrofitted = profile(base_model, size, batch_size), profile(model, size, batch_size)
    if latency:
        timed = measure_latencies([base_model, model], size, batch_size)
        base = replace(base, latency=timed[0])
        retrofitted = replace(retrofitted, latency=timed[1])
    return TargetReport(str(target), "checkpoint", source["model"], retrofitted, base)
