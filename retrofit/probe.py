"""The probe forward: a seeded dummy input of the kind a model takes, and what one forward shows.

Discovery runs the model once in eval mode under ``no_grad`` (:func:`inspection_mode`), records
each candidate owner's real call arguments and output (:func:`capture_calls`), and replays an
owner's graph on those arguments to learn every tensor's shape (:class:`ShapeRecorder`), checking
the replay against the recorded output: one forward of the model and one of its owners, no more
(``tests/test_surgery_invariants.py`` counts them). Every buffer, mode and attribute is put back
afterwards (:func:`preserved_state`).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn

from .errors import RetrofitError
#: Batch of the dummy input. Two, not one, so that a tensor computed without the batch (a
#: relative-position bias, a mask) cannot look like an operand of a residual addition.
PROBE_BATCH = 2


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Every module's mode and every buffer's value restored on exit.

    Tracing executes Python: a child traced in train mode runs real code on real buffers (timm's
    ``BatchNormAct2d`` adds 1 to ``num_batches_tracked`` while being traced), so discovery and
    insertion run inside this guard.
    """
    modes = {m: m.training for m in model.modules()}
    buffers = {id(b): (b, b.detach().clone()) for b in model.buffers()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers.values():
                b.copy_(saved)


@contextmanager
def inspection_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``no_grad`` for a look inside; every module's mode and every buffer restored."""
    with preserved_state(model):
        model.eval()
        with torch.no_grad():
            yield


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects: timm's ``pretrained_cfg['input_size']``, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def takes_image_list(model: nn.Module) -> bool:
    """Whether ``model`` takes a list of ``(C, H, W)`` images rather than one ``(N, C, H, W)`` batch.

    torchvision's detection models (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite)
    resize and batch their inputs themselves with a ``GeneralizedRCNNTransform`` at ``.transform``.
    """
    return type(getattr(model, "transform", None)).__name__ == "GeneralizedRCNNTransform"


def probe_input(
    model: nn.Module, input_size: Sequence[int], batch: int = PROBE_BATCH, seed: int = 0
) -> torch.Tensor | list[torch.Tensor]:
    """A seeded random input of the kind ``model`` takes, on its device and in its dtype.

    ``(batch, C, H, W)``, or for a detector (see :func:`takes_image_list`) a list of ``batch``
    images ``(C, H, W)``.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return list(x) if takes_image_list(model) else x


def capture_calls(
    model: nn.Module, owners: dict[str, nn.Module], input_size: tuple[int, int, int]
) -> tuple[dict[str, tuple], dict[str, Any], dict[str, int]]:
    """Run the probe forward once and record what each owner was called with and returned.

    Returns ``(inputs, outputs, calls)`` by owner path: the ``(args, kwargs)`` of its first call,
    copied as they were at that moment (a module may update its input in place), what that call
    returned (read it with :func:`recorded_output`), and the number of calls. The output is the
    module's own, before any other forward hook on it changes it. So the owner's graph can be
    checked against its real output without calling the module again: discovery costs one forward
    of the model plus one replay of the owners' graphs.

    Raises:
        RetrofitError: when the forward pass fails (one line, suggesting ``--input-size``).
    """
    inputs: dict[str, tuple] = {}
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {path: 0 for path in owners}
    handles = []
    for path, module in owners.items():

        def before(mod: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            calls[path] += 1
            if path not in inputs:
                inputs[path] = copied((args, kwargs))

        def after(mod: nn.Module, args: tuple, output: Any, path: str = path) -> None:
            if path not in outputs:
                outputs[path] = _kept(output)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, prepend=True))
    try:
        x = probe_input(model, input_size)
        try:
            model(x)
        except Exception as e:
            raise RetrofitError(
                f"a forward pass with input ({PROBE_BATCH}, {', '.join(map(str, input_size))}) failed: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; try --input-size"
            ) from e
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs, calls


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _versions(value: Any) -> list[int] | None:
    """The version counters of the tensors in ``value`` (bumped by every in-place update), or None
    where a tensor keeps none (inference tensors)."""
    try:
        return [t._version for t in _tensors(value)]
    except RuntimeError:
        return None


def _kept(output: Any) -> tuple[Any, list[int] | None]:
    """An output held for a later comparison: by reference with its tensors' versions (a copy of
    every owner's output would cost a tenth of a forward), or copied where versions are not kept."""
    versions = _versions(output)
    return (output, versions) if versions is not None else (copied(output), None)


def recorded_output(kept: tuple[Any, list[int] | None]) -> tuple[bool, Any]:
    """``(True, output)`` as the call returned it, or ``(False, None)`` when a later module updated
    it in place (a ``ReLU(inplace=True)`` after the unit): the caller then has to call the module again."""
    output, versions = kept
    if versions is None:
        return True, output
    return (True, output) if _versions(output) == versions else (False, None)


def positional_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The call's arguments in ``forward``'s parameter order (fx placeholders are positional)."""
    if not kwargs:
        return list(args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


class ShapeRecorder(fx.Interpreter):
    """Runs a shallow owner graph and records the shape of every tensor node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, torch.Size] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = out.shape
        return out

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # The regenerated forward passes list arguments as fresh literals, which a child may
        # append to (timm's SequentialAppendList); fx's interpreter would pass immutable lists.
        return super().call_module(target, copied(args, tensors=False), copied(kwargs, tensors=False))


def copied(value: Any, tensors: bool = True) -> Any:
    """``value`` with fresh lists/tuples/dicts all the way down (and cloned tensors, if ``tensors``)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if tensors else value
    if isinstance(value, dict):
        return {k: copied(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [copied(v, tensors) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def same_output(expected: Any, got: Any) -> bool:
    """Whether two module outputs agree: same structure (tensors, lists, tuples, dicts), integer
    tensors equal, floating ones within 1e-5 of the expected's scale, NaNs in the same places."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype:
            return False
        if not expected.is_floating_point():
            return torch.equal(expected, got)
        return expected.numel() == 0 or _close(expected.detach(), got.detach())
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(
            same_output(expected[k], got[k]) for k in expected
        )
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(expected) == len(got)
            and all(same_output(e, g) for e, g in zip(expected, got))
        )
    try:
        return bool(expected == got)
    except Exception:
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``max|a − b| ≤ 1e-5 · max(1, max|a|)``, NaNs in the same places, infinities counted as the
    largest finite number. Finite maps take two reductions in their own precision (half and bfloat16
    in float32): the probe's maps are large, and copies in float64 cost as much as the replay itself."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    inf = float("inf")
    scale = torch.linalg.vector_norm(a, inf).item()
    if math.isfinite(scale):
        diff = torch.linalg.vector_norm(a - b, inf).item()
        if math.isfinite(diff):
            return diff <= 1e-5 * max(1.0, scale)
    # a NaN or an infinity somewhere (or a difference past float range): the exact, slower rule
    a, b = a.double(), b.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.nan_to_num(), b.nan_to_num()
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def fixed_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The ``None``/``bool`` arguments of a call, by parameter name (see :attr:`Site.fixed_args`).

    The first parameter (the input) and ``*args``/``**kwargs``/keyword-only ones are never fixed.
    """
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    fixed = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if i > 0 and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and (value is None or isinstance(value, bool)):
            fixed[name] = value
    return fixed
