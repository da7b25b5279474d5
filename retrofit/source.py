"""Name a model's source: zoo, architecture and constructor kwargs, enough to build it again.

A model from :func:`retrofit.load_model` carries its source record. Any other model is named
here from what it exposes:

* timm models (``timm.create_model(...)``, ``features_only=True`` backbones included): the
  architecture from ``pretrained_cfg``, and the constructor options that a model shows on its
  modules — ``num_classes``, ``global_pool``, ``drop_rate``, ``drop_path_rate`` (the largest
  ``DropPath.drop_prob``), ``in_chans`` (the ``first_conv``'s input channels), ``img_size``,
  ``features_only`` / ``out_indices``;
* torchvision models built by a builder (``torchvision.models.resnet50()``, detection and
  segmentation models): the builder whose architecture has the model's class and state-dict
  shapes, with ``num_classes`` read off the weights.

What cannot be read here is caught by :func:`retrofit.verify.check_rebuild`, which builds the
model again from the record before any checkpoint is written.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .errors import RetrofitError
from .models import SOURCE_MARK, ModelSpec, build

Shapes = dict[str, tuple[int, ...]]


def model_source(model: nn.Module) -> dict[str, Any]:
    """``{"model", "zoo", "kwargs", "weights"}``: the record of :func:`load_model`, else inferred.

    Raises :class:`RetrofitError` when the architecture cannot be named.
    """
    source = getattr(model, SOURCE_MARK, None)
    if source is not None:
        return dict(source)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return {"model": cfg["architecture"], "zoo": "timm", "kwargs": timm_kwargs(model), "weights": "unknown"}
    if type(model).__module__.startswith("torchvision.models"):
        name, kwargs = torchvision_builder(model)
        return {"model": f"torchvision:{name}", "zoo": "torchvision", "kwargs": kwargs, "weights": "unknown"}
    raise RetrofitError(
        f"cannot tell which architecture this {type(model).__name__} is; load it with "
        "retrofit.load_model(name) so the checkpoint can name its source"
    )


def _pool_type(model: nn.Module) -> str | None:
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return None


def _in_chans(model: nn.Module) -> int | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for path in [first] if isinstance(first, str) else list(first or ()):
        try:
            conv = model.get_submodule(path.replace("features_only.", ""))
        except AttributeError:
            continue
        if isinstance(getattr(conv, "in_channels", None), int):
            return conv.in_channels
    return None


def _img_size(model: nn.Module) -> Any:
    for owner in (model, getattr(model, "patch_embed", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and all(isinstance(s, int) for s in size)):
            return list(size) if isinstance(size, (tuple, list)) else size
    return None


def _drop_path_rate(model: nn.Module) -> float | None:
    rates = [float(m.drop_prob) for m in model.modules() if isinstance(getattr(m, "drop_prob", None), (int, float))]
    return max(rates) if rates else None


#: timm constructor options read off a model: option → reader (None when not shown).
_TIMM_READERS: dict[str, Callable[[nn.Module], Any]] = {
    "num_classes": lambda m: getattr(m, "num_classes", None),
    "global_pool": _pool_type,
    "drop_rate": lambda m: getattr(m, "drop_rate", None),
    "drop_path_rate": _drop_path_rate,
    "in_chans": _in_chans,
    "img_size": _img_size,
}


def timm_kwargs(model: nn.Module) -> dict[str, Any]:
    """The constructor options a timm model shows (see the module docstring).

    Only options its class's ``__init__`` names are kept; a ``features_only`` wrapper
    (``FeatureListNet``) records ``features_only`` and ``out_indices`` and the options its
    modules show.
    """
    features = type(model).__name__ in ("FeatureListNet", "FeatureDictNet", "FeatureHooks", "FeatureHookNet")
    accepted = set(inspect.signature(type(model).__init__).parameters)
    kwargs: dict[str, Any] = {}
    for option, read in _TIMM_READERS.items():
        if not features and option not in accepted:
            continue
        value = read(model)
        if value is not None and not (features and option in ("num_classes", "global_pool")):
            kwargs[option] = value
    if features:
        kwargs["features_only"] = True
        kwargs["out_indices"] = list(model.feature_info.out_indices)
        if type(model).__name__ != "FeatureListNet":
            kwargs["feature_cls"] = {"FeatureDictNet": "dict", "FeatureHooks": "hook", "FeatureHookNet": "hook"}.get(
                type(model).__name__, "list"
            )
    return kwargs


def _shapes(module: nn.Module) -> Shapes:
    """State-dict shapes, less the tensors of inserted blocks (what the builder made)."""
    from .blocks import ChannelGate

    gates = tuple(f"{path}." for path, m in module.named_modules() if isinstance(m, ChannelGate))
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not gates or not k.startswith(gates)}


def _meta_shapes(spec: ModelSpec) -> Shapes | None:
    """State-dict shapes of ``spec``'s architecture, built on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            return _shapes(build(spec))
    except Exception:  # a builder that rejects the kwargs, or cannot build on meta
        return None


def head_kwargs(spec: ModelSpec, shapes: Shapes) -> dict[str, Any] | None:
    """Constructor kwargs under which ``spec`` has exactly ``shapes``: ``{}``, ``{"num_classes": N}``, or None.

    ``N`` is tried from the first dimension of each tensor whose shape differs (a classifier's
    ``(N, D)``; a detector's box predictor ``(N, D)`` beside ``(4·N, D)``), and kept when the
    whole architecture then matches.
    """
    own = _meta_shapes(spec)
    # BatchNorm counters may be absent from a file (see weights.load_state_dict_strict)
    shapes = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in (own or {}).items() if not k.endswith("num_batches_tracked")}
    if not own or own.keys() != shapes.keys():
        return None
    differ = [k for k in own if own[k] != shapes[k]]
    if not differ:
        return {}
    for n in dict.fromkeys(shapes[k][0] for k in differ if shapes[k]):
        built = _meta_shapes(ModelSpec(spec.name, spec.zoo, {**spec.kwargs, "num_classes": int(n)})) or {}
        if {k: v for k, v in built.items() if not k.endswith("num_batches_tracked")} == shapes:
            return {"num_classes": int(n)}
    return None


def torchvision_builder(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(builder name, kwargs)`` of a model made by a torchvision builder.

    Candidates are the builders of the model's class's module (``torchvision.models.resnet`` for
    ``ResNet``) whose architecture has the model's class and state-dict shapes.

    Raises :class:`RetrofitError` when none or several fit.
    """
    from torchvision.models import get_model_builder, list_models

    shapes = _shapes(model)
    fits = []
    for name in list_models():
        if get_model_builder(name).__module__ != type(model).__module__:
            continue
        kwargs = head_kwargs(ModelSpec(f"torchvision:{name}", "torchvision"), shapes)
        if kwargs is not None:
            fits.append((name, kwargs))
    if len(fits) != 1:
        found = "no" if not fits else f"{len(fits)} ({', '.join(n for n, _ in fits)})"
        raise RetrofitError(
            f"cannot tell which torchvision builder made this {type(model).__name__}: {found} builder fits its "
            "weights; load it with retrofit.load_model('torchvision:NAME') so the checkpoint can name its source"
        )
    return fits[0]
