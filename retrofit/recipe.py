"""The recipe: a frozen record of what was done to a model, enough to rebuild it.

Stored as JSON in a checkpoint's safetensors metadata (key ``retrofit.recipe``), in the spirit
of HF PEFT's ``adapter_config.json``: source model and weights origin, block, placement,
init, options, the per-site list (owner, C, k or r …), and the library versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .errors import RetrofitError
from .source import model_source
from .surgery import MODEL_MARK

FORMAT = "retrofit.recipe/1"


@dataclass(frozen=True)
class Recipe:
    """What a checkpoint holds besides tensors.

    Attributes:
        source: ``{"model": name, "zoo": "timm"|"torchvision", "kwargs": {...}, "weights": origin}``.
        block, placement, init: as passed to :func:`retrofit.add_attention`.
        options: the user's options (reduction, kernel_size, groups).
        input_size: ``(C, H, W)`` used to find sites.
        sites: per-site records (see ``InsertedSite.to_dict``).
        versions: retrofit, torch, torchvision, timm versions that wrote it.
        extra: free-form additions (e.g. fine-tuning settings).
        replaced: existing SE modules swapped by ``--replace-existing`` (path, was, C, options).
    """

    source: dict[str, Any]
    block: str | None
    placement: str | None
    init: str | None
    options: dict[str, Any]
    input_size: list[int] | None
    sites: list[dict[str, Any]]
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    replaced: list[dict[str, Any]] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        """Parse a recipe; raises :class:`RetrofitError` when it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as e:
            raise RetrofitError(f"the checkpoint's recipe is damaged or of another version ({e})") from None


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    from . import __version__

    return {"retrofit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def recipe_of(model: nn.Module, extra: dict[str, Any] | None = None) -> Recipe:
    """Build the recipe of a (possibly retrofitted) model."""
    record = getattr(model, MODEL_MARK, None)
    if record is None:
        return Recipe(model_source(model), None, None, None, {}, None, [], versions(), dict(extra or {}))
    return Recipe(
        source=model_source(model),
        block=record.block,
        placement=record.placement,
        init=record.init,
        options=dict(record.options),
        input_size=list(record.input_size) if record.input_size else None,
        sites=[s.to_dict() for s in record.sites],
        versions=versions(),
        extra=dict(extra or {}),
        replaced=[r.to_dict() for r in record.replaced],
    )
