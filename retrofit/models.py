"""Resolve a model name and its weights to an ``nn.Module``.

Names:

* a timm name, optionally with a pretrained tag: ``resnet50``, ``resnet50.a1_in1k``;
* ``torchvision:NAME``: a torchvision classification model, e.g. ``torchvision:resnet50``;
* ``hf-hub:ORG/NAME``: a timm model on the Hugging Face hub.

Weights: the zoo's pretrained weights (hub cache first, then download), a local file
(``weights=``), or none (``pretrained=False``). Offline with nothing cached, loading stops with
one line that names the model and says how to pass a local file.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RetrofitError
from .weights import WEIGHT_SUFFIXES, load_state_dict_strict, read_state_dict

TORCHVISION_PREFIX = "torchvision:"
HF_HUB_PREFIX = "hf-hub:"
#: Attribute set on every model :func:`load_model` returns: how to rebuild it (see recipe.py).
SOURCE_MARK = "_retrofit_source"


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model's architecture: zoo, name and constructor kwargs."""

    name: str
    zoo: str  # "timm" or "torchvision"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """The name without prefix, e.g. ``resnet50`` for ``torchvision:resnet50``."""
        return self.name[len(TORCHVISION_PREFIX):] if self.zoo == "torchvision" else self.name


def parse_name(name: str) -> ModelSpec:
    """Split ``name`` into zoo and architecture; raises :class:`RetrofitError` for unknown names."""
    if name.startswith(TORCHVISION_PREFIX):
        from torchvision.models import list_models

        arch = name[len(TORCHVISION_PREFIX):]
        known = list_models()
        if arch not in known:
            raise RetrofitError(_unknown(name, arch, known, TORCHVISION_PREFIX))
        return ModelSpec(name, "torchvision")
    if name.startswith(HF_HUB_PREFIX):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", name[len(HF_HUB_PREFIX):]):
            raise RetrofitError(f"{name!r} is not a hub model id; write hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet50.a1_in1k")
        return ModelSpec(name, "timm")
    if name.endswith(WEIGHT_SUFFIXES) or os.sep in name:
        raise RetrofitError(
            f"{name!r} looks like a file, not a model name; give the architecture (e.g. resnet50) "
            "and pass the file with --weights FILE (a retrofit checkpoint goes to predict/report/finetune)"
        )
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        if os.path.exists(name):  # `report params-flops photo.png`: a file, but not one retrofit reads as a model
            kind = "folder" if os.path.isdir(name) else "file"
            raise RetrofitError(
                f"{name!r} is a {kind}, not a model name or a retrofit checkpoint (.safetensors); "
                "base weights go with --weights FILE after a model name"
            )
        raise RetrofitError(_unknown(name, arch, timm.list_models(), ""))
    if tag:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            shown = ", ".join(tags[:5]) + (", …" if len(tags) > 5 else "") if tags else "none"
            raise RetrofitError(f"{arch} has no pretrained tag {tag!r}; its tags: {shown}")
    return ModelSpec(name, "timm")


def _unknown(name: str, arch: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
    zoo = "torchvision" if prefix else "timm"
    return f"unknown model {name!r} (not a {zoo} architecture){hint}"


def build(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """Instantiate the architecture; with ``pretrained`` the zoo fetches its weights."""
    if spec.zoo == "torchvision":
        from torchvision.models import get_model

        weights = "DEFAULT" if pretrained else None
        kwargs = dict(spec.kwargs)
        if _takes_backbone_weights(spec.arch):
            # detection/segmentation builders fetch ImageNet backbone weights by default even with
            # weights=None; the detector's own weights (or none) are what was asked for
            kwargs.setdefault("weights_backbone", None)
        with warnings.catch_warnings():
            # googlenet / inception_v3 announce a future change of their default init: noise
            # around every command (the weights are loaded or the init is the documented one).
            warnings.filterwarnings("ignore", message="The default weight initialization", category=FutureWarning)
            return get_model(spec.arch, weights=weights, **kwargs)
    import timm

    if spec.name.startswith(HF_HUB_PREFIX) and not pretrained:
        hub_id = spec.name[len(HF_HUB_PREFIX):]
        if not _hub_reachable("huggingface.co") and not _hf_cached_config(hub_id):
            raise RetrofitError(
                f"could not fetch the configuration of {spec.name!r} (offline and not cached); "
                + _hf_instead(spec.name)
            )
        try:  # timm reads an hf-hub model's config from the hub even without weights
            return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            raise RetrofitError(
                f"could not fetch the configuration of {spec.name!r} from the hub ({type(e).__name__}); "
                + _hf_instead(spec.name)
            ) from e
    return timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)


def pretrained_architecture_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Constructor kwargs with which the zoo builds, without weights, the architecture of its pretrained model.

    torchvision's builders change the architecture when they load weights
    (torchvision/models/googlenet.py, inception.py, vision_transformer.py): GoogLeNet and
    Inception-v3 then normalise the input inside ``forward`` (``transform_input``), GoogLeNet
    drops its two auxiliary classifiers (6,624,904 parameters instead of 13,004,888), and a ViT
    takes the image size of its weights (``vit_h_14``: 518). timm builds the same architecture
    with or without weights: ``{}``.
    """
    if spec.zoo != "torchvision":
        return {}
    if spec.arch == "googlenet":
        return {"transform_input": True, "aux_logits": False}
    if spec.arch == "inception_v3":
        return {"transform_input": True}
    if spec.arch.startswith("vit_"):
        from torchvision.models import get_model_weights

        return {"image_size": get_model_weights(spec.arch).DEFAULT.meta["min_size"][0]}
    return {}


def _takes_backbone_weights(arch: str) -> bool:
    """Whether torchvision's builder ``arch`` has a ``weights_backbone`` argument (detection, segmentation)."""
    import inspect

    from torchvision.models import get_model_builder

    return "weights_backbone" in inspect.signature(get_model_builder(arch)).parameters


def _hub_reachable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _offline_error(name: str) -> RetrofitError:
    if name.startswith(HF_HUB_PREFIX):  # its configuration comes from the hub too, even with --no-pretrained
        return RetrofitError(
            f"could not fetch pretrained weights for {name!r} (offline and not cached); {_hf_instead(name)}"
        )
    return RetrofitError(
        f"could not fetch pretrained weights for {name!r} (offline and not cached); "
        "pass a local file with --weights FILE, or use --no-pretrained"
    )


def _hf_instead(name: str) -> str:
    """What to run instead of an hf-hub name offline: its timm architecture with ``--weights FILE``."""
    import timm

    repo = name[len(HF_HUB_PREFIX):].partition("/")[2]
    arch = repo.partition(".")[0]
    if arch and timm.is_model(arch):
        return f"use the timm name {arch!r} with --weights FILE instead"
    return "use the timm architecture name with --weights FILE instead"


def _load_pretrained(spec: ModelSpec) -> nn.Module:
    """Pretrained model from the zoo: its cache first, a download when the hub is reachable."""
    if spec.zoo == "torchvision":
        from torchvision.models import get_model_weights

        url = get_model_weights(spec.arch).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.exists() and not _hub_reachable("download.pytorch.org"):
            raise _offline_error(spec.name)
    elif not _hub_reachable("huggingface.co"):
        import timm

        if spec.name.startswith(HF_HUB_PREFIX):
            raise _offline_error(spec.name)
        cfg = timm.models.get_pretrained_cfg(spec.name) if "." in spec.name else None
        if cfg is None:
            model = timm.create_model(spec.name, pretrained=False)
            cfg = model.pretrained_cfg
            hub_id = cfg.get("hf_hub_id")
        else:
            hub_id = cfg.hf_hub_id
        cached = _hf_cached_file(hub_id)
        if cached is None:
            raise _offline_error(spec.name)
        return timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **spec.kwargs)
    try:
        return build(spec, pretrained=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise RetrofitError(
            f"could not fetch pretrained weights for {spec.name!r} ({type(e).__name__}); "
            "pass a local file with --weights FILE, or use --no-pretrained"
        ) from e


def _hf_cached_file(hub_id: str | None) -> str | None:
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _hf_cached_config(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def load_model(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, ModelSpec, str]:
    """Resolve ``name`` to a model with weights.

    Args:
        name: timm name (with optional tag), ``torchvision:NAME`` or ``hf-hub:ORG/NAME``.
        pretrained: fetch the zoo's weights (ignored when ``weights`` is given).
        weights: a local weights file, loaded strictly (see :func:`read_state_dict`). When its
            classifier has another class count than the architecture's default (a model
            fine-tuned to N classes), the model is built with ``num_classes=N`` read from the
            file, unless ``num_classes`` is given.
        kwargs: constructor kwargs (e.g. ``num_classes``), recorded in the spec.

    Returns:
        ``(model, spec, weights_origin)``; the origin is ``"pretrained"``, ``"file:<name>"`` or
        ``"random"``. The model is in eval mode.

    Raises:
        RetrofitError: unknown name, offline with nothing cached, bad weights file.
    """
    spec = parse_name(name)
    spec = ModelSpec(spec.name, spec.zoo, dict(kwargs))
    if weights is not None:
        state = read_state_dict(weights)
        model = build(spec)
        source = f"weights file {Path(weights).name}"
        try:
            load_state_dict_strict(model, state, source)
        except RetrofitError:
            # a classifier fine-tuned to N classes: build the head the file has (unless asked otherwise)
            from .source import head_kwargs

            shapes = {k: tuple(v.shape) for k, v in state.items()}
            # the zoo's pretrained architecture (GoogLeNet without aux heads), then a classifier of N classes
            arch = ModelSpec(spec.name, spec.zoo, {**pretrained_architecture_kwargs(spec), **spec.kwargs})
            head = None if "num_classes" in kwargs else head_kwargs(arch, shapes)
            if head is None:
                raise
            spec = ModelSpec(spec.name, spec.zoo, {**arch.kwargs, **head})
            model = build(spec)
            load_state_dict_strict(model, state, source)
        origin = f"file:{Path(weights).name}"
    elif pretrained:
        model = _load_pretrained(spec)
        # what a rebuild without weights needs to build the same architecture (GoogLeNet's aux heads)
        spec = ModelSpec(spec.name, spec.zoo, {**pretrained_architecture_kwargs(spec), **spec.kwargs})
        origin = "pretrained"
    else:
        model = build(spec)
        origin = "random"
    setattr(model, SOURCE_MARK, {"model": spec.name, "zoo": spec.zoo, "kwargs": dict(spec.kwargs), "weights": origin})
    return model.eval(), spec, origin
