"""The regenerated ``forward`` of a rewritten owner: a callable that survives pickle.

:func:`retrofit.rewrite.rewrite_owner` turns an owner's fx graph (with the gates inserted)
into Python source. A function bound on the instance would not travel: pickle stores a
module's class and ``__dict__``, and a bound method pickles as ``getattr(owner, "forward")``,
which on load finds the *class's* forward, so ``torch.save(model)`` / ``pickle`` / spawn would
silently give back the network without its gates. :class:`RewrittenForward` instead keeps the
source text and what its globals refer to (as ``torch.fx.GraphModule.__reduce__`` does with
its generated code) and compiles it again when it is unpickled or deep-copied.

The owner keeps its class, so ``isinstance`` checks, methods and ``type(m).__name__`` are
those of the original module; only ``owner.forward`` (an instance attribute) is replaced.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import types
from typing import Any, Callable

from torch import fx

#: Modes of an owner whose train and eval graphs differ; "any" when they are the same.
_MODES = ("train", "eval", "any")
_counter = itertools.count()

#: What the generated code of one mode is made of: its source and its globals, with modules
#: recorded by name (``("module", "torch")``) so that the whole thing pickles.
PortableCode = tuple[str, dict[str, tuple[str, Any]]]


def portable_code(graph: fx.Graph) -> PortableCode:
    """The source and globals of ``graph``'s forward, in a picklable form.

    Globals are the objects fx's code generator refers to: modules (``torch``), classes
    (``device``), functions (``operator.add``, timm's leaf-wrapped functions) and constants.
    Functions and classes pickle by qualified name, so a function that is not importable makes
    pickling fail loudly rather than load something else.
    """
    code = graph.python_code(root_module="self")
    portable = {
        name: ("module", value.__name__) if isinstance(value, types.ModuleType) else ("value", value)
        for name, value in code.globals.items()
    }
    return code.src, portable


def _compile(source: str, portable: dict[str, tuple[str, Any]], label: str) -> Callable:
    import importlib

    namespace = {
        name: importlib.import_module(value) if kind == "module" else value for name, (kind, value) in portable.items()
    }
    filename = f"<retrofit {label} #{next(_counter)}>"
    # registered in linecache so that tracebacks and torch.compile show the generated lines
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["forward"]


class RewrittenForward:
    """``owner.forward`` after retrofitting: the owner's graph code, with gates, bound to ``owner``.

    Args:
        owner: the rewritten module (the code runs with ``self`` = ``owner``, so moving it with
            ``.to()``, ``.half()`` or ``load_state_dict`` is seen by the code).
        codes: :data:`PortableCode` per mode: ``{"any": …}``, or ``{"train": …, "eval": …}``
            when the owner's own code branches on ``self.training`` (chosen at call time).
    """

    def __init__(self, owner: Any, codes: dict[str, PortableCode]):
        if not codes or set(codes) - set(_MODES) or ("any" in codes) == ("train" in codes):
            raise ValueError(f"codes must be {{'any'}} or {{'train', 'eval'}}, got {sorted(codes)}")
        self.owner = owner
        self.codes = dict(codes)
        label = type(owner).__name__
        self._functions = {mode: _compile(src, glb, f"{label}.{mode}") for mode, (src, glb) in self.codes.items()}
        self._any = self._functions.get("any")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._any is not None:
            return self._any(self.owner, *args, **kwargs)
        mode = "train" if self.owner.training else "eval"
        return self._functions[mode](self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The generated forward's parameters, less ``self`` (what ``inspect.signature`` shows)."""
        signature = inspect.signature(next(iter(self._functions.values())))
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __reduce__(self) -> tuple:
        return RewrittenForward, (self.owner, self.codes)

    def __repr__(self) -> str:
        return f"<retrofitted forward of {type(self.owner).__name__} ({', '.join(self.codes)})>"
