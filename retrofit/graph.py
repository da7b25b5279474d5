"""Find residual sites: additions of a residual branch and a shortcut, found with torch.fx.

Each module is traced *shallowly*: its own ``forward`` becomes a graph and every child module
is a leaf call (so timm's non-traceable layers such as ``Conv2dSame`` or ``BatchNormAct2d`` are
never traced into, and a child's ``self.training`` control flow stays live). An addition
(``operator.add``/``iadd``, ``torch.add``, ``Tensor.add``/``add_``) found in a module's own
graph is a **site** when:

* both operands are ``(N, C, H, W)`` feature maps of the same shape (found by shape
  propagation on the module's real input during one dummy forward of the whole model, in eval
  mode, no grad, batch of :data:`PROBE_BATCH`): 4-D, N the probe's batch, and H×W with the
  input's aspect ratio (see :func:`is_feature_map`), and
* the operands share an ancestor inside the module (the unit's input), itself an
  ``(N, C, H, W)`` map when it is a tensor. The operand with the shorter path from that
  ancestor is the **shortcut** (an identity shortcut is the ancestor itself, no ops); the
  other is the **residual branch**.

Additions of token tensors (3-D, transformers; also the channels-last ``(N, H, W, C)`` maps
of Swin-style blocks), of attention logits ``(N·heads, …)``, of a tensor and a parameter
(positional embeddings) or of a scalar are not sites.

Discovery never changes the model: tracing runs Python only, the dummy forward runs in eval
mode under ``no_grad``, and every module's mode, buffers and attributes are restored. The
tracer is :mod:`retrofit.trace`; the probe forward and shape propagation are :mod:`retrofit.probe`;
this module holds the rules that make an addition a site.
(The idea of naming nodes by their owning module follows torchvision's
``feature_extraction.py``; the shallow, per-owner trace is retrofit's own.)
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn

from .probe import (
    PROBE_BATCH,
    ShapeRecorder,
    capture_calls,
    copied,
    default_input_size,
    fixed_arguments,
    inspection_mode,
    positional_inputs,
    preserved_state,
    recorded_output,
    same_output,
)
from .stages import stage_numbers, stride_of
from .trace import Traced, timm_notrace_modules, trace_owner

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
#: Trailing modules of a residual branch that the gate goes in front of (stochastic depth,
#: dropout, identity): timm puts SE before ``drop_path`` too.
_PASS_THROUGH = ("DropPath", "StochasticDepth", "Identity", "Dropout", "Dropout2d")


@dataclass(frozen=True)
class Site:
    """One residual addition.

    Attributes:
        owner: qualified path of the module whose forward performs the addition (``layer1.0``;
            ``""`` for the root).
        index: position of this site among the owner's sites (0 for most blocks).
        add_node: fx node name of the addition in the owner's graph.
        residual_branch: fx node name of the residual branch's last node (the gate's input in
            the ``standard`` placement; trailing drop-path/identity modules are skipped).
        shortcut: fx node name of the shortcut operand.
        unit_input: fx node name of the operands' common ancestor (the unit's input).
        projection: whether the shortcut has ops (e.g. ``downsample``) or is the identity.
        channels: C of the addition, ``(N, C, H, W)``.
        in_channels: C at the unit's input (what a ``pre`` gate sees); ``in_height``/``in_width``
            its H×W; ``unit_input_is_map`` is False when that input is not one tensor (HRNet's
            fuse layers add branches of a list), so the ``pre`` placement cannot gate it.
        height, width: H×W of the addition, at the model's default input size.
        stage: timm's stage index (the ``feature_info`` entry at this site's stride) when the
            model has one for every site, else the stride level: stride 4 → 1 … 32 → 4. Both
            give ResNet's ``layer1`` … ``layer4`` as 1 … 4; ConvNeXt's ``stages.N`` is N.
        fixed_args: ``(name, value)`` of the owner's ``None``/``bool`` arguments in the probe
            call (DLA's ``shortcut=None``, a ``pre_logits=False`` flag). The owner is traced with
            them fixed, because fx cannot follow ``if shortcut is None:`` on a symbolic value;
            the regenerated forward asserts them (a call with other values fails loudly).
    """

    owner: str
    index: int
    add_node: str
    residual_branch: str
    shortcut: str
    unit_input: str
    projection: bool
    channels: int
    in_channels: int
    height: int
    width: int
    stage: int
    fixed_args: tuple[tuple[str, Any], ...] = ()
    in_height: int = 0
    in_width: int = 0
    unit_input_is_map: bool = True


@dataclass(frozen=True)
class TraceFailure:
    """A module whose forward could not be traced (it may hide sites)."""

    owner: str
    module_type: str
    reason: str


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return False
    if len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    alpha = node.kwargs.get("alpha", 1)
    return alpha == 1 and len(node.args) == 2


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def _reads_only_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``…: the node depends on its input's shape, not its values.

    Such an edge is no data flow (LR-ASPP's ``interpolate(..., size=low.shape[-2:])`` does not make
    ``low`` an input of the high-resolution branch).
    """
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in _SHAPE_ATTRIBUTES
    return False


def _distances(start: fx.Node) -> dict[fx.Node, int]:
    """Shortest number of edges from each ancestor of ``start`` (itself included) to ``start``.

    Only data flows count: the inputs of a node that reads a tensor's shape are not followed.
    """
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if _reads_only_metadata(node):
            continue
        for parent in node.all_input_nodes:
            if parent not in dist:
                dist[parent] = dist[node] + 1
                queue.append(parent)
    return dist


def split_operands(add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(residual_branch, shortcut, unit_input)`` of an addition, or None without a common ancestor.

    The unit input is the nearest common ancestor (smallest summed distance); the shortcut is
    the operand nearer to it. Ties (two parallel branches of equal length) keep argument order.
    Without a common ancestor, an operand that is itself an argument of the forward is a
    shortcut handed in by the caller, and the other operand's nearest argument the unit input.
    """
    a, b = add.args[0], add.args[1]
    da, db = _distances(a), _distances(b)
    common = [n for n in da if n in db and n.op != "get_attr"]
    if not common:
        # The caller computed the shortcut and passed it in (DLA: ``tree1(x, shortcut)``): the
        # operand that is an argument is the shortcut, the other one's input the unit's input.
        for shortcut, branch, dist in ((b, a, da), (a, b, db)):
            inputs = [n for n in dist if n.op == "placeholder" and n is not branch]
            if shortcut.op == "placeholder" and inputs:
                return branch, shortcut, min(inputs, key=dist.__getitem__)
        return None
    ancestor = min(common, key=lambda n: (da[n] + db[n], da[n]))
    if da[ancestor] < db[ancestor]:
        return b, a, ancestor
    return a, b, ancestor


_Split = tuple[fx.Node, fx.Node, fx.Node, fx.Node]  # (add, residual branch, shortcut, unit input)


def _outermost(found: list[_Split]) -> list[_Split]:
    """Drop additions nested inside another addition's residual branch.

    ``found`` holds ``(add, branch, shortcut, unit_input)``. An addition whose result feeds the
    residual branch of another one but not its shortcut is part of that unit's branch (Res2Net's
    hierarchical ``sp + spx[i]`` inside a bottleneck), not a residual unit of its own. Additions
    in sequence (``x = x + f(x); x = x + g(x)``: the first feeds both operands of the second)
    are all kept.
    """
    ancestors = {add: (set(_distances(branch)), set(_distances(shortcut))) for add, branch, shortcut, _ in found}
    return [
        entry
        for entry in found
        if not any(
            other is not entry[0] and entry[0] in on_branch and entry[0] not in on_shortcut
            for other, (on_branch, on_shortcut) in ancestors.items()
        )
    ]


def branch_gate_input(graph_module: fx.GraphModule, branch: fx.Node) -> fx.Node:
    """Walk back over trailing drop-path / dropout / identity modules on a residual branch."""
    node = branch
    while (
        node.op == "call_module"
        and len(node.users) == 1
        and node.args
        and isinstance(node.args[0], fx.Node)
        and type(graph_module.get_submodule(node.target)).__name__ in _PASS_THROUGH
    ):
        node = node.args[0]
    return node


def _skip_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) and node.args:
        node = node.args[0]
    return node


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(path, module, expected_untraceable)`` of every module not from ``torch.nn``.

    timm registers some modules as not fx-traceable (``Conv2dSame``, ``BatchNormAct2d``, but
    also whole residual blocks such as ``NormFreeBlock``, ``MobileVitBlock``): their own
    forward is still tried, shallowly, and a failure is expected rather than reported.
    """
    notrace = timm_notrace_modules()
    for path, module in model.named_modules():
        if not type(module).__module__.startswith("torch.nn"):
            yield path, module, bool(notrace) and isinstance(module, notrace)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def is_feature_map(shape: torch.Size, input_size: tuple[int, int, int]) -> bool:
    """Whether an activation of ``shape`` reads as an ``(N, C, H, W)`` map of the probe input.

    4-D with N = :data:`PROBE_BATCH`, and H:W the input's aspect ratio within rounding (one
    pixel). A channels-last ``(N, H, W, C)`` map (Swin, MambaOut) fails the second test unless
    C happens to equal W; windowed or per-head tensors ``(N·k, …)`` fail the first.
    """
    if len(shape) != 4 or shape[0] != PROBE_BATCH or shape[1] < 1:
        return False
    _, in_h, in_w = input_size
    h, w = int(shape[2]), int(shape[3])
    return abs(h * in_w - w * in_h) <= max(in_h, in_w)


def _other_forward_paths(model: nn.Module) -> list[str]:
    """The root's public methods besides ``forward`` that compute features (timm's
    ``forward_features``, ``forward_head``, ``forward_intermediates``).

    A site in the root's own code would be gated only in ``forward`` (the rewritten method),
    so such a model's root-owned additions (HRNet's ``incre_modules`` sum) are not offered.
    """
    return [name for name in dir(type(model)) if name.startswith("forward_") and callable(getattr(type(model), name))]


def find_sites(
    model: nn.Module, input_size: tuple[int, int, int] | None = None, *, traces: dict[str, Traced] | None = None
) -> tuple[list[Site], list[TraceFailure]]:
    """Find every residual site of ``model`` without changing it.

    Args:
        model: any ``nn.Module`` taking ``(N, C, H, W)`` images.
        input_size: ``(C, H, W)`` of the dummy input; default :func:`default_input_size`.
        traces: when given, filled with each site owner's graph (``{owner: Traced}``), so that
            :func:`retrofit.rewrite.rewrite_owner` need not trace it again.

    Returns:
        ``(sites, failures)``: sites in module order; modules whose forward could not be traced.

    Raises:
        RetrofitError: when the dummy forward pass fails.
    """
    with preserved_state(model):
        return _find_sites(model, tuple(input_size or default_input_size(model)), traces)


def _find_sites(
    model: nn.Module, input_size: tuple[int, int, int], traces: dict[str, Traced] | None = None
) -> tuple[list[Site], list[TraceFailure]]:
    # Modules with an addition in their own graph, and modules whose plain trace failed (it may
    # succeed once their None/bool arguments are fixed, which the probe call tells).
    graphs: dict[str, fx.GraphModule | None] = {}
    untraced: dict[str, str] = {}
    owners: dict[str, nn.Module] = {}
    kept: dict[str, Traced] = {}
    for path, module, expected_untraceable in _candidate_modules(model):
        try:
            gm = trace_owner(module)
        except Exception as e:
            if expected_untraceable:
                continue
            untraced[path] = _first_line(e)
            graphs[path], owners[path] = None, module
            continue
        if any(_is_add(n) for n in gm.graph.nodes):
            graphs[path], owners[path] = gm, module
            kept[path] = Traced.of(module, gm)

    failures: list[TraceFailure] = []
    if not owners:
        return [], failures
    sites: list[Site] = []
    with inspection_mode(model):
        captured, outputs, calls = capture_calls(model, owners, input_size)
        for path, module in owners.items():

            def fail(reason: str, path: str = path, module: nn.Module = module) -> None:
                failures.append(TraceFailure(path, type(module).__name__, reason))

            if path == "" and _other_forward_paths(model):
                continue  # gated in forward() only, the root's forward_features()/… would skip it
            if path not in captured:  # not on the forward path (e.g. an unused auxiliary head)
                if path in untraced:
                    fail(untraced[path])
                continue
            args, kwargs = captured[path]
            fixed = fixed_arguments(module, args, kwargs)
            gm = graphs[path]
            if fixed:
                try:
                    gm = trace_owner(module, fixed_args=fixed)
                    kept[path] = Traced.of(module, gm, fixed)
                except Exception as e:
                    fail(untraced.get(path) or _first_line(e))
                    continue
            elif gm is None:
                fail(untraced[path])
                continue
            adds = [n for n in gm.graph.nodes if _is_add(n)]
            if not adds:
                continue
            if calls[path] > 1:
                fail("module is called more than once per forward")
                continue
            intact, expected = recorded_output(outputs[path])
            if not intact:  # a later module updated the output in place: the module's own, once more
                expected = module(*copied(args), **copied(kwargs))
            recorder = ShapeRecorder(gm)
            try:
                output = recorder.run(*positional_inputs(module, args, kwargs))  # a private copy already
            except Exception as e:
                fail(f"shape propagation failed: {_first_line(e)}")
                continue
            # A graph that does not compute what the module computed in the probe (Python-side
            # state, a child that mutates an argument the owner reads again) must never be rewritten.
            if not same_output(expected, output):
                fail("its traced graph does not reproduce its output (Python-side state or in-place argument updates)")
                continue
            shapes = recorder.shapes
            found: list[_Split] = []
            for add in adds:
                a, b = add.args[0], add.args[1]
                sa, sb = shapes.get(a), shapes.get(b)
                if sa is None or sa != sb or not is_feature_map(sa, input_size):
                    continue
                split = split_operands(add)
                if split is None:
                    continue
                branch, shortcut, unit_input = split
                in_shape = shapes.get(unit_input)
                if in_shape is not None and not is_feature_map(in_shape, input_size):
                    continue  # e.g. attention logits or a conv position encoding of 3-D tokens
                found.append((add, branch, shortcut, unit_input))
            if found and traces is not None:
                traces[path] = kept[path]
            for index, (add, branch, shortcut, unit_input) in enumerate(_outermost(found)):
                sa, in_shape = shapes[add.args[0]], shapes.get(unit_input)
                sites.append(
                    Site(
                        owner=path,
                        index=index,
                        add_node=add.name,
                        residual_branch=branch_gate_input(gm, branch).name,
                        shortcut=shortcut.name,
                        unit_input=unit_input.name,
                        projection=_skip_identity(gm, shortcut) is not unit_input,
                        channels=int(sa[1]),
                        in_channels=int(in_shape[1]) if in_shape is not None and len(in_shape) == 4 else int(sa[1]),
                        height=int(sa[2]),
                        width=int(sa[3]),
                        stage=stride_of(input_size[1], int(sa[2])),  # a stride until numbered below
                        fixed_args=tuple(fixed.items()),
                        in_height=int(in_shape[2]) if in_shape is not None and len(in_shape) == 4 else int(sa[2]),
                        in_width=int(in_shape[3]) if in_shape is not None and len(in_shape) == 4 else int(sa[3]),
                        unit_input_is_map=in_shape is not None,
                    )
                )
    stages = stage_numbers(model, [s.stage for s in sites])
    sites = [dataclasses.replace(s, stage=stage) for s, stage in zip(sites, stages)]
    return sites, failures
