"""Shallow fx tracing of one module: its own ``forward`` as a graph, every child a leaf call.

Tracing executes Python. :func:`trace_owner` puts back whatever tracing did to the module's
attributes (fx's tensor constants, a proxy cached by code that memoises on first call); the
model-wide guard for buffers and modes is :func:`retrofit.probe.preserved_state`.
"""

from __future__ import annotations

import operator
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import fx, nn


#: Augmented assignments. fx's ``Proxy`` has no ``__iadd__`` & co., so Python falls back to
#: ``x = x + y`` and the regenerated code would allocate a new tensor where the original wrote
#: in place (one feature map per residual unit: measurably slower on CPU), and a module that
#: updates a tensor in place would silently stop doing so.
_INPLACE_OPERATORS = (
    "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
    "iand", "ior", "ixor", "ilshift", "irshift",
)


class InplaceProxy(fx.Proxy):
    """A ``Proxy`` that records ``x += y`` as ``operator.iadd(x, y)`` (and likewise for the
    other augmented assignments); fx's code generator writes it back as ``x += y``."""


def _define_inplace(name: str) -> None:
    target = getattr(operator, name)

    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    setattr(InplaceProxy, method.__name__, method)


for _name in _INPLACE_OPERATORS:
    _define_inplace(_name)


class OwnerTracer(fx.Tracer):
    """Traces one module's own forward; every child module is a leaf.

    timm's registered non-traceable functions (``timm.layers._fx``) are wrapped as leaf calls.
    Augmented assignments stay in place (:class:`InplaceProxy`), so the regenerated forward
    allocates and aliases exactly as the original.
    """

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_timm_notrace_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceProxy(node, self)


def _timm_notrace_functions() -> tuple:
    try:
        from timm.layers._fx import get_notrace_functions
    except ImportError:  # timm is a dependency; tolerate very old or new layouts
        return ()
    return tuple(get_notrace_functions())


def timm_notrace_modules() -> tuple[type, ...]:
    try:
        from timm.layers._fx import get_notrace_modules
    except ImportError:
        return ()
    return tuple(get_notrace_modules())


@contextmanager
def preserved_attributes(module: nn.Module) -> Iterator[None]:
    """Undo what tracing does to a module's attributes: fx stores tensor constants as
    ``_tensor_constantN``, and code that caches on first call keeps proxies in attributes
    (torchvision's ``MultiScaleRoIAlign`` sets ``self.scales``): every entry of ``__dict__``,
    ``_buffers``, ``_parameters`` and ``_modules`` is put back as it was, new ones removed."""
    stores = (module.__dict__, module._buffers, module._parameters, module._modules)
    before = [dict(store) for store in stores]
    try:
        yield
    finally:
        for store, saved in zip(stores, before):
            store.clear()
            store.update(saved)


def trace_owner(
    module: nn.Module, training: bool | None = None, fixed_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """Shallow fx graph of ``module.forward`` (children are leaves), in the given mode.

    ``fixed_args`` (see :attr:`Site.fixed_args`) are traced as constants (fx ``concrete_args``,
    guarded by an assert in the generated code); the forward keeps their parameter names, so
    keyword calls still work.

    Returns a ``GraphModule`` that shares ``module``'s children and parameters; the tensor
    constants that fx made while tracing live on the GraphModule only. ``module`` is left
    exactly as it was. Raises whatever fx raises for untraceable code.
    """
    with preserved_attributes(module):
        before = set(module.__dict__) | set(module._buffers)
        if training is not None:
            module.training = training
        graph = OwnerTracer().trace(module, concrete_args=dict(fixed_args) if fixed_args else None)
        constants = {k: getattr(module, k) for k in (set(module.__dict__) | set(module._buffers)) - before}
    for node in graph.nodes:
        # fx renames a fixed argument's placeholder (`shortcut_1`); keep the parameter's name
        if node.op == "placeholder" and fixed_args:
            name = re.sub(r"_\d+$", "", str(node.target))
            if name in fixed_args and node.target != name:
                node.target = name
    root: dict[str, Any] = dict(constants)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            root[node.target] = _get_path(module, node.target)
    return fx.GraphModule(root, graph, class_name=type(module).__name__)


def _get_path(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _identity(module: nn.Module) -> tuple:
    """What a shallow trace reads besides the mode and the fixed arguments: the module's class, its
    own attributes, parameters, buffers and children (by object identity)."""
    return (
        type(module),
        tuple((k, id(v)) for k, v in module.__dict__.items() if k != "training"),
        *(tuple((k, id(v)) for k, v in store.items()) for store in (module._parameters, module._buffers, module._modules)),
    )


@dataclass
class Traced:
    """A shallow graph of ``module`` (:func:`trace_owner`) kept to be used once more: discovery's trace
    of an owner becomes the rewrite's graph for the same mode, instead of a third trace (issue 18).

    It is handed out only while the module is as it was traced: the same mode, fixed arguments and
    attributes (a forward that caches something on its first call changes one, and gets a fresh trace).
    """

    graph: fx.GraphModule
    training: bool
    fixed_args: dict[str, Any]
    identity: tuple = field(repr=False)

    @classmethod
    def of(cls, module: nn.Module, graph: fx.GraphModule, fixed_args: dict[str, Any] | None = None) -> "Traced":
        return cls(graph, module.training, dict(fixed_args or {}), _identity(module))

    def fits(self, module: nn.Module, training: bool, fixed_args: dict[str, Any] | None) -> bool:
        return (self.training == training and self.fixed_args == dict(fixed_args or {})
                and self.identity == _identity(module))
